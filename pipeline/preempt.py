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

EXIT_OK = 0
EXIT_FAILED = 1  # e.g. a checkpoint could not be written (disk full); earlier checkpoints are intact
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped on a signal after a complete checkpoint; run again to resume
EXIT_STALLED = 76  # no step finished within train.step_timeout_s: a peer rank died or hangs

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """Installs handlers that record the first stop signal; restores the old ones on close.

    With `on_signal`, a thread also learns of each signal the moment it arrives (through
    Python's wakeup fd) and calls `on_signal()` there: Python runs its own handlers only
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
                on_signal()

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
    """Ends the process when no step finishes for `timeout_s`: a rank whose peer died would
    otherwise wait in the allreduce until the job's wall-time limit."""

    def __init__(self, timeout_s: float, rank: int, on_stall=None):
        self.timeout_s = timeout_s
        self.rank = rank
        self._last = time.monotonic()
        self._done = threading.Event()
        self._on_stall = on_stall or self._exit
        self._thread = threading.Thread(target=self._run, name="step-watchdog", daemon=True)
        if timeout_s > 0:
            self._thread.start()

    def progress(self) -> None:
        self._last = time.monotonic()

    def _run(self) -> None:
        while not self._done.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self._on_stall(idle)
                return

    def _exit(self, idle: float) -> None:
        print(f"rank {self.rank}: no step finished for {idle:.0f}s (train.step_timeout_s={self.timeout_s:g}); "
              f"a peer rank probably died. Exiting {EXIT_STALLED}; resume from the last complete checkpoint.",
              file=sys.stderr, flush=True)
        os._exit(EXIT_STALLED)

    def close(self) -> None:
        self._done.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()  # returns at once: the wait above wakes on the event

    def __enter__(self) -> "Watchdog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
