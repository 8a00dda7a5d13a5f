"""The loop's hook protocol (pipeline/runtime/hooks.py) with the real parts behind the hooks:
a real flight recorder (in memory), a real watchdog (no timeout, no thread), a real fault."""

import pytest

from pipeline import faultspec
from pipeline.runtime.flight import FlightRecorder
from pipeline.runtime.hooks import FaultHook, FlightHook, Hook, Hooks, WatchdogHook
from pipeline.runtime.preempt import Watchdog


class Said(Hook):
    def __init__(self, name, said, reason=None):
        self.name, self.said, self.reason = name, said, reason

    def on_phase(self, phase, step):
        self.said.append((self.name, phase, step))

    def on_eval(self, record):
        self.said.append((self.name, "eval", record["step"]))
        return self.reason


def test_hooks_are_called_in_order_and_every_one_hears_an_evaluation():
    said = []
    hooks = Hooks([Said("a", said), None, Said("b", said, reason="target met"), Said("c", said, reason="other")])
    hooks.on_phase("data", 3)
    assert hooks.on_eval({"step": 5}) == "target met"
    assert said == [("a", "data", 3), ("b", "data", 3), ("c", "data", 3), ("a", "eval", 5), ("b", "eval", 5),
                    ("c", "eval", 5)]
    assert not Hooks([Said("a", said)]).ends_call_after(4)


def test_a_fault_splits_its_own_ranks_calls_and_fires_where_due():
    fault = faultspec.parse("rank=1,step=20,phase=data,kind=raise")
    mine, other = FaultHook(fault, 1, None), FaultHook(fault, 0, None)
    assert [k for k in range(1, 40) if mine.ends_call_after(k)] == [19]
    assert not any(other.ends_call_after(k) for k in range(1, 40))
    mine.on_phase("data", 19)
    mine.on_phase("eval", 20)
    other.on_phase("data", 20)
    with pytest.raises(RuntimeError, match="rank 1 raised on purpose in data at step 20"):
        mine.on_phase("data", 20)


def test_the_recorder_hears_where_the_rank_waits(tmp_path):
    rec = FlightRecorder(tmp_path / "run", 0)  # in memory: never attached
    try:
        hook = FlightHook(rec)
        hook.on_phase("data", 1)
        hook.on_phase("allreduce", 1)  # said by the call's event
        hook.on_call(1, 5)
        assert rec.state()["waiting"] == "call of steps 1-5"
        hook.on_call_done(5)
        assert rec.state()["waiting"] is None and rec.state()["step"] == 5
        kinds = [e["kind"] for e in rec.recorder.events()]
        assert kinds[-3:] == ["phase", "call", "done"]

        class State:
            flight_s = None

        s = State()
        hook.on_end(s)
        assert s.flight_s >= 0
    finally:
        rec.close()
    assert not (tmp_path / "run").exists()


def test_the_watchdog_moves_from_startup_to_step_timeout_at_the_first_call():
    dog = Watchdog(0, rank=0, what="startup")  # 0: no timeout, so no thread to fire
    try:
        hook = WatchdogHook(dog, step_timeout_s=300.0, stop_timeout_s=20.0)
        assert dog.what == "startup"
        hook.on_call_done(1)
        assert (dog.what, dog.timeout_s) == ("step", 300.0)
        dog.arm(0, "later")
        hook.on_call_done(2)  # armed once only
        assert dog.what == "later"
    finally:
        dog.close()
