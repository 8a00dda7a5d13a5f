"""`pipeline analyze --leaderboard DIR`: a sweep's points ranked by time to the target quality.

One row per point (repeats of a point: one row, each figure the median [min-max]): the knobs
that differ between points, ranks, state (finished, stopped, failed and why), throughput,
step p50, data wait, scaling efficiency against the 1-rank point with the same knobs, the
final value of the target's metric, time to target (from the first step, as `pipeline
analyze` defines it) and node-hours to target (that time x the hosts the point ran on).
Sorted by time to target; the points no other point beats on both time and node-hours are
the Pareto front. Where SLURM accounting answers, `sacct`'s elapsed time, state, exit code,
MaxRSS and node list of each point's latest job are joined to its row.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
import statistics
import subprocess
from pathlib import Path

from pipeline import target as target_mod
from pipeline.analysis import logs, summary as summary_mod
from pipeline.cluster import sweepstate
from pipeline.errors import UserError


def build(out_dir: str | Path, target: str | None = None) -> dict:
    out_dir = Path(out_dir)
    manifest = sweepstate.read_json(out_dir / sweepstate.MANIFEST)
    if manifest is None:
        raise UserError(f"{out_dir}: no {sweepstate.MANIFEST} (not a sweep directory: pipeline sweep --out makes one)")
    target = target or manifest.get("target") or "val_accuracy>=0.9"
    metric, op, goal = target_mod.parse(target)
    active = sweepstate.active_jobs(manifest)
    acct, accounting = sacct(manifest)
    points = []
    for name, info in manifest["points"].items():
        d = out_dir / name
        state, why = sweepstate.point_state(d, active)
        p = {"point": name, "knobs": info["knobs"], "ranks": info["ranks"], "repeat": info.get("repeat", 0),
             "state": state, "why": why, "throughput_samples_per_s": None, "step_p50_s": None,
             "data_wait_fraction": None, "final_metric": None, "time_to_target_s": None,
             "node_hours_to_target": None, "nodes": None}
        if (d / "steps").is_dir() and any((d / "steps").glob("rank-*.jsonl")):
            run = logs.load(d)
            s = summary_mod.summarize(run, target)
            tta = s["time_to_accuracy"]
            hosts = run.config.get("hosts") or []
            nodes = len(set(hosts)) or 1
            seen = [m[metric] for m in run.metrics if isinstance(m.get(metric), (int, float))]
            p.update(throughput_samples_per_s=s["throughput_samples_per_s"], step_p50_s=s["step_s"]["p50"],
                     data_wait_fraction=s["data_wait_fraction"], final_metric=seen[-1] if seen else None,
                     time_to_target_s=tta["seconds"] if tta["reached"] else None, nodes=nodes)
            if p["time_to_target_s"] is not None:
                p["node_hours_to_target"] = p["time_to_target_s"] * nodes / 3600
        p["sacct"] = acct.get(name)
        if state == "failed" and p["sacct"] and not why.startswith("exit"):
            p["why"] = f"job {p['sacct'].get('state')}, exit {p['sacct'].get('exit_code')}: {why}"
        points.append(p)
    rows = group_repeats(points)
    mark_efficiency(rows)
    mark_front(rows)
    rows.sort(key=lambda r: (r["time_to_target_s"] is None, _v(r["time_to_target_s"]) or 0.0,
                             -(_v(r["throughput_samples_per_s"]) or 0.0)))
    differ = [k for k in _all_keys(points) if len({json.dumps(p["knobs"].get(k), default=str) for p in points}) > 1]
    return {"dir": str(out_dir), "target": f"{metric}{op}{goal:g}", "metric": metric, "accounting": accounting,
            "knobs_that_differ": differ, "rows": rows}


def _all_keys(points: list[dict]) -> list[str]:
    keys: list[str] = []
    for p in points:
        keys += [k for k in p["knobs"] if k not in keys]
    return keys


def _v(x):
    """A figure's value: the median of a repeats' range, or the number itself."""
    return x["value"] if isinstance(x, dict) else x


FIGURES = ("throughput_samples_per_s", "step_p50_s", "data_wait_fraction", "final_metric", "time_to_target_s",
           "node_hours_to_target")


def group_repeats(points: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for p in points:
        groups.setdefault(json.dumps([p["knobs"], p["ranks"]], sort_keys=True, default=str), []).append(p)
    rows = []
    for ps in groups.values():
        first = ps[0]
        row = {"point": first["point"] if len(ps) == 1 else first["point"].rsplit(",rep=", 1)[0],
               "points": [p["point"] for p in ps], "knobs": first["knobs"], "ranks": first["ranks"],
               "repeats": len(ps), "nodes": first["nodes"]}
        states = [p["state"] for p in ps]
        row["state"] = states[0] if len(set(states)) == 1 else ", ".join(
            f"{states.count(s)} {s}" for s in sorted(set(states)))
        row["why"] = "; ".join(sorted({p["why"] for p in ps if p["why"] and p["state"] != "finished"}))
        for f in FIGURES:
            vals = [p[f] for p in ps if p[f] is not None]
            if not vals:
                row[f] = None
            elif len(ps) == 1:
                row[f] = vals[0]
            else:
                row[f] = {"value": statistics.median(vals), "min": min(vals), "max": max(vals), "of": len(vals)}
        if len(ps) > 1 and row["time_to_target_s"] is not None and row["time_to_target_s"]["of"] < len(ps):
            row["note"] = f"{len(ps) - row['time_to_target_s']['of']} of {len(ps)} repeats did not reach the target"
        row["sacct"] = [p["sacct"] for p in ps] if len(ps) > 1 else ps[0]["sacct"]
        rows.append(row)
    return rows


def mark_efficiency(rows: list[dict]) -> None:
    """Scaling efficiency: throughput at R ranks / (R x the 1-rank point's with the same knobs)."""
    ones = {json.dumps(r["knobs"], sort_keys=True, default=str): r for r in rows if r["ranks"] == 1}
    for r in rows:
        base = ones.get(json.dumps(r["knobs"], sort_keys=True, default=str))
        t, t1 = _v(r["throughput_samples_per_s"]), _v(base["throughput_samples_per_s"]) if base else None
        r["scaling_efficiency"] = t / (r["ranks"] * t1) if t and t1 else None


def mark_front(rows: list[dict]) -> None:
    """On the front: no other point reaches the target at most as late with at most as many
    node-hours, and better in one of them."""
    pts = [(i, _v(r["time_to_target_s"]), _v(r["node_hours_to_target"])) for i, r in enumerate(rows)]
    pts = [(i, t, n) for i, t, n in pts if t is not None and n is not None]
    for r in rows:
        r["pareto"] = False
    for i, t, n in pts:
        rows[i]["pareto"] = not any((t2 <= t and n2 <= n) and (t2 < t or n2 < n) for j, t2, n2 in pts if j != i)


# --- SLURM accounting ---

def sacct(manifest: dict) -> tuple[dict[str, dict], str]:
    """Each point's latest array task in SLURM's accounting: {point: {elapsed_s, state,
    exit_code, max_rss_mb, nodes, job}}, and a line saying where the figures came from."""
    subs = manifest.get("submissions", [])
    if not subs:
        return {}, "none: the points ran here (--local), not as SLURM jobs"
    if not shutil.which("sacct"):
        return {}, "none: sacct not found; figures from the run directories alone"
    ids = sorted({s["job_id"] for s in subs})
    try:
        r = subprocess.run(["sacct", "-n", "-P", "-j", ",".join(ids), "--format=JobID,Elapsed,State,ExitCode,MaxRSS,"
                            "NodeList"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        return {}, f"none: sacct failed ({e}); figures from the run directories alone"
    if r.returncode != 0 or not r.stdout.strip():
        why = (r.stderr.strip().splitlines() or ["no records"])[-1]
        return {}, f"none: SLURM accounting did not answer ({why}); figures from the run directories alone"
    jobs: dict[str, dict] = {}
    for line in r.stdout.splitlines():
        parts = line.split("|")
        if len(parts) < 6:
            continue
        jid, elapsed, state, code, rss, nodes = parts[:6]
        task = jid.split(".", 1)[0]
        j = jobs.setdefault(task, {"max_rss_mb": None})
        if "." not in jid:
            j.update(job=task, elapsed_s=slurm_seconds(elapsed), state=state.split()[0] if state else state,
                     exit_code=code, nodes=nodes)
        mb = slurm_rss_mb(rss)
        if mb is not None:
            j["max_rss_mb"] = max(j["max_rss_mb"] or 0.0, mb)
    out = {}
    for s in subs:  # later submissions replace earlier ones: the point's latest job
        for i, name in enumerate(s["points"]):
            if f"{s['job_id']}_{i}" in jobs:
                out[name] = jobs[f"{s['job_id']}_{i}"]
    return out, "sacct (SLURM accounting): elapsed, state, exit code, MaxRSS, nodes of each point's latest job"


def slurm_seconds(text: str) -> float | None:
    """SLURM's [D-]HH:MM:SS (or MM:SS.mmm) as seconds."""
    try:
        days, _, rest = text.rpartition("-")
        parts = [float(x) for x in rest.split(":")]
        s = 0.0
        for x in parts:
            s = s * 60 + x
        return s + (int(days) * 86400 if days else 0)
    except ValueError:
        return None


def slurm_rss_mb(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    units = {"K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0 ** 2}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text) / 2**20
    except ValueError:
        return None


# --- text and report ---

def _fmt(x, scale=1.0, digits=0, unit="") -> str:
    if x is None:
        return "-"
    if isinstance(x, dict):
        return (f"{x['value'] * scale:.{digits}f}{unit} [{x['min'] * scale:.{digits}f}-{x['max'] * scale:.{digits}f}]")
    return f"{x * scale:.{digits}f}{unit}"


def _label(r: dict, differ: list[str]) -> str:
    parts = [f"{k.split('.')[-1]}=" + (json.dumps(r["knobs"][k], default=str).strip('"') if k in r["knobs"] else "-")
             for k in differ]
    return " ".join(parts) or "(one point)"


def table(board: dict) -> list[list[str]]:
    head = ["", "point", "ranks", "state", "samples/s", "step p50 ms", "data wait", "efficiency",
            f"final {board['metric']}", "time to target s", "node-h to target"]
    acct = any(r["sacct"] for r in board["rows"])
    if acct:
        head += ["sacct elapsed s", "MaxRSS MiB", "exit", "nodes"]
    out = [head]
    for r in board["rows"]:
        line = ["*" if r["pareto"] else "", _label(r, board["knobs_that_differ"]), str(r["ranks"]),
                r["state"] + (f" ({r['why']})" if r["why"] and r["state"] != "finished" else ""),
                _fmt(r["throughput_samples_per_s"]), _fmt(r["step_p50_s"], 1e3, 1), _fmt(r["data_wait_fraction"], 100,
                                                                                          1, "%"),
                "-" if r["scaling_efficiency"] is None else f"{r['scaling_efficiency']:.2f}",
                _fmt(r["final_metric"], digits=4), _fmt(r["time_to_target_s"], digits=1),
                _fmt(r["node_hours_to_target"], digits=5)]
        if acct:
            a = r["sacct"] if isinstance(r["sacct"], dict) else (r["sacct"] or [None])[-1]
            line += ["-", "-", "-", "-"] if not a else [_fmt(a.get("elapsed_s")), _fmt(a.get("max_rss_mb")),
                                                        f"{a.get('state', '-')} {a.get('exit_code', '')}".strip(),
                                                        a.get("nodes") or "-"]
        out.append(line)
    return out


def text(board: dict) -> str:
    rows = table(board)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"leaderboard of {board['dir']}: {len(board['rows'])} point(s), sorted by time to {board['target']}; "
             f"* = Pareto front (time vs node-hours)",
             f"accounting: {board['accounting']}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines) + "\n"


def plot(board: dict, path: Path) -> Path | None:
    """Time to target against node-hours, one dot per point, the front joined."""
    pts = [(r, _v(r["node_hours_to_target"]), _v(r["time_to_target_s"])) for r in board["rows"]]
    pts = [(r, n, t) for r, n, t in pts if n is not None and t is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r, n, t in pts:
        ax.scatter(n, t, color="C3" if r["pareto"] else "C0", zorder=3)
        ax.annotate(f"{_label(r, board['knobs_that_differ'])} r{r['ranks']}", (n, t), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    front = sorted((n, t) for r, n, t in pts if r["pareto"])
    if len(front) > 1:
        ax.plot(*zip(*front), color="C3", lw=1, label="Pareto front")
        ax.legend()
    ax.set_xlabel("node-hours to target")
    ax.set_ylabel(f"time to {board['target']} (s)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(path: str | Path, board: dict) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".html", ".md"):
        raise UserError(f"--report {path}: give a .html or .md file")
    png = plot(board, path.with_name(path.stem + "-time-vs-node-hours.png"))
    body = text(board)
    if path.suffix.lower() == ".md":
        parts = ["# Sweep leaderboard", "", "```", body.rstrip(), "```", ""]
        if png:
            parts += [f"![time to target vs node-hours]({png.name})", ""]
        path.write_text("\n".join(parts))
        return path
    img = ""
    if png:
        img = f'<img alt="time to target vs node-hours" src="data:image/png;base64,' \
              f'{base64.b64encode(png.read_bytes()).decode()}">'
    path.write_text("<!doctype html><html><head><meta charset='utf-8'><title>sweep leaderboard</title><style>"
                    "body{font-family:sans-serif;max-width:1400px;margin:auto}pre{background:#f4f4f4;padding:8px;"
                    "overflow-x:auto}img{max-width:100%}</style></head><body><h1>Sweep leaderboard</h1>"
                    f"<pre>{html.escape(body)}</pre>{img}<h2>JSON</h2><pre>"
                    f"{html.escape(json.dumps(board, indent=1, default=str))}</pre></body></html>")
    return path


# --- the command line (pipeline/cli.py dispatches) ---

def analyze_arguments(p) -> None:
    """pipeline analyze: run directories (pipeline/analysis/report.py), or a sweep's leaderboard."""
    from pipeline.analysis import report

    report.add_arguments(p)
    p.add_argument("--leaderboard", metavar="DIR", help="a sweep directory (pipeline sweep --out): one row per "
                                                        "point, ranked by time to --target, the Pareto front marked")
    p.set_defaults(func=analyze_cli)


def analyze_cli(a) -> int:
    from pipeline.analysis import report
    from pipeline.emit import emit

    if not a.leaderboard:
        return report.cli(a)
    if a.run_dirs:
        raise UserError("--leaderboard DIR takes the sweep directory alone, not run directories besides it")
    board = build(a.leaderboard, a.target)
    if a.report:
        board["report"] = str(write_report(a.report, board))
    return emit(board, a.json, text)
