"""`pipeline data stats DIR`: per-channel mean and standard deviation of the training split,
for `data.transform: standardize`, written to DIR/stats.json.

One pass in bounded memory: samples are read in batches of at most ~64 MiB and merged into
running (count, mean, M2) per channel with Chan et al.'s pairwise update, in float64, so a
terabyte-sized split costs no more memory than a small one and the sums do not lose
precision. Values are taken as the model sees them before the transform (uint8 scaled to
[0, 1], other types as stored).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from pipeline.data.shards import load_manifest, open_shard
from pipeline.fsutil import atomic_write_text

BATCH_BYTES = 64 << 20


def stats(data_dir: str | Path, root: str | None = None, progress=print) -> dict:
    m = load_manifest(data_dir, root)
    t0 = time.perf_counter()
    channels = m.shape[-1]
    n, mean, m2 = 0, np.zeros(channels), np.zeros(channels)
    per = max(1, BATCH_BYTES // max(1, m.sample_bytes))
    buf = np.empty((per, *m.shape), m.x_dtype)
    for s in m.shards("train"):
        with open_shard(m.path(s)) as f:
            for start in range(0, s.num_samples, per):
                stop = min(s.num_samples, start + per)
                x = buf[:stop - start]
                m.layout.read_x(f, start, stop, x)
                v = x.reshape(-1, channels).astype(np.float64)
                if m.x_dtype == "uint8":
                    v /= 255.0
                bn, bmean = len(v), v.mean(axis=0)
                bm2 = ((v - bmean) ** 2).sum(axis=0)
                delta = bmean - mean
                total = n + bn
                mean = mean + delta * bn / total
                m2 = m2 + bm2 + delta ** 2 * n * bn / total
                n = total
    doc = {"mean": mean.tolist(), "std": np.sqrt(m2 / max(1, n)).tolist(), "values_per_channel": n,
           "samples": m.num_samples("train"), "split": "train"}
    path = Path(data_dir) / "stats.json"
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    progress(f"wrote {path}: mean {np.round(mean, 4).tolist()} std {np.round(doc['std'], 4).tolist()} over "
             f"{doc['samples']} training samples in {time.perf_counter() - t0:.1f}s")
    return doc


# --- the command line (pipeline/cli.py dispatches) ---

def add_arguments(p) -> None:
    from pipeline import config

    p.add_argument("dir")
    config.flag(p, "--root", "data.root")
    p.set_defaults(func=cli)


def cli(a) -> int:
    stats(a.dir, a.root or None)
    return 0
