"""Every rank's flight recorder, and its post-mortem.

The recorder keeps a rank's recent events (phase changes at start-up, each call of the
compiled steps, evaluation, checkpoints, signals, exceptions) in a ring of fixed-size
records in a memory-mapped file, `ranks/rank-R.events`. Recording one is a `struct.pack_into`
into shared memory, no system call, and the file outlives the process however it ends
(SIGKILL included): `pipeline postmortem` reads where a rank was even when it left nothing
else. Its header carries the rank's heartbeat (stamped by the watchdog's tick about once a
second) and its last suspension, so a rank that stopped running while its peers went on is
told from one that waited with them.

A post-mortem (`postmortem/rank-R.txt` and `.json`) is written when the watchdog fires, when
the rank raises, and when a stop signal arrives (the launcher terminating ranks after one
died sends SIGTERM, and SIGKILL soon after): the txt holds every thread's Python stack from
the standard library's faulthandler, into a file opened at start-up, so a fatal signal
(SIGSEGV, SIGABRT) or a GIL held in C code for too long still leaves stacks there. Writing
it is bounded in time: a hung file system delays the exit by seconds, never forever.

Each event says whether the rank was waiting in a collective (hvd.init, a broadcast, a call
of the compiled steps and its allreduces): a rank stuck outside one while its peers wait
inside is the one that stopped first.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import mmap
import os
import socket
import struct
import sys
import threading
import time
import traceback
from pathlib import Path

from pipeline.runtime.backstop import Backstop

POSTMORTEM = "postmortem"

# Where a rank is, in the order a run goes through them. `allreduce` is only entered by a
# `debug.fault` that stops a rank just before the call holding its step.
PHASES = ("startup", "init", "setup", "data", "allreduce", "step", "eval", "checkpoint", "stop", "done", "staging")
KINDS = ("phase", "wait", "call", "done", "signal", "exception", "stall", "fault", "suspended")

_MAGIC = b"PLFLTR01"
# magic, capacity, record size, rank, pid, start time, next record number, host
_HEADER = struct.Struct("<8sIIiidQ64s")
_HEADER_SIZE = 128
_NEXT_AT = struct.calcsize("<8sIIiid")  # offset of the record counter inside the header
# After it, the rank's heartbeat: the wall clock of the watchdog's last tick (about once a
# second), the backstop's horizon (pipeline/runtime/backstop.py; 0: none), and the rank's last
# suspension (how long, and the wall clock when it ran again).
_BEAT = struct.Struct("<dffd")
_BEAT_AT = _HEADER.size
assert _BEAT_AT + _BEAT.size <= 128
# time, step, phase, kind, waiting in a collective (0/1), label (utf-8, NUL-padded)
_RECORD = struct.Struct("<dqBBB45s")
CAPACITY = 512


def launch_rank(environ=os.environ) -> int:
    """This process's rank as its launcher set it, before Horovod joins the job."""
    for v in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK",
              "SLURM_PROCID"):
        if environ.get(v, "").isdigit():
            return int(environ[v])
    return 0


def events_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / "ranks" / f"rank-{rank}.events"


def postmortem_paths(run_dir: Path, rank: int) -> tuple[Path, Path]:
    d = Path(run_dir) / POSTMORTEM
    return d / f"rank-{rank}.txt", d / f"rank-{rank}.json"


