"""Shared helpers: a small real dataset, and running the real CLI alone or under mpirun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def require_tool(name: str) -> str:
    """The path of a command the test needs; its absence fails the test (the set-up installs it)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not on PATH (make env installs it; make slurm-up for SLURM's)")
    return path


def require_root(what: str, marker: str) -> None:
    """Tests of real daemons and network namespaces need root: without it they fail, naming
    how to leave them out on purpose (pytest -m 'not MARKER'), rather than pass unseen."""
    if os.geteuid() != 0:
        pytest.fail(f"{what} needs root: run make test as root, or leave these tests out with "
                    f"PYTEST_ARGS=\"-m 'not {marker}'\"")


def env() -> dict:
    e = dict(os.environ)
    # OpenMPI refuses to start ranks as root unless told it is deliberate (containers, CI).
    e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=str(ROOT))
    return e


def pipeline(*args, timeout=600, cwd=None) -> subprocess.CompletedProcess:
    """Runs `python -m pipeline ARGS` as one process without a launcher. `timeout` (here and in
    every subprocess call of the tests) is a hang guard, at least 10x what the command takes here:
    a hung run fails its test instead of using up CI's time. It is not a speed check."""
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                          env=env(), timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd or ROOT)


def mpirun(np_: int, *args, timeout=600) -> subprocess.CompletedProcess:
    """Runs `mpirun -np N python -m pipeline ARGS`: real ranks, real Horovod."""
    mpi = require_tool("mpirun")
    return subprocess.run([mpi, "-np", str(np_), sys.executable, "-m", "pipeline", *map(str, args)],
                          capture_output=True, text=True, env=env(), timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=ROOT)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def read_steps(path: Path) -> list[dict]:
    """A step log's step records (each process also writes one header record)."""
    return [r for r in read_jsonl(path) if r.get("kind") != "header"]


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """8000 train samples in 3 shards (uneven against 2 ranks) and 1000 validation samples."""
    from pipeline.data.synth import synth

    out = tmp_path_factory.mktemp("data") / "synth"
    synth(out, samples_train=8000, samples_val=1000, shards=3, seed=1, progress=lambda *_: None)
    return out


# --- the fast layer's guard ---
# `make test-fast` runs `pytest -m 'not mpi and not slurm and not multinode and not root'`. A
# test that starts one of these commands without its marker would slip real ranks, daemons or
# namespaces into the fast layer: on PATH for every unmarked test, a shim records the call
# (and then runs the real command), and the test fails, naming the marker it lacks. The shims
# sit on PATH, so what the test's own subprocesses start (pipeline sweep --local, bench ...)
# is seen too.
GUARDED = {"mpirun": "mpi", "mpiexec": "mpi", "horovodrun": "mpi",
           "sbatch": "slurm", "srun": "slurm", "salloc": "slurm", "scontrol": "slurm", "squeue": "slurm",
           "sacct": "slurm", "slurmctld": "slurm", "slurmd": "slurm", "slurmdbd": "slurm", "munged": "slurm",
           "unshare": "multinode or root", "nsenter": "multinode or root"}
FAST_EXCLUDES = ("mpi", "slurm", "multinode", "root")


@pytest.fixture(autouse=True)
def _guard_the_fast_layer(request, tmp_path_factory, monkeypatch):
    if any(request.node.get_closest_marker(m) for m in FAST_EXCLUDES):
        yield
        return
    shims = tmp_path_factory.mktemp("guard")
    calls = shims / "calls"
    path = os.environ.get("PATH", "")
    for name in GUARDED:
        real = shutil.which(name, path=path)
        if real:  # a command that is not there stays missing (tests of its absence)
            (shims / name).write_text(f'#!/bin/sh\necho {name} >> "{calls}"\nexec "{real}" "$@"\n')
            (shims / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{shims}{os.pathsep}{path}")
    yield
    started = sorted(set(calls.read_text().split())) if calls.exists() else []
    if started:
        needs = sorted({GUARDED[c] for c in started})
        pytest.fail(f"started {', '.join(started)} without its marker: add @pytest.mark."
                    f"{' / '.join(needs)} (make test-fast leaves those out)", pytrace=False)
