"""Faults on purpose (debug.fault) in real 2-rank runs under mpirun: every process ends with
the documented exit code, a hang ended by the watchdog at its configured timeout (what that
takes here is measured in docs/troubleshooting.md, not asserted), and `pipeline postmortem
--json` names the rank, host, phase and step where it stopped.

One case runs its ranks on two simulated hosts: each rank in its own UTS namespace with its
own host name (a second machine cannot run here; MPI still sees one node).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, env, pipeline, rank_pid, require_root, require_tool, start, steps_done, wait_for

from pipeline.errors import EXIT_FAULT, EXIT_STALLED, EXIT_STOP_INCOMPLETE
from pipeline.runtime import flight

STEP_TIMEOUT = 10
STARTUP_TIMEOUT = 30  # long enough that the healthy rank is surely in hvd.init by then


def _args(data, run, fault, *extra):
    return ["train", "--run-dir", run, "--set", f"data.dir={data}", "--set", "train.batch_size=32",
            "--set", f"train.step_timeout_s={STEP_TIMEOUT}", "--set", f"train.startup_timeout_s={STARTUP_TIMEOUT}",
            "--set", "checkpoint.every_steps=10", "--set", "log.progress_every_s=3600",
            "--set", f"debug.fault={fault}", *extra]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")  # a zombie has ended
    except OSError:
        return True


def _postmortem(run: Path) -> dict:
    r = pipeline("postmortem", run, "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _run(cmd: list) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, stdin=subprocess.DEVNULL,
                          timeout=600)  # a hang guard: what the test asserts is below


def _stalled_by_the_watchdog(run: Path, rank: int, key: str, timeout: int) -> None:
    """The rank's post-mortem says its watchdog ended it, at the configured timeout."""
    pm = json.loads((run / "postmortem" / f"rank-{rank}.json").read_text())
    assert pm["exit_code"] == EXIT_STALLED and f"({key}={timeout})" in pm["reason"], pm["reason"]


# (fault, the mpirun exit code the docs promise, the phase and step postmortem must name;
# step None: the first evaluation's step, from config.json)
# The second stack (make test-stack2) runs a hang and an exit.
ON_STACK2 = pytest.mark.stack2
CASES = [
    ("rank=1,step=20,phase=data,kind=hang", EXIT_STALLED, "data", 20),
    pytest.param("rank=1,step=20,phase=allreduce,kind=hang", EXIT_STALLED, "allreduce", 20, marks=ON_STACK2),
    ("rank=1,step=1,phase=eval,kind=hang", EXIT_STALLED, "eval", None),
    ("rank=0,step=20,phase=checkpoint,kind=hang", EXIT_STALLED, "checkpoint", 20),
    pytest.param("rank=1,step=20,phase=data,kind=exit", EXIT_FAULT, "data", 20, marks=ON_STACK2),
    ("rank=1,step=20,phase=allreduce,kind=raise", 1, "allreduce", 20),
    ("rank=1,phase=startup,kind=hang", EXIT_STALLED, "startup", 0),
]


@pytest.mark.mpi
@pytest.mark.parametrize("fault,code,phase,step", CASES,
                         ids=[(c.values if hasattr(c, "values") else c)[0].split(",", 1)[1] for c in CASES])
def test_a_fault_ends_every_rank_in_bounded_time_and_postmortem_names_it(tmp_path, small_dataset, fault, code,
                                                                        phase, step):
    run = tmp_path / "run"
    mpi = require_tool("mpirun")
    r = _run([mpi, "-np", "2", sys.executable, "-m", "pipeline", *map(str, _args(small_dataset, run, fault))])
    assert r.returncode == code, r.stdout + r.stderr
    rank = int(fault.split(",")[0].split("=")[1])
    if code == EXIT_STALLED:
        key, timeout = ("train.startup_timeout_s", STARTUP_TIMEOUT) if phase == "startup" else \
            ("train.step_timeout_s", STEP_TIMEOUT)
        _stalled_by_the_watchdog(run, rank, key, timeout)
    for other in (0, 1):
        header, _ = flight.read_events(flight.events_path(run, other))
        assert _gone(header["pid"]), f"rank {other} (pid {header['pid']}) still runs"
    if step is None:
        step = json.loads((run / "config.json").read_text())["steps_per_epoch"]
    pm = _postmortem(run)
    assert pm["first"]["rank"] == rank and (pm["first"]["phase"], pm["first"]["step"]) == (phase, step), pm["lines"]
    assert pm["first"]["host"] == os.uname().nodename
    if "kind=raise" in fault:
        assert pm["first_exception"]["rank"] == rank and "raised on purpose" in pm["first_exception"]["traceback"]
    if "kind=hang" in fault:
        # The hung rank's own post-mortem: every thread's stack, the main one stuck in the fault.
        assert "in fire" in (run / "postmortem" / f"rank-{rank}.txt").read_text()
    if phase == "data" and "kind=hang" in fault:
        a = pipeline("analyze", run, "--json", timeout=120)
        assert a.returncode == 0, a.stderr
        assert json.loads(a.stdout)["runs"][0]["postmortem"]["first"] == pm["first"]