class Recorder:
    """The ring of one rank's events, and what it is doing now (phase, step, waiting)."""

    def __init__(self, run_dir: Path, rank: int, capacity: int = CAPACITY, on_disk: bool = True):
        self.run_dir, self.rank = Path(run_dir), rank
        self.host, self.pid, self.start = socket.gethostname(), os.getpid(), time.time()
        self.capacity = capacity
        self.phase, self.step, self.waiting, self.since = "startup", 0, "", self.start
        self.count = 0
        self.cost_s = 0.0
        self.horizon_s, self.gap_s, self.gap_end = 0.0, 0.0, 0.0
        self._lock = threading.Lock()
        self.size = _HEADER_SIZE + capacity * _RECORD.size
        self.path: Path | None = None  # None: in memory only
        self._mm = mmap.mmap(-1, self.size)
        _HEADER.pack_into(self._mm, 0, _MAGIC, capacity, _RECORD.size, rank, self.pid, self.start, 0,
                          self.host.encode()[:64])
        self.event("phase", "startup", 0)
        if on_disk:
            self.to_disk()

    def to_disk(self) -> bool:
        """Moves the ring into its file (ranks/rank-R.events), replacing an earlier attempt's;
        the events so far go with it. False where the file system refuses (it stays in memory)."""
        if self.path is not None:
            return True
        path = events_path(self.run_dir, self.rank)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, self.size)
                mm = mmap.mmap(fd, self.size)
            finally:
                os.close(fd)
        except (OSError, ValueError):
            return False
        with self._lock:
            mm[:] = self._mm[:]
            self._mm, self.path = mm, path
        return True

    def event(self, kind: str, phase: str | None = None, step: int | None = None, label: str = "",
              waiting: str | None = None) -> None:
        """Records one event; `phase`, `step` and `waiting` also change what the rank is doing."""
        t0 = time.perf_counter()
        now = time.time()
        with self._lock:
            if phase is not None and phase != self.phase:
                self.phase, self.since = phase, now
            if step is not None:
                self.step = step
            if waiting is not None:
                self.waiting = waiting
            label = label or self.waiting
            _RECORD.pack_into(self._mm, _HEADER_SIZE + (self.count % self.capacity) * _RECORD.size, now,
                              self.step, PHASES.index(self.phase), KINDS.index(kind), bool(self.waiting),
                              label.encode("utf-8", "replace")[:45])
            self.count += 1
            struct.pack_into("<Q", self._mm, _NEXT_AT, self.count)
        self.cost_s += time.perf_counter() - t0

    def beat(self, now: float | None = None) -> None:
        """The heartbeat: this rank's threads still run (the watchdog's tick stamps it). Its
        cost counts with the events' (part of the step log's cost the bench reports)."""
        t0 = time.perf_counter()
        _BEAT.pack_into(self._mm, _BEAT_AT, time.time() if now is None else now, self.horizon_s, self.gap_s,
                        self.gap_end)
        self.cost_s += time.perf_counter() - t0

    def suspended(self, gap_s: float, resumed: float) -> None:
        """The rank did not run for gap_s until `resumed` (wall clock): stopped, frozen, starved."""
        self.gap_s, self.gap_end = gap_s, resumed
        self.event("suspended", label=f"not running for {gap_s:.0f}s")
        self.beat(resumed)

    @contextlib.contextmanager
    def wait(self, what: str):
        """Marks a collective: the rank waits for its peers until it returns."""
        before = self.waiting
        self.event("wait", waiting=what)
        try:
            yield
        finally:
            self.event("done", waiting=before)

    def state(self) -> dict:
        return {"rank": self.rank, "host": self.host, "pid": self.pid, "phase": self.phase, "step": self.step,
                "waiting": self.waiting or None, "phase_since": self.since}

    def events(self) -> list[dict]:
        return _records(self._mm)

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._mm.flush()


