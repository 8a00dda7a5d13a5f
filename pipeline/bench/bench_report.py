"""The bench's table (stdout and report.md) and its PNG plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _t(s: dict, digits: int = 2) -> str:
    return f"{s['value']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def _verdict(s: dict) -> str:
    return f"target >= {s['target']}: {'met' if s['met'] else 'MISSED'}"


def table(res: dict) -> str:
    st = res["settings"]
    lines = [f"# make bench ({'quick' if st['quick'] else 'full'}): {st['repeats']} repeat(s), {st['steps']} steps, "
             f"{st['warmup_steps']} warm-up steps left out, batch {st['batch_per_rank']}/rank, {st['cores']} cores",
             "", "| figure | median [min-max] | target |", "|---|---|---|"]
    lines.append(f"| pipeline (1 rank, HDF5, step logs) / plain Keras fit | {_t(res['pipeline_vs_keras'], 3)} | "
                 f"{_verdict(res['pipeline_vs_keras'])} |")
    lines.append(f"| pipeline / Horovod Keras loop ({max(st['ranks'])} ranks) | "
                 f"{_t(res['pipeline_vs_horovod_loop'], 3)} | {_verdict(res['pipeline_vs_horovod_loop'])} |")
    if "pipeline_vs_itself" in res:
        aa = res["pipeline_vs_itself"]
        lines.append(f"| A/A: pipeline / the same pipeline run again ({aa['ranks']} ranks, {aa['model']}) | "
                     f"{_t(aa, 3)} | the bench's own noise band |")
    if "efficiency_2_ranks" in res:
        lines.append(f"| weak-scaling efficiency, 2 ranks | {_t(res['efficiency_2_ranks'], 3)} | "
                     f"{_verdict(res['efficiency_2_ranks'])} |")
    if "step_log_cost" in res:
        c = res["step_log_cost"]
        lines.append(f"| step-log cost, share of step time (worst rank of each run) | "
                     f"{c['value']:.3%} [{c['min']:.3%}-{c['max']:.3%}] | < 0.5% |")
    a = res["allreduce_ratio_16mib_plus"]
    lines.append(f"| Horovod / MPI allreduce busbw, >= 16 MiB (worst size) | {a['value']:.3f} | "
                 f"target >= {a['target']}: {'met' if a['met'] else 'MISSED'} |")
    for e in res.get("efficiency_breakdown", []):
        lines.append(f"| ... of which thread bound: 1 rank on {e['threads_per_rank']} core(s) / 1 rank on all "
                     f"| {_t(e['thread_bound'], 3)} | what threads give one rank |")
        lines.append(f"| ... and rank efficiency: {e['ranks']} ranks / ({e['ranks']} x 1 rank on "
                     f"{e['threads_per_rank']} core(s)) | {_t(e['rank_efficiency'], 3)} | communication and contention |")
    if res.get("models"):
        lines += ["", f"| model | batch/rank | pipeline / plain Keras | pipeline / Horovod loop ({max(st['ranks'])} "
                      f"ranks) | overhead per step (us) |", "|---|---|---|---|---|"]
        for m in res["models"]:
            ratios = " | ".join(f"{_t(m[k], 3)} ({_verdict(m[k])})" for k in ("pipeline_vs_keras", "pipeline_vs_horovod_loop"))
            lines.append(f"| {m['model']} | {m['batch_per_rank']} | {ratios} | {_t(m['overhead_us_per_step'], 0)} |")
        lines.append(f"\nBaselines ran with steps_per_execution 1 and {st['steps_per_call']} (the pipeline's "
                     f"train.steps_per_call); each ratio is against the faster of the two in its repeat.")
        lines += mfu_lines(res["models"], max(st["ranks"]))
        lines += timeline_lines(res["models"])
    lines += ["", "| samples/s | median [min-max] |", "|---|---|"]
    for k, v in res["throughput"].items():
        lines.append(f"| {k} | {_t(v, 0)} |")
    for name in ("scaling", "strong_scaling"):
        if res.get(name):
            lines += ["", f"| {name.replace('_', ' ')}: ranks | global batch | samples/s | speedup | efficiency |",
                      "|---|---|---|---|---|"]
            lines += [f"| {r['ranks']} | {r['global_batch']} | {r['throughput_samples_per_s']:,.0f} | "
                      f"{r['speedup']:.2f} | {r['efficiency']:.3f} |" for r in res[name]]
    lines += ["", "| allreduce bytes | Horovod busbw GB/s | MPI busbw GB/s | ratio | Horovod defaults | "
                  "MPI defaults | ratio defaults | Gloo |", "|---|---|---|---|---|---|---|---|"]
    for r in res["allreduce"]:
        lines.append(f"| {r['bytes']:,} | {r['hvd_busbw_gbps']:.3f} | {r['mpi_busbw_gbps']:.3f} | {r['ratio']:.2f} | "
                     f"{r.get('hvd_default_busbw_gbps', float('nan')):.3f} | "
                     f"{r.get('mpi_default_busbw_gbps', float('nan')):.3f} | {r.get('ratio_defaults', float('nan')):.2f} | "
                     + (f"{r['hvd_gloo_busbw_gbps']:.3f} |" if "hvd_gloo_busbw_gbps" in r else "- |"))
    lines.append(f"\nsingle-core memcpy: {res['memcpy_gbps']:.2f} GB/s (the limit line)")
    if "reader_vs_raw" in res:
        r = res["reader_vs_raw"]
        lines.append(f"reader / raw h5py read, cold cache (slowest rank): {_t(r, 2)}; warm: "
                     f"{_t(r['reader_vs_raw_warm'], 2)}; reader / training consumption: "
                     f"{r['reader_vs_training']:.0f}x (details: {r['detail']})")
    return "\n".join(lines) + "\n"


def mfu_lines(models: list[dict], n: int) -> list[str]:
    """Per model row: each side's MFU (median samples/s x FLOPs per sample / peak)."""
    rows = [m for m in models if m.get("mfu")]
    if not rows:
        return []
    out = ["", f"| model | MFLOP/sample | pipeline 1 rank | plain Keras | pipeline {n} ranks | Horovod loop | peak |",
           "|---|---|---|---|---|---|---|"]
    for m in rows:
        f = m["mfu"]
        out.append(f"| {m['model']} | {f['model_flops_per_sample'] / 1e6:,.1f} | {f['pipeline_1']:.1%} | "
                   f"{f['keras']:.1%} | {f['pipeline_n']:.1%} | {f['horovod_loop']:.1%} | {f['peak_flops_per_s'] / 1e9:,.0f} GFLOP/s "
                   f"({f['peak_device']}: {f['peak_source']}) |")
    return out


