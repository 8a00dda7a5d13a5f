"""log.profile_steps (pipeline/train/profile.py): where calls are cut and when the profiler
starts and stops, with a stand-in for TensorFlow's profiler API (the real one runs in
tests/train/test_train_e2e.py, which reads the trace it writes)."""

import pytest

from pipeline.config import ConfigError, profile_window
from pipeline.train.profile import ProfileHook


class Profiler:
    def __init__(self):
        self.calls = []

    def ProfilerOptions(self, **kw):
        return kw

    def start(self, logdir, options):
        self.calls.append(("start", logdir))

    def stop(self):
        self.calls.append(("stop",))


class State:
    step = 0


def drive(hook, calls):
    """Runs the hook through calls (first, last) as the loop would."""
    for first, last in calls:
        hook.on_call(first, last)
        hook.on_call_done(last)
    hook.on_end(State())


def test_calls_are_cut_around_the_window_and_the_trace_covers_it_only(tmp_path):
    p, said = Profiler(), []
    hook = ProfileHook((5, 8), tmp_path / "profile" / "rank-0", said.append, p)
    assert [k for k in range(1, 12) if hook.ends_call_after(k)] == [4, 8]
    drive(hook, [(1, 1), (2, 4)])
    assert p.calls == []
    hook.on_call(5, 8)
    assert p.calls == [("start", str(tmp_path / "profile" / "rank-0"))]
    hook.on_call_done(8)
    assert p.calls[-1] == ("stop",) and "steps 5-8 traced" in said[-1]
    drive(hook, [(9, 12)])
    assert len(p.calls) == 2


def test_a_window_of_several_calls_and_a_run_ending_inside_it(tmp_path):
    p = Profiler()
    hook = ProfileHook((3, 20), tmp_path, print, p)
    drive(hook, [(1, 2), (3, 10), (11, 14)])  # a stop signal after step 14
    assert [c[0] for c in p.calls] == ["start", "stop"]


def test_resumed_inside_the_window_traces_the_rest_and_a_window_never_reached_says_so(tmp_path):
    p = Profiler()
    drive(ProfileHook((5, 8), tmp_path, print, p), [(7, 8)])
    assert [c[0] for c in p.calls] == ["start", "stop"]
    p, said = Profiler(), []
    drive(ProfileHook((50, 60), tmp_path, said.append, p), [(1, 10)])
    assert p.calls == [] and "not run" in said[-1]


def test_the_window_is_read_or_refused_with_the_key_named():
    assert profile_window("") is None and profile_window("5-8") == (5, 8) and profile_window("3-3") == (3, 3)
    for bad in ("8-5", "0-3", "5", "a-b", "5-"):
        with pytest.raises(ConfigError, match="log.profile_steps"):
            profile_window(bad)
