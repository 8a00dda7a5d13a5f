"""Stopping cleanly: preemption signals, the exit codes a scheduler acts on, and a watchdog.

SIGTERM, SIGUSR1 or SIGINT on any rank sets a local flag; the flag rides along with the
step's gradient allreduce, so every rank learns of it at the same step boundary without an
extra collective. Rank 0 then writes a checkpoint and every rank exits EXIT_REQUEUE.
A handler only sets the flag, so a second signal during the save changes nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from pipeline.errors import EXIT_STALLED, EXIT_STOP_INCOMPLETE

# When Python itself cannot run for the watchdog's timeout plus this long (the GIL held in C
# code), the backstop's helper has faulthandler write the stacks (pipeline/runtime/backstop.py).
BACKSTOP_S = 30.0
# A watchdog tick this much later than due, while the process's CPU time grew by less than a
# tenth of the gap, means the process itself did not run: suspended (SIGSTOP, `scontrol
# suspend`, gang scheduling), frozen or starved. A thread merely kept from the GIL is not.
SUSPEND_MIN_S = 2.0


def suspension(gap_s: float, tick_s: float, cpu_s: float) -> float:
    """How long the process did not run between two watchdog ticks gap_s apart (due every
    tick_s) during which it used cpu_s of CPU time; 0.0 when it ran."""
    late = gap_s - tick_s
    return late if late > SUSPEND_MIN_S and cpu_s < gap_s / 10 else 0.0

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """Installs handlers that record the first stop signal; restores the old ones on close.

    With `on_signal`, a thread also learns of each signal the moment it arrives (through
    Python's wakeup fd) and calls `on_signal(signum)` there, with the first stop signal's
    number: Python runs its own handlers only
    between bytecodes of the main thread, which may be inside a compiled call of many steps.
    The training loop uses it to set the stop flag that each step of that call reads.
    """

    def __init__(self, rank: int, signals=SIGNALS, on_signal=None):
        self.rank = rank
        self.signum: int | None = None
        self.time: float | None = None  # wall clock of the first signal, to time the stop
        self._lock = threading.Lock()
        self._signals = set(signals)
        self._old = {s: signal.signal(s, self._handle) for s in signals}
        self._watcher = None
        if on_signal is not None:
            r, w = os.pipe()
            os.set_blocking(w, False)  # the C-level handler must never block
            self._wakeup = (r, w, signal.set_wakeup_fd(w, warn_on_full_buffer=False))
            self._watcher = threading.Thread(target=self._watch, args=(r, on_signal), name="stop-signals",
                                             daemon=True)
            self._watcher.start()

    def _handle(self, signum, frame) -> None:
        self._record(signum)

    def _record(self, signum: int) -> None:
        with self._lock:
            if self.signum is not None:
                return
            self.signum, self.time = signum, time.time()
        print(f"rank {self.rank}: {signal.Signals(signum).name} received; stopping at the next step boundary",
              file=sys.stderr, flush=True)

    def _watch(self, fd: int, on_signal) -> None:
        while True:
            try:
                got = os.read(fd, 64)
            except OSError:
                return
            if not got:
                return  # close() closed the write end
            mine = [s for s in got if s in self._signals]
            if mine:
                self._record(mine[0])
                on_signal(self.signum)

    def close(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}
        if self._watcher is not None:
            r, w, old_fd = self._wakeup
            signal.set_wakeup_fd(old_fd)
            os.close(w)
            self._watcher.join()
            os.close(r)
            self._watcher = None

    def __enter__(self) -> "StopSignals":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Watchdog:
    """Ends the process when it makes no progress for `timeout_s`: a rank whose peer died
    would otherwise wait in a collective until the job's wall-time limit.

    It runs from the first instant of a run: `arm()` switches it from the start-up timeout to
    the step timeout once the first call of steps is done. After a stop signal, `stopping()`
    also bounds the collective part of the stop (every rank must end its call at the same
    step): a peer that is gone cannot take part, and the rank exits EXIT_STOP_INCOMPLETE.
    When it fires, the flight recorder (if any) writes the rank's post-mortem first.

    A suspension (the process did not run at all for a while: `suspension()`) is no stall:
    every deadline moves by its length, the flight recorder notes it, and `take_suspended()`
    hands it to the step log. A rank frozen alone is still caught: its peers' deadlines do not
    move. Each tick stamps the flight recorder's heartbeat.
    """

    def __init__(self, timeout_s: float, rank: int, on_stall=None, what: str = "step", flight=None):
        self.timeout_s, self.what = timeout_s, what
        self.rank = rank
        self.flight = flight
        self._last = time.monotonic()
        self._deadline: float | None = None
        self._stop_bound = 0.0
        self._done = threading.Event()
        self._suspended: list[tuple[float, float]] = []  # (wall clock when it ran again, seconds)
        self._lock = threading.Lock()
        self._on_stall = on_stall or self._exit
        self._thread = threading.Thread(target=self._run, name="step-watchdog", daemon=True)
        if timeout_s > 0 or flight is not None:
            self._thread.start()

    def arm(self, timeout_s: float, what: str) -> None:
        self.timeout_s, self.what = timeout_s, what
        self.progress()

    def progress(self) -> None:
        self._last = time.monotonic()

    def stopping(self, bound_s: float) -> None:
        """A stop signal arrived: the stop's collective part must end within bound_s."""
        if bound_s > 0 and self._deadline is None:
            self._stop_bound = bound_s
            self._deadline = time.monotonic() + bound_s

    def stopped(self) -> None:
        """Every rank ended its call at the same step: the collective part of the stop is done."""
        self._deadline = None

    def take_suspended(self) -> list[tuple[float, float]]:
        """The suspensions since the last call: (wall clock when the rank ran again, seconds)."""
        with self._lock:
            out, self._suspended = self._suspended, []
        return out

    def _resume(self, gap: float, now: float) -> None:
        # The time not running does not count, but never past now: progress made since it ran
        # again (a call that ended at once) must not buy the next stall extra time.
        self._last = min(self._last + gap, now)
        if self._deadline is not None:
            self._deadline = min(self._deadline + gap, now + self._stop_bound)
        resumed = time.time()
        with self._lock:
            self._suspended.append((resumed, gap))
        if self.flight is not None:
            self.flight.suspended(gap, resumed)
        print(f"rank {self.rank}: not running for {gap:.0f}s (suspended, stopped or starved); the watchdog's "
              f"deadlines move by as much", file=sys.stderr, flush=True)

    def _tick_s(self) -> float:
        return min(1.0, self.timeout_s / 4) if self.timeout_s > 0 else 1.0

    def _run(self) -> None:
        prev, cpu0 = time.monotonic(), time.process_time()
        while not self._done.wait(tick := self._tick_s()):
            now, cpu = time.monotonic(), time.process_time()
            gap = suspension(now - prev, tick, cpu - cpu0)
            prev, cpu0 = now, cpu
            if gap:
                self._resume(gap, now)
            if self._deadline is not None and now > self._deadline:
                self._on_stall(-1.0)
                return
            idle = now - self._last
            if self.timeout_s > 0 and idle > self.timeout_s:
                self._on_stall(idle)
                return
            if self.flight is not None:
                self.flight.heartbeat(self.timeout_s + BACKSTOP_S if self.timeout_s > 0 else 0.0)

    def _exit(self, idle: float) -> None:
        where = ""
        if self.flight is not None:
            st = self.flight.state()
            where = (f" on {st['host']}, in phase {st['phase']} at step {st['step']}"
                     + (f" waiting in {st['waiting']}" if st["waiting"] else ""))
        if idle < 0:
            code = EXIT_STOP_INCOMPLETE
            why = (f"a stop signal arrived but the ranks did not end their step together within "
                   f"{self._stop_bound:g}s (train.stop_timeout_s): a peer rank is gone")
        else:
            code = EXIT_STALLED
            key = "train.startup_timeout_s" if self.what == "startup" else "train.step_timeout_s"
            why = f"no {self.what} progress for {idle:.0f}s ({key}={self.timeout_s:g}); a peer rank probably died or hangs"
        if self.flight is not None:
            self.flight.event("stall", label=f"exit {code}")
            self.flight.postmortem(why, exit_code=code)
            where += f"; post-mortem in {self.flight.json.parent}"
        print(f"rank {self.rank}{where}: {why}. Exiting {code}; run `pipeline postmortem RUN_DIR`, then resume "
              f"from the last complete checkpoint.", file=sys.stderr, flush=True)
        os._exit(code)

    def close(self) -> None:
        self._done.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()  # returns at once: the wait above wakes on the event

    def __enter__(self) -> "Watchdog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
