"""`pipeline bench ttt`: time to train over seeded runs, scored as MLPerf HPC scores it.

N trainings of one config (mlperf logging on, so each writes mlperf.log), seeds
train.seed, train.seed + 1, ...; each an ordinary run directory OUT/seed-S, each under a time
limit (a run past it is killed and counts as not converged). Each run's time to train is
read from its mlperf.log and its log is checked with MLCommons' compliance checker. The
score drops the fastest and the slowest and averages the rest (pipeline/analysis/mlperf_log.py
`olympic`). A seed whose run ended (OUT/seed-S/ttt-run.json) is not run again, so an
interrupted bench continues where it stopped; a half-done one starts again from scratch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline import config as config_mod
from pipeline.analysis import mlperf_log
from pipeline.cluster.sweep import run_point
from pipeline.cluster.sweepstate import LOG_FILE
from pipeline.errors import UserError
from pipeline.mlperf.log import logs as mlperf_logs

RULESET = "3.0.0"


def check(log: Path) -> tuple[bool, str]:
    """MLCommons' compliance checker on one log: (passed, its last line)."""
    out = log.with_name(log.stem + ".compliance.txt")
    r = subprocess.run([sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "hpc", "--ruleset",
                        RULESET, "--log_output", str(out), str(log)], capture_output=True, text=True)
    text = (r.stdout + r.stderr).strip().splitlines()
    verdict = next((x for x in reversed(text) if "SUCCESS" in x or "FAILED" in x), text[-1] if text else "")
    return r.returncode == 0, verdict


def run(config: str, out: str, runs: int = 10, ranks: int = 2, limit_s: float = 1800.0, sets: list[str] = (),
        log=sys.stdout) -> dict:
    cfg = config_mod.load(config, list(sets))
    if not cfg.mlperf.enabled:
        raise UserError(f"{config}: mlperf.enabled is false; bench ttt reads each run's mlperf.log "
                        f"(set the mlperf section, as configs/cosmoflow.yaml does, or --set mlperf.enabled=true)")
    if runs < 1 or ranks < 1 or limit_s <= 0:
        raise UserError("--runs and --ranks must be >= 1 and --time-limit > 0")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMPI_MCA_mpi_yield_when_idle="1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    t0 = time.perf_counter()
    rows = []
    for i in range(runs):
        seed = cfg.train.seed + i
        run_dir = out_dir / f"seed-{seed}"
        marker = run_dir / "ttt-run.json"
        if marker.exists():
            row = {**json.loads(marker.read_text()), "how": "earlier"}
        else:
            shutil.rmtree(run_dir, ignore_errors=True)  # a half-done attempt is not resumed: it would not be one run
            run_dir.mkdir(parents=True)
            # The sweep's point runner: mpirun with binding, SIGTERM at the limit (the ranks checkpoint
            # and log run_stop aborted), output in RUN/sweep-train.out.
            code, wall = run_point(ranks, config, run_dir, [f"train.seed={seed}", "mlperf.stop_at_target=true", *sets],
                                   env=env, timeout=limit_s)
            logs = mlperf_logs(run_dir)
            result = mlperf_log.read(logs[-1]) if logs else {"status": None, "time_to_train_s": None, "last_eval": None,
                                                              "split": {}, "epochs": 0, "reason": None}
            if code not in (0, None):
                result["reason"] = f"exit {code}; see {run_dir / LOG_FILE}"
            if code is None:
                result["reason"] = f"killed at --time-limit {limit_s:g}s"
            row = _row(seed, run_dir, result, wall, "limit" if code is None else "ran")
            if row["log"]:
                row["compliance"], row["checker"] = check(Path(row["log"]))
            marker.write_text(json.dumps(row) + "\n")  # this seed is done: a later bench reuses it
        rows.append(row)
        print(f"[ttt {time.perf_counter() - t0:5.0f}s] run {i + 1}/{runs} seed {seed}: " + _describe(row), file=log,
              flush=True)
    score = mlperf_log.olympic([r["time_to_train_s"] for r in rows])
    result = {"config": config, "ranks": ranks, "time_limit_s": limit_s, "target": cfg.mlperf.target,
              "benchmark": cfg.mlperf.benchmark, "runs": rows, **score}
    (out_dir / "ttt.json").write_text(json.dumps(result, indent=1) + "\n")
    for line in report(result):
        print(line, file=log)
    return result


def _row(seed: int, run_dir: Path, r: dict, wall: float | None, how: str) -> dict:
    last = r.get("last_eval") or {}
    logs = mlperf_logs(run_dir)
    return {"seed": seed, "run_dir": str(run_dir), "log": str(logs[-1]) if logs else None, "how": how,
            "status": r.get("status") or ("time limit" if how == "limit" else "no run_stop"),
            "reason": r.get("reason"), "time_to_train_s": r.get("time_to_train_s"), "epochs": r.get("epochs"),
            "last_value": last.get("value"), "split": r.get("split"), "wall_s": wall,
            "compliance": None, "checker": None}


def _describe(row: dict) -> str:
    t = row["time_to_train_s"]
    text = f"{t:.1f}s to target" if t is not None else f"did not converge ({row['status']}" + (
        f": {row['reason']})" if row.get("reason") else ")")
    if row["last_value"] is not None:
        text += f", last {row['last_value']:.4f} after {row['epochs']} epoch(s)"
    if row["compliance"] is not None:
        text += f"; checker {'passed' if row['compliance'] else 'FAILED'}"
    return text + (" (from an earlier bench)" if row["how"] == "earlier" else "")


def report(r: dict) -> list[str]:
    def s(v):
        return "-" if v is None else f"{v:.1f}"

    out = [f"time to train, {r['benchmark']} to {r['target']}, {r['ranks']} rank(s), {r['count']} seeded runs:",
           "| seed | time to train s | epochs | last value | checker |", "|---|---|---|---|---|"]
    for row in r["runs"]:
        chk = "-" if row["compliance"] is None else ("passed" if row["compliance"] else "FAILED")
        last = "-" if row["last_value"] is None else f"{row['last_value']:.4f}"
        out.append(f"| {row['seed']} | {s(row['time_to_train_s']) if row['time_to_train_s'] is not None else row['status']} "
                   f"| {row['epochs']} | {last} | {chk} |")
    score = f"{r['score_s']:.1f} s" if r["score_s"] is not None else f"none ({r['why_no_score']})"
    out.append(f"score (MLPerf: fastest and slowest dropped, mean of the rest): {score}; min {s(r['min_s'])} s, "
               f"median {s(r['median_s'])} s, max {s(r['max_s'])} s; did not converge: {r['not_converged']} of "
               f"{r['count']}")
    return out


# --- the command line (pipeline/cli.py dispatches) ---

def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="a config with the mlperf section on (configs/cosmoflow.yaml)")
    p.add_argument("--runs", type=int, default=10, help="seeded runs (default 10, as MLPerf HPC asks for CosmoFlow)")
    p.add_argument("--ranks", type=int, default=2, help="ranks per run, under mpirun (default 2)")
    p.add_argument("--time-limit", type=float, default=1800.0, help="seconds per run; past it the run counts as not "
                                                                    "converged (default 1800)")
    p.add_argument("--out", default="runs/ttt", help="one run directory per seed here, and ttt.json")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key for every run")
    p.set_defaults(func=cli)


def cli(a) -> int:
    r = run(a.config, a.out, runs=a.runs, ranks=a.ranks, limit_s=a.time_limit, sets=a.set or [])
    return 0 if r["score_s"] is not None else 1
