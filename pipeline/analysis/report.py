"""`pipeline analyze`: summaries as text, JSON, plots and a one-page report."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from pipeline import target as target_mod
from pipeline.analysis import commmodel, logs, mlperf_log, plots, postmortem, summary as summary_mod
from pipeline.errors import UserError
from pipeline.mlperf.log import logs as mlperf_logs


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1e3:.2f}"


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def _num(v, digits=0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def text_summary(s: dict) -> list[str]:
    lines = [f"== {s['run_dir']}"]
    lines.append(f"ranks {s['ranks']} (logs from {s['ranks_with_logs']}), global batch {s['global_batch']}, "
                 f"steps {s['steps']}")
    lines += [f"  ! {p}" for p in _problems(s) + s["notes"]]
    if s.get("staging"):
        g = s["staging"]
        lines.append(f"staging: {g['wall_s']:.1f} s to stage the run's files ({g['files']} files, {g['bytes'] / 1e6:.1f} MB "
                     f"in {g['dirs']} node-local director{'y' if g['dirs'] == 1 else 'ies'}: {g['copied']} copied, "
                     f"{g['reused']} already there)")
    if not s["steps"]:
        return lines
    st = s["step_s"]
    lines += [
        f"warm-up: {s['warmup_steps']} steps left out ({s['warmup_rule']}); {s['steady_steps']} steady steps"
        + (f"; {s['suspended_steps']} step(s) across a suspension left out ({s['suspended_s']:.0f} s not running)"
           if s.get("suspended_steps") else ""),
        f"throughput: {_num(s['throughput_samples_per_s'])} samples/s (global)",
        f"step time ms: p50 {_ms(st['p50'])}  p90 {_ms(st['p90'])}  p99 {_ms(st['p99'])}  max {_ms(st['max'])}  "
        f"mean {_ms(st['mean'])}",
        f"time split: data wait {_pct(s['data_wait_fraction'])}, compute+allreduce {_pct(s['compute_fraction'])} "
        f"(of which waiting for a slower rank's batch, estimated: {_pct(s['sync_wait_fraction_estimate'])})",
    ]
    lines.append(mfu_line(s["mfu"]))
    lines += gpu_lines(s.get("gpu"))
    lines += _communication_lines(s.get("communication", {}))
    lines += _rank_lines(s)
    return lines + [_time_to_accuracy_line(s["time_to_accuracy"])]


def _flops(v) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if v >= scale:
            return f"{v / scale:.3g} {unit}FLOP"
    return f"{v:.3g} FLOP"


def mfu_line(m: dict) -> str:
    if m["value"] is None:
        return f"MFU: - ({m['note']})"
    return (f"MFU: {m['value']:.1%} ({_flops(m['achieved_flops_per_s'])}/s achieved of {_flops(m['peak_flops_per_s'])}"
            f"/s peak, {m['peak_device']}: {m['peak_source']}; model {_flops(m['model_flops_per_sample'])} per sample"
            f": {m['flops_source']})")


def gpu_lines(g: dict | None) -> list[str]:
    if not g:
        return []
    parts = []
    if "gpu_mem_peak_mb" in g:
        x = g["gpu_mem_peak_mb"]
        parts.append(f"memory peak {_num(x['min'])}-{_num(x['max'])} MiB (ranks {x['min_rank']}, {x['max_rank']})")
    if "gpu_util_mean" in g:
        x = g["gpu_util_mean"]
        parts.append(f"utilization {x['min']:.0f}-{x['max']:.0f}% (ranks {x['min_rank']}, {x['max_rank']}; "
                     f"spread {x['spread']:.0f} points)")
    return ["GPU across ranks: " + ", ".join(parts)]


def _problems(s: dict) -> list[str]:
    problems = []
    if s["missing_ranks"]:
        problems.append(f"missing or empty rank logs: {s['missing_ranks']}")
    if s["skipped_lines"]:
        problems.append(f"skipped_lines {s['skipped_lines']} (unparseable or incomplete)")
    if s["partial_last_lines"]:
        problems.append(f"truncated last line on ranks {s['partial_last_lines']} (still being written, or cut off)")
    if s["repeated_steps"]:
        problems.append(f"{s['repeated_steps']} step records repeated (re-run after a crash; the last counts)")
    return problems


def _communication_lines(comm: dict) -> list[str]:
    if comm.get("source") == "timeline":
        ph = comm["phases"]
        parts = [f"{k} {_ms(v['per_step_s'])} ms ({_pct(v['fraction_of_step'])})" for k, v in ph.items()
                 if k.startswith(("NEGOTIATE_ALLREDUCE", "ALLREDUCE", "MPI_ALLREDUCE", "MEMCPY", "NCCL", "QUEUE"))]
        lines = ["communication per step (timeline): " + ", ".join(parts)]
        if "solo_ops_per_step" in comm:
            tail = comm.get("exposed_tail_p50_s")
            lines.append(f"collectives per step: {comm['gradient_ops_per_step']:.1f} fused gradient allreduce(s), "
                         f"{comm['solo_ops_per_step']:.1f} of other tensors alone; last gradient ready -> reduced: "
                         + (f"{_ms(tail)} ms (p50)" if tail is not None else "n/a"))
        if comm["last_to_negotiate"]:
            lines.append("last to negotiate: " + ", ".join(
                f"rank {e['rank']} {e['share']:.0%} of tensors, others waited {_ms(e['late_s_per_step'])} ms/step"
                for e in comm["last_to_negotiate"]))
        return lines
    if comm.get("source") == "estimate":
        return [f"communication per step (estimate, vs 1-rank run {comm['baseline_run']}): "
                f"{_ms(comm['per_step_s'])} ms ({_pct(comm['fraction_of_step'])} of a step)"]
    return [f"communication: {comm['note']}"] if comm.get("note") else []


def _rank_lines(s: dict) -> list[str]:
    gpu = bool(s.get("gpu"))
    lines = ["rank  steps  step p50 ms  data p50 ms  compute p50 ms  data wait  samples/s  RSS max MiB"
             + ("  GPU peak MiB  GPU util" if gpu else "")]
    for r in s["per_rank"]:
        flag = "  <- straggler" if r["rank"] in s["stragglers"] else ""
        util = r.get("gpu_util_mean")
        lines.append(f"{r['rank']:>4}  {r['steps']:>5}  {_ms(r['step_s_p50']):>11}  {_ms(r['data_s_p50']):>11}  "
                     f"{_ms(r['compute_s_p50']):>14}  {_pct(r['data_wait_fraction']):>9}  "
                     f"{_num(r['samples_per_s']):>9}  {_num(r['rss_mb_max']):>11}"
                     + (f"  {_num(r.get('gpu_mem_peak_mb')):>12}  {'-' if util is None else f'{util:.0f}%':>8}"
                        if gpu else "") + flag)
    if not s["stragglers"]:
        return lines + ["stragglers: none (rule: docs/analysis.md)"]
    for d in s["straggler_details"]:
        if d["figure"] == "negotiation":
            lines.append(f"straggler: rank {d['rank']} arrives last at negotiation; the others wait "
                         f"{_ms(d['excess_s_per_step'])} ms per step for it")
        else:
            lines.append(f"straggler: rank {d['rank']} {d['figure']} median {_ms(d['median_s'])} ms vs "
                         f"{_ms(d['others_median_s'])} ms for the others ({d['ratio']:.2f}x, above them in "
                         f"{d['share_of_steps_above']:.0%} of steps, +{_ms(d['excess_s_per_step'])} ms per step)")
    return lines


def _time_to_accuracy_line(tta: dict) -> str:
    goal = f"{tta['metric']} {tta['op']} {tta['target']}"
    if tta["reached"]:
        return f"time to {goal}: {_num(tta['seconds'], 1)} s (step {tta['step']}, epoch {tta['epoch']})"
    best = tta["best"]
    return f"time to {goal}: not reached" + (f" (best {best:.4f})" if best is not None else
                                             f" (no evaluations with {tta['metric']})")


def scaling_lines(rows: list[dict], declined: list[dict]) -> list[str]:
    out = []
    if rows:
        out = ["== scaling (against the run with the fewest ranks of the same model, precision and threads per rank)",
               "ranks  threads  global batch  samples/s  speedup  efficiency  mode"]
        out += [f"{r['ranks']:>5}  {r['threads_per_rank'] or '-':>7}  {r['global_batch']:>12}  "
                f"{_num(r['throughput_samples_per_s']):>9}  {r['speedup']:>7.2f}  {r['efficiency']:>10.2f}  {r['mode']}"
                for r in rows]
    out += [f"scaling left out for {d['run_dir']} ({d['ranks']} ranks): {d['reason']}" for d in declined]
    return out


def compare_lines(a: dict, b: dict, rows: list[dict], differs: dict) -> list[str]:
    out = [f"== compare  A: {a['run_dir']}  B: {b['run_dir']}"]
    if differs:
        out.append(f"A and B differ in: {summary_mod.describe(differs)} (the ratios below include that)")
    out.append(f"{'figure':<26} {'A':>12} {'B':>12} {'B/A':>7}")
    for r in rows:
        fa, fb = (_fmt_any(r["a"]), _fmt_any(r["b"]))
        ratio = f"{r['b_over_a']:.3f}" if r.get("b_over_a") is not None else ""
        out.append(f"{r['figure']:<26} {fa:>12} {fb:>12} {ratio:>7}")
    return out


def _fmt_any(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _safe_name(run_dir: str, i: int) -> str:
    return f"{i}-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(run_dir).name) or "run")


def analyze(run_dirs: list[str], *, target=0.9, plots_dir: str | None = None,
            report: str | None = None, compare: bool = False, link_gbps: float | None = None,
            comm_file: str | None = None, compute_ms: float | None = None) -> dict:
    if compare and len(run_dirs) != 2:
        raise UserError("--compare takes exactly two run directories (A B)")
    if report and Path(report).suffix.lower() not in (".html", ".md"):
        raise UserError(f"--report {report}: give a .html or .md file")
    target_mod.parse(target)  # a bad --target fails before any reading
    runs = [logs.load(d) for d in run_dirs]
    sums = [summary_mod.summarize(r, target) for r in runs]
    for d, s in zip(run_dirs, sums):
        if postmortem.present(d):  # a run that stalled, raised or was killed: say who and where
            s["postmortem"] = {k: v for k, v in postmortem.analyze(d).items() if k != "run_dir"}
        if mlperf_logs(d):  # one per attempt: time to train and its split
            s["mlperf"] = [mlperf_log.read(p) for p in mlperf_logs(d)]
    summary_mod.communication_estimates(sums)
    if link_gbps is not None or comm_file:
        summary_mod.comm_model(sums, commmodel.load_network(link_gbps, comm_file),
                               compute_ms / 1e3 if compute_ms is not None else None)
    result = {"runs": sums}
    rows, declined = summary_mod.scaling(sums)
    if len({s["ranks"] for s in sums if s.get("throughput_samples_per_s")}) > 1:
        result["scaling"] = rows
    if declined:
        result["scaling_declined"] = declined
    if compare:
        result["compare"] = summary_mod.compare(sums[0], sums[1])
        result["compare_setup_differs"] = summary_mod.differences(sums[0], sums[1])
    pics: list[list[Path]] = [[] for _ in runs]
    scaling_png = None
    if plots_dir or report:
        pdir = Path(plots_dir) if plots_dir else Path(report).with_suffix("").parent / (Path(report).stem + "-plots")
        for i, (run, s) in enumerate(zip(runs, sums)):
            pics[i] = plots.run_plots(run, s, pdir, _safe_name(s["run_dir"], i))
        scaling_png = plots.scaling_plot(rows, pdir)
        result["plots"] = [str(p) for ps in pics for p in ps] + ([str(scaling_png)] if scaling_png else [])
    if report:
        write_report(Path(report), result, pics, scaling_png)
        result["report"] = report
    return result


def model_lines(s: dict) -> list[str]:
    m = s.get("comm_model")
    if not m:
        return []
    net, t = m["network"], m["predicted_terms_s"]
    out = [f"communication model ({m['hosts']} hosts x {m['ranks_per_host']} ranks, {net['link_gbps']:g} Gbit/s "
           f"x efficiency {net['efficiency']:.3f}"
           + (f", hosts sustain {net['host_gbps']:.2f} Gbit/s" + (" (the bound)" if net["host_gbps"] <
                                                                 net["link_gbps"] * net["efficiency"] else "")
              if net.get("host_gbps") else "")
           + f", {m['gradient_bytes']:,} gradient bytes/step): predicted "
           f"{_ms(m['predicted_comm_s'])} ms/step (alpha {_ms(t['alpha_s'])} + latency {_ms(t['latency_s'])} + "
           f"bandwidth {_ms(t['bandwidth_s'])})"]
    if m["measured_comm_s"] is not None:
        out.append(f"  measured {_ms(m['measured_comm_s'])} ms/step ({m['measured_phase']} of the gradients, "
                   f"timeline, {m['fused_ops_per_step']:.1f} fused operations per step): "
                   f"predicted/measured {m['comm_ratio']:.2f}")
    else:
        out.append("  measured: no timeline in this run (log.timeline=true records one)")
    if m.get("predicted_step_s") is not None:
        out.append(f"  step: predicted {_ms(m['predicted_step_s'])} ms (compute {_ms(m['compute_s'])}), measured p50 "
                   f"{_ms(m['measured_step_s'])} ms: predicted/measured {m['step_ratio']:.2f}; efficiency predicted "
                   f"{m['predicted_efficiency']:.3f}, measured {m['measured_efficiency']:.3f}")
    return out


def text(result: dict) -> str:
    lines = []
    for s in result["runs"]:
        lines += text_summary(s) + model_lines(s)
        for m in s.get("mlperf", []):
            lines += mlperf_log.lines(m)
        if s.get("postmortem"):
            lines += ["== post-mortem (pipeline postmortem RUN_DIR)"] + s["postmortem"]["lines"]
        lines.append("")
    lines += scaling_lines(result.get("scaling", []), result.get("scaling_declined", []))
    if "compare" in result:
        lines += compare_lines(result["runs"][0], result["runs"][1], result["compare"],
                               result.get("compare_setup_differs", {}))
    if result.get("plots"):
        lines.append(f"plots: {len(result['plots'])} PNG files in {Path(result['plots'][0]).parent}")
    if result.get("report"):
        lines.append(f"report: {result['report']}")
    return "\n".join(lines).rstrip() + "\n"


def write_report(path: Path, result: dict, pics: list[list[Path]], scaling_png: Path | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = text(result)
    if path.suffix.lower() == ".md":
        parts = ["# pipeline analyze", "", "```", body.rstrip(), "```", ""]
        for s, ps in zip(result["runs"], pics):
            parts.append(f"## {s['run_dir']}")
            parts += [f"![{p.stem}]({_rel(p, path.parent)})" for p in ps] + [""]
        if scaling_png:
            parts += ["## Scaling", f"![scaling]({_rel(scaling_png, path.parent)})", ""]
        path.write_text("\n".join(parts))
        return
    # HTML: one self-contained page, plots embedded, readable offline.
    def img(p: Path) -> str:
        data = base64.b64encode(p.read_bytes()).decode()
        return f'<img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}">'

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>pipeline analyze</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}pre{background:#f4f4f4;padding:8px;"
             "overflow-x:auto}img{max-width:100%}</style></head><body><h1>pipeline analyze</h1>",
             f"<pre>{html.escape(body)}</pre>"]
    for s, ps in zip(result["runs"], pics):
        parts.append(f"<h2>{html.escape(s['run_dir'])}</h2>" + "".join(img(p) for p in ps))
    if scaling_png:
        parts.append("<h2>Scaling</h2>" + img(scaling_png))
    parts.append("<h2>JSON</h2><pre>" + html.escape(json.dumps(
        {k: v for k, v in result.items() if k != "report"}, indent=1, default=str)) + "</pre></body></html>")
    path.write_text("".join(parts))


def _rel(p: Path, base: Path) -> str:
    try:
        return str(p.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(p.resolve())


# --- the command line (pipeline/cli.py dispatches) ---

DEFAULT_TARGET = "0.9"


def add_arguments(p) -> None:
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout instead of the text summary")
    p.add_argument("--plots", metavar="DIR", help="write PNG plots here")
    p.add_argument("--report", metavar="FILE", help="one page with summary, tables and plots (.html or .md)")
    p.add_argument("--target", help="the quality for time to target: METRIC>=X or METRIC<=X with any val_<name> of "
                                    "metrics.jsonl (val_mae<=0.2); a number X means val_accuracy>=X (default "
                                    f"{DEFAULT_TARGET})")
    p.add_argument("--compare", action="store_true", help="two run directories A B: the differences, figure by figure")
    p.add_argument("--link-gbps", type=float, help="per-host link rate: add the communication model's prediction "
                                                   "next to the measured figures (docs/multinode.md)")
    p.add_argument("--comm", metavar="FILE", help="alpha, latency and efficiency from pipeline bench comm --out FILE")
    p.add_argument("--compute-ms", type=float, help="compute time per step without communication (default: a "
                                                    "1-rank run among the run directories)")
    p.set_defaults(func=cli)


def cli(a) -> int:
    from pipeline.emit import emit

    if not a.run_dirs:
        raise UserError("pipeline analyze: give one or more run directories, or --leaderboard DIR")
    result = analyze(a.run_dirs, target=a.target or DEFAULT_TARGET, plots_dir=a.plots, report=a.report,
                     compare=a.compare, link_gbps=a.link_gbps, comm_file=a.comm, compute_ms=a.compute_ms)
    return emit(result, a.json, text)
