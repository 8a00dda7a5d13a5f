"""`pipeline bench layout`: how chunk length and compression change shard size and read rate.

The same synthetic samples are written once per layout; each is read by the raw contiguous
h5py read (cold: pages dropped first; and warm) and by the streaming reader's block loads
(cold), one process. Median of repeats; see docs/data.md for a measured table.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from pipeline.bench.data import evict_page_cache
from pipeline.measure import fmt, median_range


def run(samples: int = 100000, chunks=(64, 256, 1024, 4096), compressions=("none", "lzf", "gzip:1", "gzip:6"),
        repeats: int = 3, work: str | None = None, out=sys.stdout) -> list[dict]:
    from pipeline.data import reader, sharding, shards
    from pipeline.data.synth import synth

    base = Path(work) if work else Path(tempfile.mkdtemp(prefix="bench-layout-"))
    rows = []
    print(f"bench layout: {samples} samples of 28x28x1 uint8, 1 process, samples/s median [min-max] of {repeats}",
          file=out)
    print(f"{'chunk':>6} {'compression':>11} {'MB':>6} {'write s':>7} {'raw cold':>26} {'raw warm':>26} "
          f"{'block loads cold':>26}", file=out)
    try:
        for comp in compressions:
            for chunk in chunks:
                d = base / f"c{chunk}-{comp.replace(':', '')}"
                t0 = time.perf_counter()
                synth(d, samples_train=samples, samples_val=0, shards=4, seed=0, chunk_samples=chunk,
                      compression=comp, progress=lambda *_: None)
                write_s = time.perf_counter() - t0
                m = shards.load_manifest(d)
                plan = sharding.assign([s.num_samples for s in m.shards("train")], 0, 1, 64)
                blocks = reader.cut_blocks(plan, reader.block_size(4096, chunk))
                res = {"raw_cold": [], "raw_warm": [], "blocks_cold": []}
                for _ in range(repeats):
                    evict_page_cache(m)
                    t0 = time.perf_counter()
                    reader.read_share(m, "train", plan)
                    res["raw_cold"].append(plan.samples_per_rank / (time.perf_counter() - t0))
                    t0 = time.perf_counter()
                    reader.read_share(m, "train", plan)
                    res["raw_warm"].append(plan.samples_per_rank / (time.perf_counter() - t0))
                    evict_page_cache(m)
                    src = reader.ShardSource(m, "train")
                    t0 = time.perf_counter()
                    for b in blocks:
                        src.load([b])
                    res["blocks_cold"].append(plan.samples_per_rank / (time.perf_counter() - t0))
                    src.close()
                size_mb = sum(m.path(s).stat().st_size for s in m.shards("train")) / 1e6
                row = {"chunk": chunk, "compression": comp, "mb": size_mb, "write_s": write_s,
                       **{k: median_range(v) for k, v in res.items()}}
                rows.append(row)
                print(f"{chunk:>6} {comp:>11} {size_mb:>6.0f} {write_s:>7.1f} {fmt(row['raw_cold']):>26} "
                      f"{fmt(row['raw_warm']):>26} {fmt(row['blocks_cold']):>26}", file=out, flush=True)
                shutil.rmtree(d, ignore_errors=True)
    finally:
        if not work:
            shutil.rmtree(base, ignore_errors=True)
    return rows


# --- the command line (pipeline/cli.py dispatches) ---

def add_arguments(p) -> None:
    p.add_argument("--samples", type=int, default=100000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", help="directory for the trial datasets (default: a temporary one)")
    p.set_defaults(func=cli)


def cli(a) -> int:
    run(a.samples, repeats=a.repeats, work=a.work)
    return 0
