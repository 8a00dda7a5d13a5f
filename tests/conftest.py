"""Shared helpers: a small real dataset, and running the real CLI alone or under mpirun."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
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


# --- helpers several test modules use ---

def start(np_: int, *args, **kw) -> subprocess.Popen:
    mpi = require_tool("mpirun")
    return subprocess.Popen([mpi, "-np", str(np_), sys.executable, "-m", "pipeline", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            stdin=subprocess.DEVNULL, cwd=ROOT, **kw)


def wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 300.0):
    """Polls CONDITION. The deadline is a hang guard (a run that never gets there fails the test
    instead of CI's budget), not a speed check: what it waits for takes seconds here."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"run ended (rc {proc.returncode}) before {what}:\n{out}\n{err}")
        time.sleep(0.05)  # polling an observable condition, not waiting for luck
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def steps_done(run, rank: int) -> int:
    p = run / "steps" / f"rank-{rank}.jsonl"
    return p.read_text().count("\n") if p.exists() else 0


def rank_pid(run, rank: int) -> int | None:
    p = run / "ranks" / f"rank-{rank}.json"
    try:
        return json.loads(p.read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def write_run(d: Path, *, ranks: int, steps: int, batch: int = 32, step_s=0.05, data_s=None, seed=0,
              noise=0.0, t0=1_700_000_000.0, metrics=()) -> Path:
    """A run directory as the pipeline writes it. step_s/data_s: a number, or a function of
    (rank, step) giving seconds. Every rank's step ends at the same time, as in lock step."""
    rng = np.random.default_rng(seed)
    (d / "steps").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"ranks": ranks, "global_batch": batch * ranks}))
    files = [open(d / "steps" / f"rank-{r}.jsonl", "w") for r in range(ranks)]
    t = t0
    for s in range(1, steps + 1):
        durs = [(step_s(r, s) if callable(step_s) else step_s) * (1 + noise * rng.standard_normal())
                for r in range(ranks)]
        t += max(durs)
        for r, f in enumerate(files):
            ds = (data_s(r, s) if callable(data_s) else data_s) if data_s is not None else 0.001
            ds *= 1 + noise * abs(rng.standard_normal())
            f.write(json.dumps({"step": s, "epoch": 1, "rank": r, "size": ranks, "time": t, "step_s": durs[r],
                                "data_s": ds, "compute_s": durs[r] - ds, "samples": batch, "loss": 1.0 / s,
                                "rss_mb": 400.0 + r}) + "\n")
    for f in files:
        f.close()
    with open(d / "metrics.jsonl", "w") as f:
        for m in metrics:
            f.write(json.dumps(m) + "\n")
    return d


def flip_two_bytes(path: Path, at: int | None = None) -> None:
    """Two bytes of a written file changed in place (the middle by default), as a bad disk or a
    partial copy leaves it."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0xFF
    data[i + 1] ^= 0xFF
    path.write_bytes(bytes(data))


def train_section(**over):
    """The default config's train section with some keys changed, checked as a config file's."""
    from pipeline import config

    cfg = config.load(None)
    for k, v in over.items():
        setattr(cfg.train, k, v)
    cfg.train.validate()
    return cfg.train


def assert_user_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    for w in words:
        assert w in lines[0], lines[0]


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


# --- simulated hosts (tests/bench/test_multinode.py, tests/data/test_staging.py) ---

@contextlib.contextmanager
def sim_hosts(tmp_path: Path, n: int, slots: int):
    """Hosts that exist inside the block and are gone after it, whatever happens in it."""
    require_root("simulated hosts (network namespaces)", "multinode")
    require_tool("ip")
    d = tmp_path / "hosts"
    up = subprocess.run(["bash", str(ROOT / "slurm/local/hosts-up.sh"), str(d), str(n), str(slots)],
                        capture_output=True, text=True)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        hosts = [line.split() for line in (d / "hosts").read_text().splitlines()]
        mca = dict(line.removeprefix("export ").split("=", 1) for line in (d / "env").read_text().splitlines())
        yield d, hosts, mca
    finally:
        subprocess.run(["bash", str(ROOT / "slurm/local/hosts-down.sh"), str(d)], capture_output=True)


def leftovers(d: Path, hosts) -> list[str]:
    names = {h[2] for h in hosts}
    found = [ns for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
             if ns in names]
    tag = hosts[0][2].split("-")[0].removeprefix("pl")
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    found += [w for w in links.split() if tag in w]
    if f"# hosts-up {tag}" in Path("/etc/hosts").read_text():
        found.append("/etc/hosts lines")
    return found
