"""The backstop: ends a rank whose Python threads stopped running while its process did not.

The watchdog (pipeline/runtime/preempt.py) is a Python thread: when C code holds the GIL (a
read from a hung file system inside h5py, a runaway regular expression) it cannot run, and
the rank would wait until the job's wall-time limit. So each rank has a small helper process
that the watchdog's tick feeds a heartbeat through a pipe, about once a second, with the
current horizon (the watchdog's timeout plus BACKSTOP_S). When no beat came for a horizon of
the helper's own running time, it sends the rank SIGABRT: faulthandler writes every thread's
stack into postmortem/rank-R.txt (or the job log before the run directory is known) and the
process ends.

A helper, not faulthandler's own timer (`dump_traceback_later`): that timer counts the time a
suspended job spends stopped (SIGSTOP, `scontrol suspend`, gang scheduling), so it would kill
every rank of a healthy job the moment it resumes after more than the horizon. The helper is
stopped with the rank when the whole job is, and leaves out the time it did not run itself.
A rank stopped alone (its helper still running) gets the SIGABRT only once it runs again.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time

# The helper's tick, and how much longer than one a tick must take for the helper to count
# itself stopped for that time (a suspended job).
TICK_S = 1.0
OWN_GAP_S = 1.0


class Backstop:
    """The rank's side: starts the helper (at `start()`, else at the first beat), feeds it,
    stops it on close."""

    def __init__(self, rank: int):
        self.rank = rank
        self._proc: subprocess.Popen | None = None
        self._w: int | None = None

    def start(self) -> None:
        """Starts the helper now: before the rank joins its job (a process started once MPI
        and its network stack are up is what some of them warn about)."""
        if self._proc is None:
            self._start()

    def beat(self, horizon_s: float) -> None:
        """This rank's Python still runs; end it if no beat comes for horizon_s (0: disarm)."""
        if self._proc is None:
            if horizon_s <= 0 or not self._start():
                return
        try:
            os.write(self._w, f"{horizon_s:.3f}\n".encode())
        except (BlockingIOError, BrokenPipeError, OSError):
            pass  # the helper is stopped or gone: the next beat tries again, nothing else waits

    def _start(self) -> bool:
        r, w = os.pipe()
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "pipeline.runtime.backstop", str(os.getpid()),
                                           str(self.rank)], stdin=r, stdout=subprocess.DEVNULL,
                                          close_fds=True, start_new_session=False)
        except OSError as e:
            os.close(r)
            os.close(w)
            print(f"rank {self.rank}: no backstop ({e})", file=sys.stderr, flush=True)
            return False
        os.close(r)
        os.set_blocking(w, False)
        self._w = w
        return True

    def close(self) -> None:
        if self._w is not None:
            with contextlib.suppress(OSError):
                os.close(self._w)  # the helper reads end-of-file and exits
            self._w = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None


def watch(fd: int, pid: int, rank: int) -> str:
    """The helper's loop: returns why it ended ("closed": the rank closed the pipe or ended;
    "fired": it sent SIGABRT)."""
    horizon, last, prev = 0.0, time.monotonic(), time.monotonic()
    buf = b""
    while True:
        ready, _, _ = select.select([fd], [], [], TICK_S)
        now = time.monotonic()
        if now - prev > TICK_S + OWN_GAP_S:
            last = now  # the helper itself did not run (the job was suspended): the rank's horizon starts again
        prev = now
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                return "closed"
            buf = (buf + chunk)[-64:]
            lines = buf.split(b"\n")
            buf = lines[-1]
            with contextlib.suppress(ValueError):
                horizon = float(lines[-2])
            last = now
        elif horizon > 0 and now - last > horizon:
            print(f"rank {rank} (pid {pid}): its Python threads have not run for {now - last:.0f}s while the process "
                  f"did (C code holding the GIL?); SIGABRT for every thread's stack (postmortem/rank-{rank}.txt)",
                  file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGABRT)
            return "fired"


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for the rank, not its helper
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    watch(0, int(sys.argv[1]), int(sys.argv[2]))
