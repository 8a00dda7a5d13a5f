"""Reading an MLPerf log (`:::MLLOG` lines, pipeline/mlperf/log.py): time to train and where the
time went, for `pipeline analyze` and `pipeline bench ttt`.

Time to train is run_stop - run_start, MLPerf HPC's definition (since HPC v3.0 data staging
need not be inside it; here it is not: staging ends before init_stop). The split:

- init: init_start .. init_stop without staging (imports, joining the job, model, restore)
- staging: staging_start .. staging_stop (the share read into memory)
- training: run_start .. run_stop without the evaluations
- evaluation: the eval_start .. eval_stop intervals
"""

from __future__ import annotations

import json
from pathlib import Path

PREFIX = ":::MLLOG "


def events(path: str | Path) -> list[dict]:
    """The log's events in order; lines that are not MLLOG lines (or are cut off) are skipped."""
    out = []
    for line in Path(path).read_text(errors="replace").splitlines():
        i = line.find(PREFIX)
        if i < 0:
            continue
        try:
            out.append(json.loads(line[i + len(PREFIX):]))
        except json.JSONDecodeError:
            continue
    return out


def read(path: str | Path) -> dict:
    """One log's outcome: status (run_stop's, or None when the log ends without one), time to
    train in seconds (when status is success), the split, the evaluations, the settings."""
    evs = events(path)
    first: dict[str, float] = {}
    values: dict = {}
    evals, eval_s, open_eval = [], 0.0, None
    status, reason = None, None
    for e in evs:
        key, t = e.get("key"), e.get("time_ms", 0) / 1000.0
        first.setdefault(key, t)
        if e.get("event_type") == "POINT_IN_TIME" and key not in ("eval_error", "eval_accuracy"):
            values.setdefault(key, e.get("value"))
        if key == "eval_start":
            open_eval = t
        elif key == "eval_stop" and open_eval is not None:
            eval_s += t - open_eval
            open_eval = None
        elif key in ("eval_error", "eval_accuracy"):
            evals.append({"epoch": (e.get("metadata") or {}).get("epoch_num"), "key": key, "value": e.get("value"),
                          "time": t})
        elif key == "run_stop":
            md = e.get("metadata") or {}
            status, reason = md.get("status"), md.get("reason")
            first["run_stop"] = t
    staging = first["staging_stop"] - first["staging_start"] if "staging_stop" in first and "staging_start" in first \
        else 0.0
    init = first["init_stop"] - first["init_start"] - staging if "init_stop" in first and "init_start" in first \
        else None
    run = first["run_stop"] - first["run_start"] if "run_stop" in first and "run_start" in first else None
    return {"path": str(path), "status": status, "reason": reason,
            "time_to_train_s": run if status == "success" else None, "run_s": run,
            "split": {"init_s": init, "staging_s": staging, "training_s": run - eval_s if run is not None else None,
                      "evaluation_s": eval_s},
            "epochs": len([e for e in evs if e.get("key") == "epoch_stop"]),
            "evals": evals, "last_eval": evals[-1] if evals else None,
            "benchmark": values.get("submission_benchmark"), "division": values.get("submission_division"),
            "seed": values.get("seed"), "global_batch_size": values.get("global_batch_size")}


def olympic(times: list[float | None]) -> dict:
    """MLPerf's score over seeded runs: the fastest and the slowest dropped, the mean of the
    rest. A run that did not converge counts as the slowest, so one of them is dropped; with
    more than one, or fewer than 3 runs, there is no score."""
    done = sorted(t for t in times if t is not None)
    failed = len(times) - len(done)
    out = {"count": len(times), "converged": len(done), "not_converged": failed,
           "min_s": done[0] if done else None, "max_s": done[-1] if done else None,
           "median_s": _median(done) if done else None, "score_s": None}
    if len(times) < 3:
        out["why_no_score"] = f"{len(times)} run(s): the score drops the fastest and the slowest of at least 3"
    elif failed > 1:
        out["why_no_score"] = f"{failed} of {len(times)} runs did not converge (at most 1 may)"
    else:
        kept = (done + [float("inf")] * failed)[1:-1]
        out["score_s"] = sum(kept) / len(kept)
    return out


def _median(xs: list[float]) -> float:
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def lines(r: dict) -> list[str]:
    """analyze's text for one log."""
    sp = r["split"]

    def s(v):
        return "-" if v is None else f"{v:.1f}s"

    name = Path(r["path"]).name
    resumed = name != "mlperf.log"  # mlperf-N.log: attempt N, resumed from a checkpoint
    head = f"mlperf ({name}, {r['benchmark']}, {r['division']}" + (", a resumed attempt: not one MLPerf run"
                                                                    if resumed else "") + "): "
    if r["status"] == "success":
        last = r["last_eval"]
        head += f"time to train {r['time_to_train_s']:.1f}s ({last['key']} {last['value']:.4f} at epoch {last['epoch']})"
    elif r["status"] is None:
        head += "no run_stop: the attempt ended without logging its end (killed, or still running)"
    else:
        head += f"{r['status']}" + (f" ({r['reason']})" if r.get("reason") else "")
    return [head, f"  split: init {s(sp['init_s'])}, staging {s(sp['staging_s'])}, training {s(sp['training_s'])}, "
                  f"evaluation {s(sp['evaluation_s'])}; {r['epochs']} epoch(s)"]
