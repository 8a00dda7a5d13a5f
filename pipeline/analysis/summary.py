"""The figures of a run (and across runs): warm-up, throughput, step-time percentiles, data
wait, stragglers, communication, scaling, time to accuracy. Definitions: docs/analysis.md.

Everything is computed on a step x rank matrix built from the per-rank columns, so ranks
with unequal step counts simply leave holes (NaN) that every figure ignores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import measure, target as target_mod
from pipeline.analysis import timeline as timeline_mod
from pipeline.analysis.logs import Run
from pipeline.runtime import peak as peak_mod

RESTART_GAP_S = 30.0     # idle time between two steps that means the job was restarted
# The straggler rule (docs/analysis.md): a rank is flagged for a figure when it is above the
# median of the other ranks in at least STRAGGLER_SHARE of the steady steps, its median is at
# least STRAGGLER_RATIO x the others', and the excess costs at least STRAGGLER_COST of a step.
STRAGGLER_SHARE = 0.75
STRAGGLER_RATIO = 1.2
STRAGGLER_COST = 0.02


@dataclass
class Matrix:
    steps: np.ndarray           # (S,) global step numbers present on any rank
    cols: dict[str, np.ndarray]  # field -> (S, R), NaN where a rank has no record
    ranks: list[int]


def matrix(run: Run) -> Matrix:
    present = [r for r in sorted(run.ranks) if run.ranks[r].steps]
    if not present:
        return Matrix(np.empty(0), {}, [])
    steps = np.unique(np.concatenate([run.ranks[r].cols["step"] for r in present]))
    fields = run.ranks[present[0]].cols.keys()
    cols = {f: np.full((len(steps), len(present)), np.nan) for f in fields}
    for j, r in enumerate(present):
        idx = np.searchsorted(steps, run.ranks[r].cols["step"])
        for f in fields:
            cols[f][idx, j] = run.ranks[r].cols[f]
    return Matrix(steps, cols, present)


def segments(time: np.ndarray, step_s: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) index ranges of uninterrupted training: a new one starts where the idle
    time before a step (its start minus the previous step's end) exceeds RESTART_GAP_S, as
    after a requeue or a crash. Evaluation pauses are shorter and do not split."""
    n = len(step_s)
    if n == 0:
        return []
    starts = [0]
    if n > 1 and np.isfinite(time).any():
        idle = (time[1:] - step_s[1:]) - time[:-1]
        starts += [int(i) + 1 for i in np.flatnonzero(idle > RESTART_GAP_S)]
    return list(zip(starts, starts[1:] + [n]))


