"""The flight recorder, post-mortems and the watchdog's bounds, in single processes: a ring
that outlives SIGKILL, a post-mortem write that a blocked file system cannot hold up, stacks
from faulthandler's own thread while the GIL is held, and `pipeline postmortem`'s rules on
rings written here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from conftest import ROOT, env, pipeline

from pipeline.analysis import postmortem
from pipeline.runtime import flight
from pipeline.runtime.preempt import Watchdog


def _child(code: str, run_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, env=env(),
                          cwd=ROOT, timeout=120)  # a hang guard


def test_the_ring_outlives_sigkill(tmp_path):
    r = _child("import os, signal, sys\n"
               "from pipeline.runtime import flight\n"
               "f = flight.start(sys.argv[1], 3)\n"
               "f.attach()\n"
               "f.event('phase', 'data', 41)\n"
               "with flight.waiting('broadcast x'):\n"
               "    os.kill(os.getpid(), signal.SIGKILL)\n", tmp_path)
    assert r.returncode == -9
    header, events = flight.read_events(flight.events_path(tmp_path, 3))
    assert header["rank"] == 3 and header["host"] == os.uname().nodename
    last = events[-1]
    assert (last["kind"], last["phase"], last["step"], last["waiting"], last["label"]) == \
        ("wait", "data", 41, True, "broadcast x")


def test_the_ring_keeps_the_newest_events_in_order(tmp_path):
    rec = flight.Recorder(tmp_path, 0, capacity=8)
    for step in range(1, 21):
        rec.event("call", "step", step)
    rec.close()
    _, events = flight.read_events(flight.events_path(tmp_path, 0))
    assert [e["step"] for e in events] == list(range(13, 21))


def test_a_blocked_file_system_cannot_hold_up_the_postmortem(tmp_path):
    """The json's temporary file is a FIFO nobody reads: opening it for writing blocks, as a
    hung NFS mount would. postmortem() still returns within its bound."""
    f = flight.start(tmp_path, 0)
    f.attach()
    try:
        os.mkfifo(f.json.with_name(f".{f.json.name}.tmp-{os.getpid()}"))
        assert f.postmortem("test", bound_s=0.5) is False  # returned, the write still blocked
        assert "test" in f.txt.read_text()  # the stacks were written before the blocked part
    finally:
        os.open(f.json.with_name(f".{f.json.name}.tmp-{os.getpid()}"), os.O_RDONLY | os.O_NONBLOCK)  # unblocks it
        f.close()


def test_stacks_are_written_while_the_gil_is_held(tmp_path):
    """A regular expression's catastrophic backtracking holds the GIL in C code: no Python
    thread runs, but the backstop's helper process sends SIGABRT and faulthandler writes every
    stack (pipeline/runtime/backstop.py)."""
    r = _child("import re, sys\n"
               "from pipeline.runtime import flight\n"
               "f = flight.start(sys.argv[1], 0)\n"
               "f.attach()\n"
               "f.heartbeat(1)\n"
               "re.match(r'(a+)+$', 'a' * 40 + 'b')\n", tmp_path)
    assert r.returncode == -signal.SIGABRT, r.stderr
    assert "its Python threads have not run for" in r.stderr
    stacks = (tmp_path / "postmortem" / "rank-0.txt").read_text()
    assert "Fatal Python error: Aborted" in stacks and "<module>" in stacks


def test_the_stop_bound_fires_and_a_completed_stop_disarms_it():
    fired = threading.Event()
    w = Watchdog(0, rank=0, on_stall=lambda idle: fired.set() if idle < 0 else None, flight=flight.Flight())
    w.stopping(0.2)
    assert fired.wait(10), "the stop bound did not fire"  # a hang guard; the rule is tested below
    w.close()
    fired.clear()
    w = Watchdog(0, rank=0, on_stall=lambda idle: fired.set(), flight=flight.Flight())
    w.stopping(1.0)
    w.stopped()
    assert not fired.wait(2.5)  # more than one tick of the watchdog past the bound
    w.close()


def _ring(run, rank, *events, pid=None, host="h"):
    rec = flight.Recorder(run, rank)
    rec.host = host
    for kind, phase, step, waiting in events:
        rec.event(kind, phase, step, waiting=waiting)
    rec.close()
    return rec


def _pm(run, rank, reason, exception=None, t=None):
    d = run / "postmortem"
    d.mkdir(exist_ok=True)
    header, _ = flight.read_events(flight.events_path(run, rank))
    (d / f"rank-{rank}.json").write_text(json.dumps(
        {"rank": rank, "host": header["host"], "pid": header["pid"], "reason": reason, "time": t or time.time(),
         "exception": exception}))


def test_rules_the_rank_outside_a_collective_stopped_first(tmp_path):
    _ring(tmp_path, 0, ("call", "step", 7, "call of steps 7-38"))
    _ring(tmp_path, 1, ("phase", "data", 9, ""))
    _ring(tmp_path, 2, ("call", "step", 7, "call of steps 7-38"))
    for r in range(3):
        _pm(tmp_path, r, "stalled")
    res = postmortem.analyze(tmp_path)
    assert (res["first"]["rank"], res["first"]["phase"], res["first"]["step"]) == (1, "data", 9)
    assert res["ranks"][0]["waiting"] == "call of steps 7-38"


def test_rules_the_first_exception_by_time_wins(tmp_path):
    for r in range(2):
        _ring(tmp_path, r, ("call", "step", 5, "call of steps 5-9"))
    _pm(tmp_path, 0, "raised HorovodInternalError", {"type": "HorovodInternalError", "message": "shut down",
                                                      "traceback": "tb0"}, t=200.0)
    _pm(tmp_path, 1, "raised ValueError", {"type": "ValueError", "message": "bad", "traceback": "tb1"}, t=100.0)
    res = postmortem.analyze(tmp_path)
    assert res["first"]["rank"] == 1 and res["first_exception"]["type"] == "ValueError"


def test_rules_a_silent_rank_a_missing_rank_and_a_collective_hang(tmp_path):
    # Rank 1 waited like rank 0 but left no post-mortem (SIGKILL, SIGSTOP): it stopped first.
    a = tmp_path / "a"
    _ring(a, 0, ("call", "step", 5, "call of steps 5-9"))
    _ring(a, 1, ("call", "step", 5, "call of steps 5-9"))
    _pm(a, 0, "stalled")
    assert postmortem.analyze(a)["first"]["rank"] == 1
    # config.json says 3 ranks; rank 2 never started its recorder.
    b = tmp_path / "b"
    _ring(b, 0, ("wait", "init", 0, "hvd.init"))
    _ring(b, 1, ("wait", "init", 0, "hvd.init"))
    (b / "config.json").write_text(json.dumps({"ranks": 3}))
    res = postmortem.analyze(b)
    assert res["first"]["rank"] == 2 and res["ranks"][2]["left"] == "nothing"
    # Every rank reported from inside the same collective: nobody to blame, say so.
    c = tmp_path / "c"
    for r in range(2):
        _ring(c, r, ("call", "step", 5, "call of steps 5-9"))
        _pm(c, r, "stalled")
    res = postmortem.analyze(c)
    assert res["first"] is None and "inside it" in res["reason"]


def test_postmortem_of_a_missing_run_is_a_user_error(tmp_path):
    r = pipeline("postmortem", tmp_path / "nope")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nope" in r.stderr


def test_a_bad_debug_fault_is_a_user_error(tmp_path):
    r = pipeline("train", "--run-dir", tmp_path / "run", "--set", "debug.fault=rank=1,step=3,phase=disk,kind=hang")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "debug.fault: phase must be one of" in r.stderr
    assert not (tmp_path / "run").exists()


def _beating(run, rank, beat, gap=None, pm_at=None):
    """A rank's ring waiting in the call of step 35, its heartbeat last at `beat`, and a
    suspension (seconds, resumed at) it found on waking; a post-mortem written at `pm_at`."""
    rec = flight.Recorder(run, rank)
    rec.host = "h"
    rec.event("call", "step", 35, waiting="call of steps 35-66")
    if gap:
        rec.suspended(*gap)
    rec.beat(beat)
    rec.close()
    if pm_at:
        _pm(run, rank, "stalled", t=pm_at)


def test_rules_the_rank_that_stopped_running_while_its_peers_went_on(tmp_path):
    t = 1_800_000_000.0
    # Rank 1 frozen at t, woken by mpirun's teardown at t + 21 (SIGCONT, then SIGTERM): it wrote
    # a post-mortem too, but its own ring says it did not run from t to t + 21.
    a = tmp_path / "a"
    _beating(a, 0, t + 21, pm_at=t + 21)
    _beating(a, 1, t + 21.5, gap=(21.0, t + 21), pm_at=t + 21.5)
    res = postmortem.analyze(a)
    assert res["first"]["rank"] == 1 and res["first"]["reason"].startswith("stopped running at "), res["lines"]
    assert "21s before its peers gave up" in res["first"]["reason"] and "not waiting" in res["first"]["reason"]
    # Rank 1 frozen and never woken (killed while stopped): its heartbeat ends at t, no post-mortem.
    b = tmp_path / "b"
    _beating(b, 0, t + 21, pm_at=t + 21)
    _beating(b, 1, t)
    res = postmortem.analyze(b)
    assert res["first"]["rank"] == 1 and "left no post-mortem" in res["first"]["reason"], res["lines"]
    # The whole job suspended (every rank the same gap), then a real hang: nobody is blamed for the gap.
    c = tmp_path / "c"
    for r in range(2):
        _beating(c, r, t + 60, gap=(30.0, t + 30), pm_at=t + 60)
    res = postmortem.analyze(c)
    assert res["first"] is None and "inside it" in res["reason"]
