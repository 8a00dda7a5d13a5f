"""PNG plots of a run (matplotlib, no display needed). Long runs are drawn from at most a few
thousand points per line (every k-th step's median over k), so a 125k-step log plots fast."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.analysis.logs import Run
from pipeline.analysis.summary import matrix, steady_mask

MAX_POINTS = 2000


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = max(1, len(x) // MAX_POINTS)
    if k == 1:
        return x, y
    n = len(x) // k * k
    return x[:n:k], np.nanmedian(y[:n].reshape(-1, k), axis=1)


def run_plots(run: Run, summary: dict, out_dir: Path, name: str) -> list[Path]:
    """One run's PNGs: step time per rank, the steady steps' distribution, data wait per rank,
    loss and accuracy over time."""
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    m = matrix(run)
    files = []
    if not m.ranks:
        return files
    for what, draw in (("step-time", _step_time), ("step-hist", _step_hist), ("data-wait", _data_wait),
                       ("loss-accuracy", _loss_accuracy)):
        fig = draw(plt, m, run, summary)
        p = out_dir / f"{name}-{what}.png"
        fig.tight_layout()
        fig.savefig(p, dpi=90)
        plt.close(fig)
        files.append(p)
    return files


def _step_time(plt, m, run: Run, summary: dict):
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for j, r in enumerate(m.ranks):
        x, y = _thin(m.steps, m.cols["step_s"][:, j])
        ax.plot(x, y * 1e3, lw=0.8, label=f"rank {r}")
    ax.set(xlabel="step", ylabel="step time (ms)", title="Step time per rank")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=4)
    return fig


def _step_hist(plt, m, run: Run, summary: dict):
    step_s = m.cols["step_s"]
    steady, _, _ = steady_mask(np.nanmax(m.cols["time"], axis=1), np.nanmax(step_s, axis=1))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    v = step_s[steady].ravel()
    v = v[np.isfinite(v)] * 1e3
    if v.size:
        ax.hist(v, bins=60, color="tab:blue")
        for q, ls in ((50, "-"), (90, "--"), (99, ":")):
            ax.axvline(np.percentile(v, q), color="k", ls=ls, lw=0.8, label=f"p{q}")
        ax.legend(fontsize=7)
    ax.set(xlabel="step time (ms), steady steps", ylabel="steps (all ranks)", title="Step-time distribution")
    return fig


def _data_wait(plt, m, run: Run, summary: dict):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    fr = [r["data_wait_fraction"] or 0.0 for r in summary["per_rank"]]
    colors = ["tab:red" if r["rank"] in summary["stragglers"] else "tab:blue" for r in summary["per_rank"]]
    ax.bar([str(r["rank"]) for r in summary["per_rank"]], fr, color=colors)
    ax.set(xlabel="rank (red: flagged straggler)", ylabel="data wait / step time", title="Data-wait fraction per rank")
    return fig


def _loss_accuracy(plt, m, run: Run, summary: dict):
    t_end = np.nanmax(m.cols["time"], axis=1)
    loss = m.cols["loss"][:, 0]
    t_rel = t_end - (t_end[np.isfinite(t_end)][0] if np.isfinite(t_end).any() else 0)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    if np.isfinite(loss).any() and np.isfinite(t_rel).any():
        x, y = _thin(t_rel, loss)
        ax.plot(x, y, lw=0.8, color="tab:orange", label=f"training loss (rank {m.ranks[0]})")
        ax.set(xlabel="seconds since the first step", ylabel="loss")
    acc = [(mm["time"], mm["val_accuracy"]) for mm in run.metrics
           if isinstance(mm.get("time"), (int, float)) and isinstance(mm.get("val_accuracy"), (int, float))]
    if acc and np.isfinite(t_end).any():
        ax2 = ax.twinx()
        t0 = t_end[np.isfinite(t_end)][0]
        ax2.plot([a[0] - t0 for a in acc], [a[1] for a in acc], "o-", color="tab:green", label="val accuracy")
        ax2.set_ylabel("validation accuracy")
        ax2.set_ylim(0, 1.02)
        ax2.legend(loc="center right", fontsize=7)
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title("Loss and accuracy over time")
    return fig


def scaling_plot(rows: list[dict], out_dir: Path) -> Path | None:
    if not rows:
        return None
    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ranks = [r["ranks"] for r in rows]
    ax.plot(ranks, [r["speedup"] for r in rows], "o-", label="measured speedup")
    ax.plot(ranks, [n / ranks[0] for n in ranks], "k--", lw=0.8, label="ideal")
    for r in rows:
        ax.annotate(f"{r['efficiency']:.2f}", (r["ranks"], r["speedup"]), textcoords="offset points", xytext=(4, -10),
                    fontsize=7)
    ax.set(xlabel="ranks", ylabel="speedup", title="Scaling (labels: efficiency)")
    ax.legend(fontsize=7)
    p = out_dir / "scaling.png"
    fig.tight_layout()
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return p