def read_events(path: Path) -> tuple[dict, list[dict]] | None:
    """(header, events oldest first) of a ring file, or None when there is none or it is not one."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    if len(data) < _HEADER_SIZE or data[:8] != _MAGIC:
        return None
    _, _cap, _rsize, rank, pid, start, count, host = _HEADER.unpack_from(data, 0)
    beat, horizon, gap_s, gap_end = _BEAT.unpack_from(data, _BEAT_AT)
    header = {"rank": rank, "pid": pid, "start": start, "count": count,
              "host": host.rstrip(b"\0").decode("utf-8", "replace"),
              "heartbeat": beat or None, "backstop_s": horizon or None,
              "suspended_s": round(gap_s, 3) or None, "resumed": gap_end or None}
    return header, _records(data)


def _records(buf) -> list[dict]:
    _, cap, rsize, _rank, _pid, _start, count, _host = _HEADER.unpack_from(buf, 0)
    out = []
    for n in range(max(0, count - cap), count):
        t, step, phase, kind, waiting, label = _RECORD.unpack_from(buf, _HEADER_SIZE + (n % cap) * rsize)
        out.append({"time": t, "step": step, "phase": PHASES[phase] if phase < len(PHASES) else "?",
                    "kind": KINDS[kind] if kind < len(KINDS) else "?", "waiting": bool(waiting),
                    "label": label.rstrip(b"\0").decode("utf-8", "replace")})
    return out


# --- the process's recorder and post-mortem ---

class Flight:
    """No recorder (a trainer stage called on its own, as the in-process tests do): every
    method does nothing. The real one is its subclass, so the loop never asks which it has."""

    cost_s = 0.0

    def attach(self) -> None:
        pass

    def state(self) -> dict:
        return {"rank": None, "host": None, "pid": os.getpid(), "phase": None, "step": None, "waiting": None,
                "phase_since": None}

    def heartbeat(self, backstop_s: float = 0.0) -> None:
        pass

    def suspended(self, gap_s: float, resumed: float) -> None:
        pass

    def event(self, kind: str, phase: str | None = None, step: int | None = None, label: str = "",
              waiting: str | None = None) -> None:
        pass

    def postmortem(self, reason: str, exc: BaseException | None = None, exit_code: int | None = None,
                   bound_s: float = 10.0) -> bool:
        return True

    def discard(self) -> None:
        pass

    def close(self) -> None:
        pass


_current: "FlightRecorder | None" = None


class FlightRecorder(Flight):
    """One rank's recorder, post-mortem files and fatal-signal stacks. `start()` makes it the
    process's own, so deep code (the collectives in pipeline/runtime/dist.py) records through
    `waiting()` without being handed it.

    Until `attach()` (once the run is past every check a user can fail: a user error must
    leave an earlier attempt's files as they were) the ring is in memory and fatal-signal
    stacks go to stderr, the job log; a post-mortem before then attaches first."""

    def __init__(self, run_dir: Path, rank: int):
        self.run_dir, self.rank = Path(run_dir), rank
        self.txt, self.json = postmortem_paths(self.run_dir, rank)
        self.recorder = Recorder(self.run_dir, rank, on_disk=False)
        self.written: str | None = None  # the reason of the post-mortem written, if any
        self._pending: threading.Event | None = None
        self._stacks = None
        self._attached = False
        self._attach_lock = threading.Lock()
        self._backstop = Backstop(rank)
        self._backstop.start()  # before the rank joins its job
        self._fault_was_enabled = faulthandler.is_enabled()
        faulthandler.enable(file=sys.__stderr__, all_threads=True)

    def attach(self) -> None:
        """Into the run directory: the ring file, and the stacks file opened now (so a fatal
        signal later still has a file); an earlier attempt's post-mortem of this rank goes."""
        with self._attach_lock:
            if self._attached:
                return
            self._attached = True
            for p in (self.txt, self.json):
                with contextlib.suppress(OSError):
                    p.unlink()
            self.recorder.to_disk()
            try:
                self.txt.parent.mkdir(parents=True, exist_ok=True)
                self._stacks = open(self.txt, "w")
                faulthandler.enable(file=self._stacks, all_threads=True)
            except OSError:
                self._stacks = None

    def event(self, kind: str, phase: str | None = None, step: int | None = None, label: str = "",
              waiting: str | None = None) -> None:
        self.recorder.event(kind, phase, step, label, waiting)

    @property
    def cost_s(self) -> float:
        """Time spent recording events so far (part of what logging costs)."""
        return self.recorder.cost_s

    def state(self) -> dict:
        return self.recorder.state()

    def postmortem(self, reason: str, exc: BaseException | None = None, exit_code: int | None = None,
                   bound_s: float = 10.0) -> bool:
        """Writes postmortem/rank-R.txt (every thread's stack, appended) and .json; returns
        whether both were written within `bound_s` (a hung file system must not keep the
        rank alive: the writing thread is left behind)."""
        if exc is not None:
            self.event("exception", label=type(exc).__name__)
        reason += self._resumed_note()
        now = time.time()
        record = {**self.state(), "reason": reason, "time": now, "exit_code": exit_code,
                  "phase_s": round(now - self.recorder.since, 3), "stacks": str(self.txt),
                  "last_events": self.recorder.events()[-32:],
                  "exception": None if exc is None else {
                      "type": type(exc).__name__, "message": str(exc),
                      "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}}
        done = self._pending = threading.Event()

        def write():
            try:
                self.attach()
                stacks = self._stacks
                if stacks is not None:
                    stacks.write(f"# rank {self.rank} on {record['host']} pid {record['pid']}: {reason}\n")
                    stacks.flush()
                    faulthandler.dump_traceback(file=stacks, all_threads=True)
                    stacks.flush()
                self.json.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.json.with_name(f".{self.json.name}.tmp-{os.getpid()}")
                tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
                os.replace(tmp, self.json)
            except Exception as e:  # noqa: BLE001 - best effort: say so, the exit goes on
                print(f"rank {self.rank}: could not write its post-mortem: {e}", file=sys.stderr, flush=True)
            finally:
                done.set()

        threading.Thread(target=write, name="postmortem", daemon=True).start()
        self.written = reason
        return done.wait(bound_s)

    def discard(self) -> None:
        """A clean end after all (a stop signal completed): the provisional post-mortem goes."""
        if self._pending is not None:
            self._pending.wait(5.0)
        with contextlib.suppress(OSError):
            self.json.unlink()
        if self._stacks is not None:
            with contextlib.suppress(OSError, ValueError):
                self._stacks.seek(0)
                self._stacks.truncate()
        self.written = None

    def heartbeat(self, backstop_s: float = 0.0) -> None:
        """The watchdog's tick: the ring's heartbeat, and the backstop's (pipeline/runtime/backstop.py):
        if this process then runs no Python for backstop_s (the GIL held in C code), its helper
        sends SIGABRT and faulthandler writes every stack into the txt. 0: no backstop."""
        self.recorder.horizon_s = backstop_s
        self.recorder.beat()
        self._backstop.beat(backstop_s)

    def suspended(self, gap_s: float, resumed: float) -> None:
        """This rank did not run for gap_s until `resumed`: said in the ring and in any
        post-mortem it writes afterwards."""
        self.recorder.suspended(gap_s, resumed)

    def _resumed_note(self) -> str:
        r = self.recorder
        if not r.gap_s:
            return ""
        return (f" (this rank itself was not running for {r.gap_s:.0f}s until "
                f"{time.strftime('%H:%M:%S', time.localtime(r.gap_end))}: stopped, frozen or starved)")

    def close(self) -> None:
        global _current
        if _current is self:
            _current = None
        self._backstop.close()
        with contextlib.suppress(OSError, ValueError):
            faulthandler.disable()
            if self._fault_was_enabled:
                faulthandler.enable(file=sys.__stderr__, all_threads=True)
        if self._stacks is not None:
            with contextlib.suppress(OSError, ValueError):
                empty = self._stacks.tell() == 0
                self._stacks.close()
                if empty and self.written is None:
                    self.txt.unlink()
                    with contextlib.suppress(OSError):
                        self.txt.parent.rmdir()  # only when no rank left anything there
            self._stacks = None
        self.recorder.close()


def start(run_dir: Path, rank: int) -> FlightRecorder:
    global _current
    _current = FlightRecorder(run_dir, rank)
    return _current


def current() -> Flight:
    """The process's recorder, or one that records nothing when none was started."""
    return _current if _current is not None else Flight()


@contextlib.contextmanager
def waiting(what: str):
    """Marks a collective in the process's recorder (nothing when there is none)."""
    if _current is None:
        yield
    else:
        with _current.recorder.wait(what):
            yield
