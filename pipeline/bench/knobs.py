"""`pipeline bench knobs`: 2-rank runs of each tuning knob against the default, same data and
steps, each an ordinary run directory; samples/s over the steady steps (`pipeline analyze`'s
definition) and final validation accuracy. Knobs are interleaved round by round and the
default runs first and last in every round, so its spread shows the machine's noise; each
figure is the median of the rounds with min and max, and `vs_default` the median of the
per-round ratios to that round's mean default. Each run goes through the sweep's point runner
(`pipeline.cluster.sweep.run_point`), the one that `pipeline sweep --local` uses."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

from pipeline.bench.suite import Bench
from pipeline.cluster.sweep import run_point
from pipeline.errors import UserError
from pipeline.measure import median_range

KNOBS = [
    ("default (float32)", []),
    ("horovod.compression=fp16", ["horovod.compression=fp16"]),
    ("train.precision=mixed_bfloat16", ["train.precision=mixed_bfloat16"]),
    ("train.jit_compile=true (XLA)", ["train.jit_compile=true"]),
    ("backward_passes_per_step=2, batch 32", ["horovod.backward_passes_per_step=2", "train.batch_size=32"]),
    ("train.batch_size=128", ["train.batch_size=128"]),
    ("horovod.fusion_threshold_mb=1", ["horovod.fusion_threshold_mb=1"]),
    ("horovod.cycle_time_ms=5", ["horovod.cycle_time_ms=5"]),
    ("horovod.autotune=true", ["horovod.autotune=true"]),
    ("default again", []),
]


def run(out: str = "runs/knobs", ranks: int = 2, epochs: int = 2, repeats: int = 1, log=sys.stdout) -> list[dict]:
    from pipeline.analysis import logs, summary

    b = Bench(Path(out), quick=False, ranks=[ranks], repeats=repeats, steps=0, batch=64, log=log)
    b.out.mkdir(parents=True, exist_ok=True)
    b.make_data()
    runs: dict[int, list[dict]] = {i: [] for i in range(len(KNOBS))}
    for rep in range(repeats):
        for i, (label, sets) in enumerate(KNOBS):
            run_dir = b.out / "runs" / f"{i:02d}-r{rep}"
            shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume of an older one
            code, _ = run_point(ranks, None, run_dir, [f"data.dir={b.data}", f"train.epochs={epochs}",
                                                        "checkpoint.every_steps=0", "log.progress_every_s=3600",
                                                        *sets], env=b.env, timeout=900)
            if code != 0:
                raise UserError(f"bench knobs: {label} failed (exit {code}); see {run_dir / 'sweep-train.out'}")
            run = logs.load(run_dir)
            s, metrics = summary.summarize(run), run.metrics
            runs[i].append({"run_dir": str(run_dir), "samples_per_s": s["throughput_samples_per_s"],
                            "step_p50_ms": s["step_s"]["p50"] * 1e3, "global_batch": s["global_batch"],
                            "steps": s["steps"], "val_accuracy": metrics[-1]["val_accuracy"] if metrics else None})
            b.say(f"round {rep + 1}/{repeats} {label}: {runs[i][-1]['samples_per_s']:,.0f} samples/s, "
                  f"val_accuracy {runs[i][-1]['val_accuracy']:.4f}")
    last = len(KNOBS) - 1
    base = [(runs[0][r]["samples_per_s"] + runs[last][r]["samples_per_s"]) / 2 for r in range(repeats)]
    rows = []
    for i, (label, sets) in enumerate(KNOBS):
        rs = runs[i]
        rows.append({"knob": label, "sets": sets, "run_dirs": [x["run_dir"] for x in rs],
                     "samples_per_s": median_range([x["samples_per_s"] for x in rs]),
                     "vs_default": median_range([x["samples_per_s"] / base[r] for r, x in enumerate(rs)]),
                     "step_p50_ms": statistics.median(x["step_p50_ms"] for x in rs),
                     "global_batch": rs[0]["global_batch"], "steps": rs[0]["steps"],
                     "val_accuracy": median_range([x["val_accuracy"] for x in rs])})
    (b.out / "knobs.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"| knob ({ranks} ranks, {repeats} round(s)) | samples/s | vs default | step p50 ms | global batch | "
          f"steps | val accuracy |", file=log)
    print("|---|---|---|---|---|---|---|", file=log)
    for r in rows:
        sp, vd, va = r["samples_per_s"], r["vs_default"], r["val_accuracy"]
        print(f"| {r['knob']} | {sp['value']:,.0f} [{sp['min']:,.0f}-{sp['max']:,.0f}] | {vd['value']:.2f} "
              f"[{vd['min']:.2f}-{vd['max']:.2f}] | {r['step_p50_ms']:.1f} | {r['global_batch']} | {r['steps']} | "
              f"{va['value']:.4f} |", file=log)
    return rows


# --- the command line (pipeline/cli.py dispatches) ---

def add_arguments(p) -> None:
    from pipeline import config

    p.add_argument("--out", default="runs/knobs")
    p.add_argument("--ranks", type=int, default=2)
    config.flag(p, "--epochs", "train.epochs")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    p.set_defaults(func=cli)


def cli(a) -> int:
    run(a.out, a.ranks, a.epochs, a.repeats)
    return 0