@pytest.mark.mpi
@pytest.mark.multinode
def test_postmortem_names_the_host_on_two_simulated_hosts(tmp_path, small_dataset):
    require_root("UTS namespaces (a host name per rank)", "multinode")
    run = tmp_path / "run"
    mpi, unshare = require_tool("mpirun"), require_tool("unshare")
    argv = " ".join(map(str, [sys.executable, "-m", "pipeline",
                              *_args(small_dataset, run, "rank=1,step=20,phase=data,kind=hang")]))
    cmd = [mpi, "-np", "1", unshare, "-u", "sh", "-c", f"hostname sim-a && exec {argv}",
           ":", "-np", "1", unshare, "-u", "sh", "-c", f"hostname sim-b && exec {argv}"]
    r = _run(cmd)
    assert r.returncode == EXIT_STALLED, r.stdout + r.stderr
    _stalled_by_the_watchdog(run, 1, "train.step_timeout_s", STEP_TIMEOUT)
    pm = _postmortem(run)
    assert {k: pm["first"][k] for k in ("rank", "host", "phase", "step")} == \
        {"rank": 1, "host": "sim-b", "phase": "data", "step": 20}
    assert pm["ranks"][0]["host"] == "sim-a" and pm["ranks"][0]["waiting"].startswith("call of steps")


@pytest.mark.mpi
def test_sigterm_with_a_hung_peer_exits_77_within_the_stop_bound(tmp_path, small_dataset):
    """SIGTERM asks for a collective stop; a peer that cannot take part (hung here) must not
    keep the rank waiting: after train.stop_timeout_s it writes its post-mortem and exits 77."""
    run = tmp_path / "run"
    mpi = require_tool("mpirun")
    args = _args(small_dataset, run, "rank=1,step=20,phase=data,kind=hang", "--set", "train.stop_timeout_s=3")
    args[args.index(f"train.step_timeout_s={STEP_TIMEOUT}")] = "train.step_timeout_s=300"
    proc = subprocess.Popen([mpi, "-np", "2", sys.executable, "-m", "pipeline", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 300  # a hang guard
    while time.monotonic() < deadline and proc.poll() is None:
        ring = flight.read_events(flight.events_path(run, 1))
        if ring and any(e["kind"] == "fault" for e in ring[1]):
            break
        time.sleep(0.1)  # polling an observable condition
    assert proc.poll() is None, proc.communicate()
    header, _ = flight.read_events(flight.events_path(run, 0))
    os.kill(header["pid"], signal.SIGTERM)
    out, err = proc.communicate(timeout=300)  # a hang guard: the step timeout is 300 s
    assert proc.returncode == EXIT_STOP_INCOMPLETE, out + err
    pm = json.loads((run / "postmortem" / "rank-0.json").read_text())
    assert pm["exit_code"] == EXIT_STOP_INCOMPLETE and "within 3s (train.stop_timeout_s)" in pm["reason"]
    assert _postmortem(run)["first"]["rank"] == 1


@pytest.mark.mpi
def test_a_rank_stopped_from_outside_is_named_as_the_one_that_stopped_running(tmp_path, small_dataset):
    """SIGSTOP to rank 1 alone, from outside the project (as a cgroup freeze, a stray `kill
    -STOP` or a swapped-out node does): rank 0's watchdog ends the job at train.step_timeout_s,
    and `pipeline postmortem` names rank 1 by its heartbeat, which stopped while rank 0's went
    on, whether or not mpirun's teardown woke it to write a post-mortem of its own."""
    run = tmp_path / "run"
    proc = start(2, *_args(small_dataset, run, "", "--set", "train.max_steps=100000"))  # no debug.fault
    wait_for(lambda: steps_done(run, 1) > 40 and rank_pid(run, 1), "rank 1's first steps", proc)
    os.kill(rank_pid(run, 1), signal.SIGSTOP)
    out, err = proc.communicate(timeout=10 * STEP_TIMEOUT)  # a safety net: the job must end by itself
    assert proc.returncode == EXIT_STALLED, out + err
    _stalled_by_the_watchdog(run, 0, "train.step_timeout_s", STEP_TIMEOUT)
    pm = _postmortem(run)
    assert pm["first"]["rank"] == 1, pm["lines"]
    assert pm["first"]["reason"].startswith("stopped running at"), pm["first"]["reason"]
    assert "not waiting" in pm["first"]["reason"] and pm["ranks"][1]["heartbeat"] is not None
