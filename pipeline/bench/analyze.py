"""`pipeline bench analyze`: writes a run directory of many step records (default 8 ranks x
125,000 steps = 1 million) and times `pipeline analyze --json` on it in a fresh process,
with that process's peak resident memory. Targets: under 20 s and 1 GiB."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.rundir import RunDir

TARGET_S = 20.0
TARGET_MIB = 1024


def write_run(d: Path, ranks: int, steps: int, seed: int = 0) -> None:
    """Step records as the pipeline writes them, with rank 3 slowed in data_s on purpose."""
    rng = np.random.default_rng(seed)
    rd = RunDir(d)
    rd.steps_dir.mkdir(parents=True)
    rd.config.write_text(json.dumps({"ranks": ranks, "global_batch": 64 * ranks}))
    t = 1_700_000_000.0 + np.cumsum(0.05 + 0.005 * rng.random(steps))
    for r in range(ranks):
        data = 0.004 * (1.3 if r == 3 else 1.0) * (1 + 0.1 * rng.random(steps))
        step = np.full(steps, 0.05)
        with open(rd.step_log(r), "w") as f:
            for i in range(steps):
                f.write(f'{{"step":{i + 1},"epoch":1,"rank":{r},"size":{ranks},"time":{t[i]:.6f},'
                        f'"step_s":{step[i]:.6f},"data_s":{data[i]:.6f},"compute_s":{step[i] - data[i]:.6f},'
                        f'"samples":64,"loss":0.5,"rss_mb":512.0}}\n')


def run(ranks: int = 8, steps: int = 125_000, work: str | None = None, out=sys.stdout) -> dict:
    tmp = Path(work) if work else Path(tempfile.mkdtemp(prefix="bench-analyze-"))
    d = tmp / "run"
    try:
        t0 = time.perf_counter()
        write_run(d, ranks, steps)
        print(f"wrote {ranks} x {steps:,} = {ranks * steps:,} step records "
              f"({sum(p.stat().st_size for p in RunDir(d).steps_dir.iterdir()) / 2**20:.0f} MiB) in "
              f"{time.perf_counter() - t0:.1f}s", file=out)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "pipeline", "analyze", str(d), "--json"], capture_output=True,
                           text=True)
        wall = time.perf_counter() - t0
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if r.returncode != 0:
            raise RuntimeError(f"pipeline analyze failed: {r.stderr[-2000:]}")
        s = json.loads(r.stdout)["runs"][0]
        res = {"records": ranks * steps, "seconds": wall, "peak_rss_mib": peak_mib,
               "peak_rss_note": "" if before < peak_mib * 1024 else "an earlier child was larger",
               "stragglers": s["stragglers"], "target_s": TARGET_S, "target_mib": TARGET_MIB,
               "met": wall < TARGET_S and peak_mib < TARGET_MIB}
        print(f"pipeline analyze: {wall:.1f}s (target < {TARGET_S:.0f}s), peak RSS {peak_mib:.0f} MiB "
              f"(target < {TARGET_MIB} MiB); stragglers found {s['stragglers']} (rank 3 slowed on purpose)",
              file=out)
        return res
    finally:
        if not work:
            shutil.rmtree(tmp, ignore_errors=True)


# --- the command line (pipeline/cli.py dispatches) ---

def add_arguments(p) -> None:
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--steps", type=int, default=125_000)
    p.add_argument("--work", help="directory for the generated run (default: a temporary one)")
    p.set_defaults(func=cli)


def cli(a) -> int:
    return 0 if run(a.ranks, a.steps, a.work)["met"] else 1