def timeline_lines(models: list[dict]) -> list[str]:
    """Per model row: both sides' Horovod timelines of the last repeat, per step."""
    rows = [m for m in models if m.get("timelines") and all(m["timelines"].values())]
    if not rows:
        return []

    def cell(t: dict) -> str:
        tail = t["exposed_tail_p50_s"]
        return (f"{t['gradient_ops_per_step']:.1f} fused + {t['solo_ops_per_step']:.1f} alone, tail "
                + (f"{tail * 1e3:.2f} ms" if tail is not None else "-"))

    out = ["", "| model (last repeat's Horovod timelines, per step) | pipeline | Horovod loop |", "|---|---|---|"]
    out += [f"| {m['model']} | {cell(m['timelines']['pipeline'])} | {cell(m['timelines']['horovod_loop'])} |"
            for m in rows]
    out.append("\n(fused: gradient allreduce calls; alone: collectives no gradient shares; tail: last gradient "
               "ready on every rank -> reduced, median)")
    return out


def write(out: Path, res: dict, weak: dict, keras: list, hvdloop: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        pngs.append(name)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, style in (("scaling", "o-"), ("strong_scaling", "s--")):
        rows = res.get(name) or []
        if rows:
            ax.plot([r["ranks"] for r in rows], [r["speedup"] for r in rows], style, label=name.replace("_", " "))
    rk = [r["ranks"] for r in res["scaling"]]
    ax.plot(rk, rk, "k:", lw=0.8, label="ideal")
    ax.set(xlabel="ranks", ylabel="speedup vs 1 rank", title="Scaling")
    ax.legend(fontsize=7)
    save(fig, "scaling.png")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [r["bytes"] for r in res["allreduce"]]
    ax.plot(x, [r["hvd_busbw_gbps"] for r in res["allreduce"]], "o-", label="Horovod (pipeline settings)")
    ax.plot(x, [r["mpi_busbw_gbps"] for r in res["allreduce"]], "s-", label="mpi4py Allreduce")
    if all("hvd_default_busbw_gbps" in r for r in res["allreduce"]):
        ax.plot(x, [r["hvd_default_busbw_gbps"] for r in res["allreduce"]], "o--", label="Horovod (defaults)")
    if all("hvd_gloo_busbw_gbps" in r for r in res["allreduce"]):
        ax.plot(x, [r["hvd_gloo_busbw_gbps"] for r in res["allreduce"]], "^-", label="Horovod over Gloo")
    ax.axhline(res["memcpy_gbps"], color="k", ls=":", label="single-core memcpy")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="message bytes", ylabel="busbw (GB/s)", title="Allreduce bandwidth")
    ax.legend(fontsize=7)
    save(fig, "allreduce.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    w = res["settings"]["warmup_steps"]
    series = [(f"pipeline {n} rank(s)", rs[0]["step_s"][w:]) for n, rs in sorted(weak.items()) if rs]
    # The baselines' steady steps (per execution of steps_per_execution steps, over its steps).
    series.append(("plain Keras", keras[0]["step_s"]))
    series.append((f"Horovod Keras loop {hvdloop[0]['ranks']} ranks", hvdloop[0]["step_s"]))
    ax.boxplot([np.array(s) * 1e3 for _, s in series], showfliers=False)
    ax.set_xticks(range(1, len(series) + 1), [n for n, _ in series])
    ax.set(ylabel="step time (ms), steady steps", title="Step-time distributions (first repeat)")
    plt.setp(ax.get_xticklabels(), fontsize=7)
    save(fig, "step-times.png")

    runs = " ".join(str(Path(r["run_dir"]).relative_to(out)) for rs in weak.values() for r in rs[:1])
    text = table(res) + "\n" + "\n".join(f"![{p[:-4]}]({p})" for p in pngs) + "\n\n" + \
        f"Every pipeline run is a run directory under `runs/`: `pipeline analyze` reads them, e.g. " \
        f"`cd {out} && pipeline analyze {runs}`.\n"
    (out / "report.md").write_text(text)
