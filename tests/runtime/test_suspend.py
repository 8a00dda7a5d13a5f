"""Suspension from outside, with real signals to real processes: a process stopped with
SIGSTOP and continued with SIGCONT (what `scontrol suspend`/`resume` and gang scheduling do
to every task of a job) is no stall for its watchdog nor for its backstop, while a process
stopped alone, its backstop's helper still running, is ended once it runs again. The rule that
tells a suspension from a busy or starved thread is tested on its own."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, env, wait_for

from pipeline.runtime.preempt import SUSPEND_MIN_S, suspension

# The child makes progress until its stdin gets a line, then prints what its watchdog saw.
CHILD = """
import json, select, sys, time
from pipeline.runtime import flight
from pipeline.runtime.preempt import Watchdog
f = flight.start(sys.argv[1], 0)
f.attach()
w = Watchdog(float(sys.argv[2]), rank=0, flight=f)
print("ready", flush=True)
while not select.select([sys.stdin], [], [], 0.1)[0]:
    w.progress()
sus = w.take_suspended()
w.close()
f.close()
print(json.dumps(sus), flush=True)
"""


def _start(tmp_path, timeout_s: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(timeout_s)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    assert p.stdout.readline().strip() == "ready"
    return p


def _helper(proc: subprocess.Popen) -> int:
    """The backstop's helper: the child's one child process (started at the first heartbeat)."""
    def child():  # a thread's children are listed under that thread's task
        kids = []
        for task in Path(f"/proc/{proc.pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids += (task / "children").read_text().split()
        return int(kids[0]) if kids else None
    return wait_for(child, "the backstop's helper to start", proc, timeout=20)


def _stop_for(pids: list[int], seconds: float) -> None:
    for p in pids:
        os.kill(p, signal.SIGSTOP)
    time.sleep(seconds)  # the length of the suspension itself, not a wait for something to happen
    for p in pids:
        os.kill(p, signal.SIGCONT)


def test_a_suspended_process_outlives_its_watchdog_and_backstop(tmp_path):
    """Watchdog timeout 2 s (backstop 32 s), the process and its helper stopped for 6 s (three
    timeouts) as a job's tasks are: no stall; one suspension recorded, and in the ring."""
    from pipeline.runtime import flight

    p = _start(tmp_path, 2.0)
    helper = _helper(p)
    t0 = time.time()
    _stop_for([p.pid, helper], 6.0)
    time.sleep(1.5)  # a few ticks of running again, for the watchdog to have looked
    out, err = p.communicate("done\n", timeout=60)
    assert p.returncode == 0, err
    # One suspension, found after the process ran again and no longer than it was away (what
    # the rule reports, bounded by the clock the test itself read: no speed is judged here).
    (resumed, gap), = json.loads(out)
    assert t0 < resumed <= time.time() and SUSPEND_MIN_S < gap <= resumed - t0, (resumed, gap, err)
    assert "not running for" in err and "deadlines move" in err
    header, events = flight.read_events(flight.events_path(tmp_path, 0))
    assert header["suspended_s"] == round(gap, 3)
    assert [e["kind"] for e in events].count("suspended") == 1


def test_the_backstop_does_not_count_the_time_its_job_was_suspended(tmp_path):
    """The watchdog off (timeout 0) leaves only the backstop; with a 1 s horizon fed by hand
    and both processes stopped for 5 s, the rank survives; stopped alone for 5 s while its
    helper runs, the rank gets SIGABRT and ends the moment it runs again."""
    code = ("import select, sys, time\n"
            "from pipeline.runtime import flight\n"
            "f = flight.start(sys.argv[1], 0)\n"
            "f.attach()\n"
            "f.heartbeat(1.0)\n"
            "print('ready', flush=True)\n"
            "while not select.select([sys.stdin], [], [], 0.1)[0]:\n"
            "    f.heartbeat(1.0)\n"
            "f.close()\n")
    for alone in (False, True):
        run = tmp_path / str(alone)
        p = subprocess.Popen([sys.executable, "-c", code, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
        assert p.stdout.readline().strip() == "ready"
        helper = _helper(p)
        _stop_for([p.pid] if alone else [p.pid, helper], 5.0)
        time.sleep(0.5)
        try:
            _, err = p.communicate("done\n", timeout=60)
        except BrokenPipeError:
            _, err = p.communicate(timeout=60)
        if alone:
            assert p.returncode == -signal.SIGABRT, err
            assert "its Python threads have not run for" in err
            assert "Fatal Python error: Aborted" in (run / "postmortem" / "rank-0.txt").read_text()
        else:
            assert p.returncode == 0, err


def test_what_counts_as_a_suspension():
    tick = 1.0
    assert suspension(35.0, tick, 0.01) == 34.0  # stopped: late, and almost no CPU time
    assert suspension(35.0, tick, 30.0) == 0.0  # late but busy: a thread kept from the GIL, not stopped
    assert suspension(tick + SUSPEND_MIN_S - 0.1, tick, 0.0) == 0.0  # a little late: scheduling noise
    assert suspension(1.02, tick, 0.0) == 0.0  # on time, idle (waiting in a collective)