def steady_mask(time: np.ndarray, step_s: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Which steps count, how many were left out as warm-up, and the number of segments."""
    mask = np.ones(len(step_s), dtype=bool)
    segs = segments(time, step_s)
    left_out = 0
    for a, b in segs:
        w = measure.warmup_count(b - a)
        mask[a:a + w] = False
        left_out += w
    return mask, left_out, len(segs)


def percentiles(values: np.ndarray) -> dict:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return {k: None for k in ("p50", "p90", "p99", "max", "mean")}
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(v.max()), "mean": float(v.mean())}


def stragglers(values: np.ndarray, step_s_p50: float, ranks: list[int]) -> list[dict]:
    """The straggler rule on one figure (steps x ranks, steady steps, NaN allowed): each rank
    against the median of the others, step by step. Pure, so it is tested with plain numbers."""
    out = []
    if values.ndim != 2 or values.shape[1] < 2 or not step_s_p50:
        return out
    full = values[np.all(np.isfinite(values), axis=1)]
    if len(full) < 5:
        return out
    for j, rank in enumerate(ranks):
        others = np.delete(full, j, axis=1)
        excess = full[:, j] - np.median(others, axis=1)
        mine, theirs = float(np.median(full[:, j])), float(np.median(others))
        share = float(np.mean(excess > 0))
        cost = float(np.median(excess))
        ratio = mine / theirs if theirs > 0 else (float("inf") if mine > 0 else 1.0)
        if share >= STRAGGLER_SHARE and ratio >= STRAGGLER_RATIO and cost >= STRAGGLER_COST * step_s_p50:
            out.append({"rank": rank, "median_s": mine, "others_median_s": theirs, "ratio": ratio,
                        "share_of_steps_above": share, "excess_s_per_step": cost})
    return out


def time_to_accuracy(metrics: list[dict], t0: float | None, target) -> dict:
    """The first evaluation that reaches the target (any metric of metrics.jsonl, either
    direction; a number means val_accuracy >= it), and the time from the first step to it."""
    name, op, value = target_mod.parse(target)
    out = {"target": value, "metric": name, "op": op, "reached": False, "step": None, "epoch": None,
           "seconds": None}
    for m in metrics:
        v = m.get(name)
        if isinstance(v, (int, float)) and (v >= value if op == ">=" else v <= value):
            t = m.get("time")
            out.update(reached=True, step=m.get("step"), epoch=m.get("epoch"), value=v,
                       seconds=(t - t0) if isinstance(t, (int, float)) and t0 is not None else None)
            if name == "val_accuracy":
                out["val_accuracy"] = v
            break
    seen = [m[name] for m in metrics if isinstance(m.get(name), (int, float))]
    out["best"] = (max(seen) if op == ">=" else min(seen)) if seen else None
    acc = [m["val_accuracy"] for m in metrics if isinstance(m.get("val_accuracy"), (int, float))]
    out["best_val_accuracy"] = max(acc) if acc else None
    return out


def staging(run: Run) -> dict | None:
    """What the run's staging step did (data.stage_dir), from the step logs' last headers:
    totals over the staging directories of all hosts; None when it did not stage."""
    per_dir = {}
    for _, log in sorted(run.ranks.items()):
        h = log.headers[-1] if log.headers else {}
        if isinstance(h.get("staging"), dict):
            per_dir[(h.get("host"), h["staging"].get("dir"))] = h["staging"]
    if not per_dir:
        return None
    vals = list(per_dir.values())
    out = {k: sum(int(v.get(k) or 0) for v in vals) for k in ("files", "bytes", "copied", "reused", "copied_bytes")}
    out.update(dirs=len(vals), wall_s=max(float(v.get("wall_s") or 0) for v in vals),
               copy_s_max=max(float(v.get("seconds") or 0) for v in vals))
    return out


def summarize(run: Run, target=0.9) -> dict:
    m = matrix(run)
    cfg = run.config
    out = {
        "run_dir": str(run.dir), "ranks": run.expected_ranks, "ranks_with_logs": len(m.ranks),
        "missing_ranks": run.missing_ranks, "skipped_lines": run.skipped_lines,
        "partial_last_lines": [r for r, log in sorted(run.ranks.items()) if log.partial_last_line],
        "repeated_steps": sum(log.repeated_steps for log in run.ranks.values()),
        "notes": list(run.notes),
        "staging": staging(run),
    }
    if not m.ranks:
        out.update(global_batch=cfg.get("global_batch"), steps=0, warmup_steps=0, throughput_samples_per_s=None,
                   step_s=percentiles(np.empty(0)), data_wait_fraction=None, compute_fraction=None,
                   per_rank=[], stragglers=[], time_to_accuracy=time_to_accuracy(run.metrics, None, target),
                   mfu=mfu(cfg, None))
        out["setup"] = setup(run, out["global_batch"])
        out["notes"].append("no step records")
        return out

    step_s = m.cols["step_s"]
    # Ranks run in lock step: a step lasts as long as its slowest rank's record says.
    step_wall = np.nanmax(step_s, axis=1)
    t_end = np.nanmax(m.cols["time"], axis=1) if np.isfinite(m.cols["time"]).any() else np.full(len(m.steps), np.nan)
    steady, warm, n_segments = steady_mask(t_end, step_wall)
    # A step that ran across a suspension (the job stopped, then continued) says nothing of speed.
    sus = m.cols.get("suspended_s")
    suspended = np.max(np.nan_to_num(sus, nan=0.0), axis=1) if sus is not None else np.zeros(len(m.steps))
    steady &= suspended <= 0
    out.update(suspended_steps=int((suspended > 0).sum()), suspended_s=round(float(suspended.sum()), 3))
    out.update(_speed(run, m, steady, step_wall))
    out["mfu"] = mfu(cfg, out["throughput_samples_per_s"])
    out.update({"warmup_steps": warm, "warmup_rule": f"{measure.WARMUP_RULE} of each of {n_segments} segment(s)",
                "segments": n_segments})
    out["setup"] = setup(run, out["global_batch"])
    out["per_rank"] = _per_rank(run, m, steady)
    out["gpu"] = gpu_spread(out["per_rank"])
    p50 = out["step_s"]["p50"] or 0.0
    found = [{"figure": figure, **x} for figure in ("data_s", "step_s")
             for x in stragglers(m.cols[figure][steady], p50, m.ranks)]
    out["communication"] = {"source": None}
    if run.timelines:
        out["communication"] = _timeline_communication(run, len(m.steps), float(np.nansum(step_wall)), p50, found)
    out["straggler_details"] = found
    out["stragglers"] = sorted({x["rank"] for x in found})
    out.update(_network_facts(cfg))

    # Time to accuracy counts from the start of the first logged step.
    first = np.isfinite(t_end)
    t0 = float(t_end[first][0] - step_wall[first][0]) if first.any() else None
    out["time_to_accuracy"] = time_to_accuracy(run.metrics, t0, target)
    out["wall_s"] = float(t_end[first][-1] - t0) if first.any() else None
    return out


def _speed(run: Run, m: Matrix, st: np.ndarray, step_wall: np.ndarray) -> dict:
    """Throughput, step-time percentiles and the time split, over the steady steps `st`."""
    step_s, data_s, compute_s, samples = (m.cols[k] for k in ("step_s", "data_s", "compute_s", "samples"))
    total_step = np.nansum(step_s[st])
    per_rank_batch = float(np.nanmedian(samples))
    # Waiting at the collective for a rank whose batch came later: estimated from the data
    # skew, assuming equal compute (docs/analysis.md).
    skew = np.nanmax(data_s[st], axis=1, keepdims=True) - data_s[st] if st.any() else np.empty((0, 1))
    return {
        "global_batch": run.config.get("global_batch") or int(round(per_rank_batch * run.expected_ranks)),
        "steps": int(m.steps[-1]),
        "steps_logged": int(len(m.steps)),
        "steady_steps": int(st.sum()),
        "throughput_samples_per_s": float(np.nansum(samples[st]) / np.sum(step_wall[st])) if st.any() else None,
        "step_s": percentiles(step_s[st].ravel()),
        "data_wait_fraction": float(np.nansum(data_s[st]) / total_step) if total_step else None,
        "compute_fraction": float(np.nansum(compute_s[st]) / total_step) if total_step else None,
        "sync_wait_fraction_estimate": float(np.nansum(skew) / total_step) if total_step else None,
    }


def mfu(cfg: dict, samples_per_s: float | None) -> dict:
    """Model FLOPs utilization from config.json's facts (pipeline/train/flops.py) and the
    steady throughput: {value, achieved_flops_per_s, peak_flops_per_s, peak_source, ...}; value
    None, with a note saying which part is missing, where one is."""
    flops, peak = cfg.get("model_flops_per_sample"), cfg.get("peak_flops_per_s")
    out = {"value": peak_mod.mfu(flops, samples_per_s, peak),
           "achieved_flops_per_s": flops * samples_per_s if flops and samples_per_s else None,
           "peak_flops_per_s": peak, "peak_source": cfg.get("peak_source"), "peak_device": cfg.get("peak_device"),
           "model_flops_per_sample": flops, "flops_source": cfg.get("flops_source")}
    if not flops:
        out["note"] = f"config.json has no model FLOPs ({cfg.get('flops_source') or 'a run from before they were recorded'})"
    elif not peak:
        out["note"] = f"config.json has no device peak ({cfg.get('peak_source') or 'a run from before it was recorded'})"
    elif out["value"] is None:
        out["note"] = "no steady steps"
    return out


def _per_rank(run: Run, m: Matrix, st: np.ndarray) -> list[dict]:
    step_s, data_s, compute_s, samples, rss = (m.cols[k] for k in ("step_s", "data_s", "compute_s", "samples",
                                                                   "rss_mb"))
    rows = []
    for j, r in enumerate(m.ranks):
        col = st & np.isfinite(step_s[:, j])
        sum_step = float(np.sum(step_s[col, j]))
        hdr = run.ranks[r].headers[-1] if run.ranks[r].headers else {}
        rows.append({
            "rank": r, "steps": int(np.isfinite(step_s[:, j]).sum()),
            "host": hdr.get("host"), "local_rank": hdr.get("local_rank"),
            "step_s_p50": float(np.median(step_s[col, j])) if col.any() else None,
            "data_s_p50": float(np.median(data_s[col, j])) if col.any() else None,
            "compute_s_p50": float(np.median(compute_s[col, j])) if col.any() else None,
            "data_wait_fraction": float(np.sum(data_s[col, j]) / sum_step) if sum_step else None,
            "samples_per_s": float(np.sum(samples[col, j]) / sum_step) if sum_step else None,
            "rss_mb_max": float(np.nanmax(rss[:, j])) if np.isfinite(rss[:, j]).any() else None,
            "rss_mb_p50": float(np.nanmedian(rss[:, j])) if np.isfinite(rss[:, j]).any() else None,
            **_gpu_figures(m, j, col),
        })
    return rows


def _gpu_figures(m: Matrix, j: int, col: np.ndarray) -> dict:
    """A GPU rank's device memory peak over the run and its mean utilization over the steady
    steps; nothing for a CPU rank (its records carry neither)."""
    out = {}
    mem, util = m.cols["gpu_mem_peak_mb"], m.cols["gpu_util"]  # NaN where a record lacks them
    if np.isfinite(mem[:, j]).any():
        out["gpu_mem_peak_mb"] = float(np.nanmax(mem[:, j]))
    if np.isfinite(util[col, j]).any():
        out["gpu_util_mean"] = float(np.nanmean(util[col, j]))
    return out


def gpu_spread(per_rank: list[dict]) -> dict | None:
    """Across the GPU ranks: the lowest and highest memory peak and mean utilization, and who
    they are (a rank far below the others waits for them); None for a CPU run."""
    out = {}
    for key in ("gpu_mem_peak_mb", "gpu_util_mean"):
        have = [r for r in per_rank if r.get(key) is not None]
        if have:
            lo, hi = min(have, key=lambda r: r[key]), max(have, key=lambda r: r[key])
            out[key] = {"min": lo[key], "min_rank": lo["rank"], "max": hi[key], "max_rank": hi["rank"],
                        "spread": hi[key] - lo[key]}
    return out or None


def _timeline_communication(run: Run, n_steps: int, all_step: float, p50: float, found: list) -> dict:
    """Communication measured from the Horovod timeline(s); adds negotiation stragglers to `found`."""
    tl = timeline_mod.analyze(run.timelines, run.expected_ranks)
    n = max(n_steps, 1)
    comm = {"source": "timeline", "files": tl["files"], "negotiations": tl["negotiations"],
            "phases": {k: {**v, "per_step_s": v["wall_s"] / n,
                           "fraction_of_step": v["wall_s"] / all_step if all_step else None}
                       for k, v in tl["phases"].items()},
            "last_to_negotiate": tl["last_to_negotiate"],
            "gradient_phases": {k: {**v, "per_step_s": v["wall_s"] / n} for k, v in tl["gradient_phases"].items()},
            "gradient_ops_per_step": tl["gradient_ops"] / n, "solo_ops_per_step": tl["solo_ops"] / n,
            "exposed_tail_p50_s": tl["exposed_tail_p50_s"]}
    for entry in comm["last_to_negotiate"]:
        entry["late_s_per_step"] = entry["late_s_total"] / n
    # A rank whose compute before the collective is slow arrives last at negotiation:
    # flagged when others wait for it >= STRAGGLER_COST of a step and 2x any other rank.
    lates = comm["last_to_negotiate"]
    for e in lates:
        rest = [o["late_s_per_step"] for o in lates if o is not e]
        if rest and e["late_s_per_step"] >= STRAGGLER_COST * p50 and e["late_s_per_step"] >= 2 * max(rest):
            found.append({"figure": "negotiation", "rank": e["rank"], "excess_s_per_step": e["late_s_per_step"],
                          "share_of_steps_above": e["share"]})
    return comm


def _network_facts(cfg: dict) -> dict:
    out = {}
    if cfg.get("gradient_bytes"):
        out["gradient_bytes_per_step"] = int(cfg["gradient_bytes"])
    elif cfg.get("model_params"):
        out["gradient_bytes_per_step"] = int(cfg["model_params"]) * 4
    hosts = cfg.get("hosts") or []
    out["hosts"] = len(set(hosts)) or None
    out["ranks_per_host"] = max(hosts.count(h) for h in set(hosts)) if hosts else None
    return out


# --- comparisons between runs: like with like ---

# What must be equal for two runs' speed to be compared (None: the run does not say).
SETUP_KEYS = ("per_rank_batch", "threads_per_rank", "model", "precision")
SETUP_LABELS = {"per_rank_batch": "per-rank batch", "threads_per_rank": "threads per rank", "model": "model",
                "precision": "precision"}


def setup(run: Run, global_batch) -> dict:
    """What a run's speed depends on besides its rank count: from config.json, else from the
    step logs' header records."""
    cfg = run.config
    hdr = next((log.headers[-1] for _, log in sorted(run.ranks.items()) if log.headers), {})
    ranks = run.expected_ranks
    return {"per_rank_batch": global_batch // ranks if global_batch and ranks else None,
            "threads_per_rank": cfg.get("threads_per_rank") or hdr.get("threads"),
            "model": (cfg.get("model") or {}).get("name"),
            "precision": (cfg.get("train") or {}).get("precision") or hdr.get("precision")}


def differences(a: dict, b: dict, keys=SETUP_KEYS) -> dict:
    """{key: [a's, b's]} for each setup key both runs state and that differs."""
    sa, sb = a.get("setup", {}), b.get("setup", {})
    return {k: [sa.get(k), sb.get(k)] for k in keys
            if sa.get(k) is not None and sb.get(k) is not None and sa.get(k) != sb.get(k)}


def describe(diff: dict) -> str:
    return ", ".join(f"{SETUP_LABELS.get(k, k)} {x} vs {y}" for k, (x, y) in diff.items())


def scaling(summaries: list[dict]) -> tuple[list[dict], list[dict]]:
    """(rows, declined): speedup and efficiency against the run with the fewest ranks among
    runs of the same model, precision and threads per rank; weak (same per-rank batch) or
    strong (same global batch). A run with more ranks and no such base is declined, with what
    differs."""
    runs = sorted((s for s in summaries if s.get("throughput_samples_per_s")), key=lambda s: (s["ranks"], s["run_dir"]))
    if len({s["ranks"] for s in runs}) < 2:
        return [], []
    rows, declined, used = [], [], set()
    keys = ("threads_per_rank", "model", "precision")
    for base in runs:
        if base["run_dir"] in used:
            continue
        group = [s for s in runs if s["run_dir"] not in used and not differences(base, s, keys)
                 and s["ranks"] >= base["ranks"]]
        if len({s["ranks"] for s in group}) < 2:
            continue
        for s in group:
            used.add(s["run_dir"])
            speedup = s["throughput_samples_per_s"] / base["throughput_samples_per_s"]
            rows.append({"ranks": s["ranks"], "run_dir": s["run_dir"], "global_batch": s["global_batch"],
                         "throughput_samples_per_s": s["throughput_samples_per_s"], "speedup": speedup,
                         "efficiency": speedup / (s["ranks"] / base["ranks"]), "base_run": base["run_dir"],
                         **{k: s.get("setup", {}).get(k) for k in keys},
                         "mode": "base" if s is base else
                         ("strong" if s["global_batch"] == base["global_batch"] else "weak")})
    fewest = runs[0]
    for s in runs:
        if s["run_dir"] not in used and s["ranks"] > fewest["ranks"]:
            diff = differences(fewest, s, keys)
            declined.append({"run_dir": s["run_dir"], "ranks": s["ranks"], "differs": diff,
                             "reason": "no run with fewer ranks has the same model, precision and threads per rank"
                                       + (f" ({describe(diff)} against {fewest['run_dir']})" if diff else "")})
    return rows, declined


def _single_rank_base(s: dict, summaries: list[dict]) -> tuple[dict | None, str | None]:
    """The 1-rank run that is like `s` in everything but the rank count, or why there is none."""
    singles = [x for x in summaries if x["ranks"] == 1 and x.get("per_rank")]
    for x in singles:
        if not differences(s, x):
            return x, None
    if not singles:
        return None, "no 1-rank run among the runs analysed"
    return None, "the 1-rank runs differ: " + "; ".join(f"{x['run_dir']}: {describe(differences(s, x))}"
                                                       for x in singles)


def communication_estimates(summaries: list[dict]) -> None:
    """Without a timeline: communication per step estimated as the extra compute time of an
    N-rank run over a 1-rank run of the same per-rank batch, threads per rank, model and
    precision (compute_s includes the allreduce). Marked as an estimate; declined, saying
    what differs, when there is no such run."""
    for s in summaries:
        if s["ranks"] < 2 or s.get("communication", {}).get("source") == "timeline" or not s.get("per_rank"):
            continue
        base, why = _single_rank_base(s, summaries)
        if base is None or base["per_rank"][0]["compute_s_p50"] is None:
            s["communication"] = {"source": None, "note": "no timeline and no 1-rank run of the same per-rank "
                                                          "batch, threads per rank, model and precision ("
                                                          + (why or "it has no steady steps") +
                                                          "): communication cannot be separated from compute"}
            continue
        fastest = min(r["compute_s_p50"] for r in s["per_rank"] if r["compute_s_p50"] is not None)
        est = max(0.0, fastest - base["per_rank"][0]["compute_s_p50"])
        s["communication"] = {"source": "estimate", "baseline_run": base["run_dir"], "per_step_s": est,
                              "fraction_of_step": est / s["step_s"]["p50"] if s["step_s"]["p50"] else None}


COMPARE = [
    ("ranks", "ranks"), ("global batch", "global_batch"), ("steps", "steps"),
    ("throughput samples/s", "throughput_samples_per_s"), ("step p50 s", "step_s.p50"),
    ("step p90 s", "step_s.p90"), ("step p99 s", "step_s.p99"), ("step max s", "step_s.max"),
    ("data-wait fraction", "data_wait_fraction"), ("compute fraction", "compute_fraction"),
    ("sync-wait fraction (est.)", "sync_wait_fraction_estimate"), ("stragglers", "stragglers"),
    ("time to target s", "time_to_accuracy.seconds"), ("best val accuracy", "time_to_accuracy.best_val_accuracy"),
    ("wall s", "wall_s"),
]


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d


def compare(a: dict, b: dict) -> list[dict]:
    rows = []
    for label, key in COMPARE:
        va, vb = _get(a, key), _get(b, key)
        row = {"figure": label, "key": key, "a": va, "b": vb}
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
            row["b_minus_a"] = vb - va
            row["b_over_a"] = vb / va if va else None
        rows.append(row)
    return rows


COMM_PHASES = ("MPI_ALLREDUCE", "NCCL_ALLREDUCE", "ALLREDUCE")


def comm_model(summaries: list[dict], net, compute_s: float | None = None) -> None:
    """Predicted next to measured communication per step (pipeline/analysis/commmodel.py) for every
    multi-rank run: measured is the timeline's wall time per step of the gradient tensors'
    allreduce (MPI_ALLREDUCE on CPUs, NCCL_ALLREDUCE on GPUs). Step time is predicted from
    compute_s, else from a 1-rank run of the same per-rank batch, threads per rank, model and
    precision among the analysed runs (else not predicted, and compute_note says why)."""
    from pipeline.analysis import commmodel

    for s in summaries:
        if s["ranks"] < 2 or not s.get("gradient_bytes_per_step") or not s.get("steps"):
            continue
        c = commmodel.comm_s(s["gradient_bytes_per_step"], s["ranks"], s.get("ranks_per_host") or 1, net)
        entry = {"network": commmodel.as_dict(net), "gradient_bytes": s["gradient_bytes_per_step"],
                 "hosts": c["hosts"], "ranks_per_host": s.get("ranks_per_host"),
                 "predicted_comm_s": c["total_s"], "predicted_terms_s": {k: c[k] for k in
                                                                         ("alpha_s", "latency_s", "bandwidth_s")},
                 "measured_comm_s": None, "measured_phase": None, "comm_ratio": None}
        comm = s.get("communication", {})
        phases = comm.get("gradient_phases", {}) if comm.get("source") == "timeline" else {}
        entry["fused_ops_per_step"] = comm.get("gradient_ops_per_step")
        for name in COMM_PHASES:
            if name in phases:
                entry["measured_comm_s"], entry["measured_phase"] = phases[name]["per_step_s"], name
                entry["comm_ratio"] = c["total_s"] / entry["measured_comm_s"] if entry["measured_comm_s"] else None
                break
        base = compute_s
        if base is None:
            single, why = _single_rank_base(s, summaries)
            base = single["step_s"]["p50"] if single else None
            entry["compute_from"] = single["run_dir"] if single else None
            if why:
                entry["compute_note"] = why
        if base is not None:
            entry["compute_s"] = base
            entry["predicted_step_s"] = base + c["total_s"]
            entry["measured_step_s"] = s["step_s"]["p50"]
            entry["step_ratio"] = entry["predicted_step_s"] / s["step_s"]["p50"] if s["step_s"]["p50"] else None
            entry["predicted_efficiency"] = base / entry["predicted_step_s"]
            entry["measured_efficiency"] = base / s["step_s"]["p50"] if s["step_s"]["p50"] else None
        s["comm_model"] = entry
