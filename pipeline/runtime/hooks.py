"""The training loop's side concerns as hooks (docs/architecture.md, "The loop's hooks").

The loop (pipeline/train/trainer.py `loop`) runs calls of compiled steps, evaluates and saves;
everything else hears of it through this protocol, in the order the hooks were given: the
flight recorder, the watchdog and debug.fault here; MLPerf logging (pipeline/mlperf/hook.py);
progress and TensorBoard (pipeline/train/writers.py). Every method of `Hook` does nothing, so
a hook writes only what it needs.

A hook may also end a call early (`ends_call_after`), add fields to the step records before
the step log writes them (`on_steps`), and end the run after an evaluation (`on_eval` returns
the line that says why). `on_signal` runs on the signal thread, the moment a stop signal
arrives, while the main thread may be inside a call of many steps.
"""

from __future__ import annotations

from pipeline.runtime import fault as fault_mod


class Hook:
    def ends_call_after(self, step: int) -> bool:
        """True: a call of steps must end after `step` (its rank only)."""
        return False

    def on_start(self, start_step: int) -> None:
        """The loop begins after `start_step` (0, or the step resumed after)."""

    def on_phase(self, phase: str, step: int) -> None:
        """The rank is about to do `phase` for `step`: data (get the call's batches), allreduce
        (run the call: its steps' allreduces), eval, checkpoint, stop (every rank ended its
        call at `step` on a stop signal)."""

    def on_call(self, first: int, last: int) -> None:
        """A call of steps first..last is about to run."""

    def on_call_done(self, last: int) -> None:
        """The call ended after step `last`."""

    def on_steps(self, records: list[dict]) -> None:
        """The call's step records, before the step log writes them (fields may be added)."""

    def on_epoch_end(self, epoch: int) -> None:
        """The last step of `epoch` (or of the run) is done."""

    def on_eval(self, record: dict) -> str | None:
        """An evaluation's record (metrics.jsonl); a line saying why the run ends here, or None."""
        return None

    def on_signal(self, signum: int) -> None:
        """A stop signal arrived (on the signal thread)."""

    def on_stop(self, step: int) -> None:
        """The ranks stopped together at `step` on a signal and rank 0's checkpoint is complete."""

    def on_end(self, state) -> None:
        """The loop is over; `state` is its LoopState (a hook may record its own cost there)."""


class Hooks(Hook):
    """Several hooks as one, each called in turn."""

    def __init__(self, hooks):
        self.hooks = [h for h in hooks if h is not None]

    def ends_call_after(self, step: int) -> bool:
        return any(h.ends_call_after(step) for h in self.hooks)

    def on_start(self, start_step: int) -> None:
        for h in self.hooks:
            h.on_start(start_step)

    def on_phase(self, phase: str, step: int) -> None:
        for h in self.hooks:
            h.on_phase(phase, step)

    def on_call(self, first: int, last: int) -> None:
        for h in self.hooks:
            h.on_call(first, last)

    def on_call_done(self, last: int) -> None:
        for h in self.hooks:
            h.on_call_done(last)

    def on_steps(self, records: list[dict]) -> None:
        for h in self.hooks:
            h.on_steps(records)

    def on_epoch_end(self, epoch: int) -> None:
        for h in self.hooks:
            h.on_epoch_end(epoch)

    def on_eval(self, record: dict) -> str | None:
        reasons = [h.on_eval(record) for h in self.hooks]
        return next((r for r in reasons if r), None)

    def on_signal(self, signum: int) -> None:
        for h in self.hooks:
            h.on_signal(signum)

    def on_stop(self, step: int) -> None:
        for h in self.hooks:
            h.on_stop(step)

    def on_end(self, state) -> None:
        for h in self.hooks:
            h.on_end(state)


class FaultHook(Hook):
    """debug.fault: fires where it is due, and splits its own rank's calls so that the fault's
    step starts one (pipeline/faultspec.py). Before the recorder's hook, so the recorder shows
    the phase the fault fired in."""

    def __init__(self, fault, rank: int, flight):
        self.fault, self.rank, self.flight = fault, rank, flight

    def ends_call_after(self, step: int) -> bool:
        return self.fault.splits_before(self.rank) == step

    def on_phase(self, phase: str, step: int) -> None:
        if self.fault.due(self.rank, phase, step):
            fault_mod.fire(self.fault, self.rank, step, self.flight)


class FlightHook(Hook):
    """The flight recorder hears of each phase and call (whether the rank waits in a
    collective), leaves a post-mortem the moment a stop signal arrives (a launcher ending the
    job after another rank died sends SIGKILL soon after its SIGTERM) and discards it when the
    stop completes. Its own cost is part of the step log's."""

    def __init__(self, flight):
        self.flight = flight
        self._cost0 = flight.cost_s

    def on_phase(self, phase: str, step: int) -> None:
        if phase != "allreduce":  # the call's event below says it waits
            self.flight.event("phase", phase, step, waiting="")

    def on_call(self, first: int, last: int) -> None:
        self.flight.event("call", "step", first, waiting=f"call of steps {first}-{last}")

    def on_call_done(self, last: int) -> None:
        self.flight.event("done", step=last, waiting="")

    def on_signal(self, signum: int) -> None:
        name = signal_name(signum) or "a stop signal"
        self.flight.event("signal", label=name)
        self.flight.postmortem(f"{name} received; stopping at the next step boundary", bound_s=5.0)

    def on_stop(self, step: int) -> None:
        self.flight.discard()  # stopped as asked: the post-mortem written at the signal is moot

    def on_end(self, state) -> None:
        state.flight_s = self.flight.cost_s - self._cost0


class WatchdogHook(Hook):
    """The watchdog: on the start-up timeout until the first call is done, then on
    train.step_timeout_s; after a stop signal it bounds the collective part of the stop
    (train.stop_timeout_s) until every rank ended its call at the same step."""

    def __init__(self, watchdog, step_timeout_s: float, stop_timeout_s: float):
        self.watchdog, self.step_timeout_s, self.stop_timeout_s = watchdog, step_timeout_s, stop_timeout_s
        self._first = True
        self._pending: list[tuple[float, float]] = []

    def on_call_done(self, last: int) -> None:
        if self._first:
            self.watchdog.arm(self.step_timeout_s, "step")  # start-up ends with the first call
            self._first = False
        self.watchdog.progress()

    def on_signal(self, signum: int) -> None:
        self.watchdog.stopping(self.stop_timeout_s)

    def on_steps(self, records: list[dict]) -> None:
        """A suspension goes on the step that was running when the rank ran again (the first
        that ended after it): `suspended_s`, which `pipeline analyze` leaves out of its figures."""
        self._pending += self.watchdog.take_suspended()
        keep = []
        for resumed, gap in self._pending:
            hit = next((r for r in records if r["time"] >= resumed - 1.0), None)
            if hit is None:
                keep.append((resumed, gap))
            else:
                hit["suspended_s"] = round(hit.get("suspended_s", 0.0) + gap, 3)
        self._pending = keep

    def on_phase(self, phase: str, step: int) -> None:
        if phase == "stop":
            self.watchdog.stopped()  # every rank ended its call here: the rest is the save


def signal_name(signum) -> str | None:
    import signal

    return signal.Signals(signum).name if signum else None
