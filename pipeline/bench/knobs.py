"""`pipeline bench knobs`: one 2-rank run per tuning knob against the default, same data and
steps, each an ordinary run directory; samples/s (steady steps, `pipeline analyze`'s
definition) and final validation accuracy. The default runs first and last, so the spread
between those two shows the machine's noise."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .suite import Bench

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


def run(out: str = "runs/knobs", ranks: int = 2, epochs: int = 2, log=sys.stdout) -> list[dict]:
    from ..analysis import logs, summary

    b = Bench(Path(out), quick=False, ranks=[ranks], repeats=1, steps=0, batch=64, log=log)
    b.out.mkdir(parents=True, exist_ok=True)
    b.make_data()
    rows = []
    for i, (label, sets) in enumerate(KNOBS):
        run_dir = b.out / "runs" / f"{i:02d}"
        args = [b.py, "-m", "pipeline", "train", "--run-dir", str(run_dir), "--set", f"data.dir={b.data}",
                "--set", f"train.epochs={epochs}", "--set", "checkpoint.every_steps=0",
                "--set", "log.progress_every_s=3600"]
        for s in sets:
            args += ["--set", s]
        b.mpirun(ranks, args)
        s = summary.summarize(logs.load(run_dir))
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        rows.append({"knob": label, "sets": sets, "run_dir": str(run_dir),
                     "samples_per_s": s["throughput_samples_per_s"], "step_p50_ms": s["step_s"]["p50"] * 1e3,
                     "global_batch": s["global_batch"], "steps": s["steps"],
                     "val_accuracy": metrics[-1]["val_accuracy"] if metrics else None})
        b.say(f"{label}: {rows[-1]['samples_per_s']:,.0f} samples/s, val_accuracy {rows[-1]['val_accuracy']:.4f}")
    base = (rows[0]["samples_per_s"] + rows[-1]["samples_per_s"]) / 2
    for r in rows:
        r["vs_default"] = r["samples_per_s"] / base
    (b.out / "knobs.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("| knob | samples/s | vs default | step p50 ms | global batch | steps | val accuracy |", file=log)
    print("|---|---|---|---|---|---|---|", file=log)
    for r in rows:
        print(f"| {r['knob']} | {r['samples_per_s']:,.0f} | {r['vs_default']:.2f} | {r['step_p50_ms']:.1f} | "
              f"{r['global_batch']} | {r['steps']} | {r['val_accuracy']:.4f} |", file=log)
    return rows
