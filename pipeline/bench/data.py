"""`pipeline bench data DIR`: the reader against the raw read of the same shards, and against
what training consumes, measured side by side in one run.

Per rank (run it alone or under `mpirun -np N` for N concurrent readers):
- raw: the rank's share read with one contiguous h5py `read_direct` per range into a
  preallocated numpy array: the limit for reading these files with h5py;
- reader: one epoch of the training input pipeline in streaming mode (windowed shuffle,
  chunk-aligned block reads, tf.data with prefetch), consumed batch by batch as the step
  loop does; and the same from the in-memory cache;
- both cold (every shard's pages dropped from the page cache first, with
  posix_fadvise(DONTNEED): data coming from storage, as it must when it is larger than
  memory; the case the target is set for) and warm (a second read of cached pages, where a
  memory copy, not storage, is the limit);
- consumption: samples/s of the default model's training step at the same batch size and
  thread count (allreduce included under mpirun).
Phases run in the same order on every rank between barriers, so ranks compete for the disk
and cores as they would in training; each is repeated and reported as median [min-max].
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from pipeline import config
from pipeline.errors import UserError
from pipeline.measure import fmt, median_range


def _time_raw(m, plan) -> float:
    from pipeline.data import reader

    t0 = time.perf_counter()
    reader.read_share(m, "train", plan)
    return time.perf_counter() - t0


def evict_page_cache(m) -> None:
    """Drops the shards' pages from the page cache (no root needed for files one can open)."""
    import os

    for s in m.shards("train"):
        fd = os.open(m.path(s), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _time_reader(source, blocks, plan, batch_size: int, window: int) -> float:
    from pipeline.data import reader

    ds = reader.train_dataset(source, blocks, plan, batch_size, seed=0, start_step=0,
                              end_step=plan.steps_per_epoch, window=window)
    t0 = time.perf_counter()
    n = 0
    for _ in reader.batches(ds):
        n += 1
    elapsed = time.perf_counter() - t0
    assert n == plan.steps_per_epoch
    return elapsed


def _consumption(m, dist, batch_size: int, steps: int = 30, warmup: int = 5) -> float | None:
    """Samples/s the default CNN trains at on this data's shape; None where it does not fit
    (targets that are not one class id per sample, or inputs that are not images)."""
    if m.num_classes is None or m.y_shape or len(m.shape) != 3:
        return None
    import numpy as np
    import tensorflow as tf

    from pipeline.data import reader
    from pipeline.train import models

    model = models.build("cnn", m.shape, m.num_classes)
    opt = tf.keras.optimizers.Adam(1e-3)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(0)
    xb = tf.constant(rng.integers(0, 256, (batch_size, *m.shape), dtype=np.uint8).astype(m.x_dtype))
    yb = tf.constant(rng.integers(0, m.num_classes, batch_size, dtype=np.int32))

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(reader.to_float(x), training=True))
        grads = dist.gradient_tape(tape).gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    for _ in range(warmup):
        float(step(xb, yb))
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        float(step(xb, yb))
    return steps * batch_size / (time.perf_counter() - t0)


class _Timer:
    """One rank's timed reads of its share: raw h5py, the reader (streamed, cold or warm) and
    the reader from memory, every rank reading at once between barriers."""

    def __init__(self, m, plan, blocks, dist, batch_size: int, shuffle_buffer: int):
        self.m, self.plan, self.blocks, self.dist = m, plan, blocks, dist
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.samples = plan.samples_per_rank
        from pipeline.data import extents

        self.has_sidecar = extents.load(m) is not None
        self.results = {k: [] for k in ("raw_cold", "stream_cold", "stream_epoch2_cold", "old_cold", "raw_warm",
                                        "stream_warm", "memory")}

    def evict(self) -> None:
        self.dist.barrier()
        evict_page_cache(self.m)
        self.dist.barrier()  # every rank's shards are out of the cache before anyone reads

    def reader_rate(self, source) -> float:
        return self.samples / _time_reader(source, self.blocks, self.plan, self.batch_size, self.shuffle_buffer)

    def timed(self, phase: str, cold: bool) -> float:
        from pipeline.data import reader

        self.dist.barrier()
        if cold:
            self.evict()
        if phase == "raw":
            return self.samples / _time_raw(self.m, self.plan)
        if phase == "old":  # the reader without the index's extents sidecar: h5py learns the offsets
            source = reader.ShardSource(self.m, "train", use_extents=False)
            try:
                return self.reader_rate(source)
            finally:
                source.close()
        source = reader.ShardSource(self.m, "train")
        try:
            rate = self.reader_rate(source)
            if cold:
                # A second cold epoch from the same reader, as training's later epochs: the
                # files' offsets are known, so no file is opened with h5py again.
                self.evict()
                self.results["stream_epoch2_cold"].append(self.reader_rate(source))
            return rate
        finally:
            source.close()

    def repeat(self, r: int, cached) -> None:
        # Alternate the order so neither side always runs second.
        order = ("raw", "stream") if r % 2 == 0 else ("stream", "raw")
        for phase in order + (("old",) if self.has_sidecar else ()):
            self.results[f"{phase}_cold"].append(self.timed(phase, cold=True))
        for phase in order:
            self.timed(phase, cold=False)  # bring the share into the page cache
            self.results[f"{phase}_warm"].append(self.timed(phase, cold=False))
        self.dist.barrier()
        self.results["memory"].append(self.reader_rate(cached))


def run(data_dir: str, root: str | None = None, batch_size: int = config.TrainConfig.batch_size, repeats: int = 3,
        read_block: int = config.DataConfig.read_block, shuffle_buffer: int = config.DataConfig.shuffle_buffer,
        threads: int = config.TrainConfig.threads, json_out: str | None = None, out=sys.stdout) -> dict:
    from pipeline.data import reader, sharding, shards
    from pipeline.runtime import dist as dist_mod

    m = shards.load_manifest(data_dir, root)
    shards.check_exist(m, ["train"])
    if m.raw.get("compression", "none") != "none":
        print(f"note: {data_dir} is compressed ({m.raw['compression']}); the raw read decompresses too", file=out)
    dist = dist_mod.init(threads)
    plan = sharding.assign([s.num_samples for s in m.shards("train")], dist.rank, dist.size, batch_size)
    if plan.steps_per_epoch == 0:
        raise UserError(f"{data_dir}: too few samples for one batch of {batch_size} per rank")
    blocks = reader.cut_blocks(plan, reader.block_size(read_block, m.chunk_samples))
    timer = _Timer(m, plan, blocks, dist, batch_size, shuffle_buffer)
    cached = reader.MemorySource(*reader.read_share(m, "train", plan))
    for r in range(repeats):
        timer.repeat(r, cached)
    consume = _consumption(m, dist, batch_size)
    ranks = dist.allgather_object(_rank_figures(timer, consume, m, plan), name="bench_data")
    result = {"data_dir": str(data_dir), "ranks": dist.size, "threads_per_rank": dist.threads,
              "batch_size": batch_size, "read_block": blocks[0].size if blocks else 0,
              "shuffle_buffer": shuffle_buffer, "sample_bytes": m.sample_bytes,
              "per_rank": ranks,
              **{out: _over_ranks(ranks, key) for out, key in (
                  ("reader_vs_raw", "stream_vs_raw_cold"), ("reader_epoch2_vs_raw", "stream_epoch2_vs_raw_cold"),
                  ("old_reader_vs_raw", "old_vs_raw_cold"), ("reader_vs_raw_warm", "stream_vs_raw_warm"),
                  ("reader_vs_consumption", "stream_vs_consume"))}}
    if dist.is_root:
        _report(result, ranks, m, dist, repeats, consume is not None, out)
        if json_out:
            Path(json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(json_out).write_text(json.dumps(result, indent=2) + "\n")
    dist.shutdown()
    return result


def _over_ranks(ranks: list[dict], key: str) -> dict:
    """A ratio over the ranks: the median [min-max] of the ranks' medians; one rank: its own
    median [min-max] over the repeats."""
    if len(ranks) == 1:
        return ranks[0][key]
    return median_range([r[key]["value"] for r in ranks])


def _rank_figures(timer: _Timer, consume: float | None, m, plan) -> dict:
    results = timer.results
    consume = float("nan") if consume is None else consume

    def ratio(a, b):
        return median_range([x / y for x, y in zip(a, b)] or [float("nan")])

    return {"rank": timer.dist.rank, "samples": timer.samples,
            "share_mb": plan.samples_per_rank * (m.sample_bytes + m.target_bytes) / 1e6,
            **{k: median_range(v or [float("nan")]) for k, v in results.items()}, "consume": median_range([consume]),
            "stream_vs_raw_cold": ratio(results["stream_cold"], results["raw_cold"]),
            "stream_epoch2_vs_raw_cold": ratio(results["stream_epoch2_cold"], results["raw_cold"]),
            "old_vs_raw_cold": ratio(results["old_cold"], results["raw_cold"]),
            "stream_vs_raw_warm": ratio(results["stream_warm"], results["raw_warm"]),
            "stream_vs_consume": median_range([s / consume for s in results["stream_cold"]])}


def _report(result: dict, ranks: list[dict], m, dist, repeats: int, consume_known: bool, out) -> None:
    mb = (m.sample_bytes + m.target_bytes) / 1e6
    print(f"bench data: {result['data_dir']}, {dist.size} rank(s) x {dist.threads} thread(s), batch "
          f"{result['batch_size']}, read block {result['read_block']}, shuffle buffer {result['shuffle_buffer']}; "
          f"samples/s, median [min-max] of {repeats}", file=out)
    cols = [("raw_cold", "raw cold"), ("stream_cold", "reader cold"), ("raw_warm", "raw warm"),
            ("stream_warm", "reader warm"), ("memory", "reader cached"), ("consume", "training")]
    print(f"{'rank':>4} {'MB':>6} " + " ".join(f"{label:>24}" for _, label in cols), file=out)
    for r in ranks:
        print(f"{r['rank']:>4} {r['share_mb']:>6.0f} " + " ".join(f"{fmt(r[k]):>24}" for k, _ in cols), file=out)
    cold_mb = median_range([r["stream_cold"]["value"] * mb for r in ranks])
    print(f"reader cold, per rank:          {fmt(cold_mb, ' MB/s')}", file=out)
    print(f"reader / raw read (cold):       {fmt(result['reader_vs_raw'], 'x', digits=2)}  target >= 0.8x", file=out)
    print(f"reader / raw read (cold, 2nd epoch): {fmt(result['reader_epoch2_vs_raw'], 'x', digits=2)}", file=out)
    if not math.isnan(result["old_reader_vs_raw"]["value"]):
        print(f"reader without the extents sidecar / raw read (cold): {fmt(result['old_reader_vs_raw'], 'x', digits=2)}",
              file=out)
    print(f"reader / raw read (warm):       {fmt(result['reader_vs_raw_warm'], 'x', digits=2)}  "
          f"(memory-copy bound: the reader copies each sample twice more to shuffle and batch it)", file=out)
    if consume_known:
        print(f"reader / training consumption: {fmt(result['reader_vs_consumption'], 'x', digits=1)}  "
              f"target >= 20x", file=out)


# The layouts `pipeline bench data --layouts` measures: (row, how the files are made, index args).
LAYOUTS = [
    ("pipeline shards (x, y; 256-sample chunks)", "images", None),
    ("many per file, indexed (the shards as a user's files)", "images", ["--x", "x", "--y", "y", "--num-classes", "10"]),
    ("many per file, gzip:1 chunks, indexed", "images-gzip", ["--x", "x", "--y", "y", "--num-classes", "10"]),
    ("one sample per file (DeepCAM layout, 64x64x4 float32)", "segmentation",
     ["--x", "climate/data", "--y", "climate/labels_0", "--per-file", "one", "--num-classes", "3"]),
    ("sub-volumes 32^3 of 64^3 x 4 int16 (CosmoFlow layout)", "cosmoflow",
     ["--x", "full", "--y", "unitPar", "--subvolume", "32"]),
]
STAGED = "one sample per file, from a staged copy (data stage)"
LAYOUTS.append((STAGED, "segmentation", LAYOUTS[3][2]))


def layouts(work: str | None = None, repeats: int = 3, batch_size: int = 32, out=sys.stdout) -> list[dict]:
    """One row per layout: `pipeline bench data` (cold reader / raw h5py read of the same
    samples in the same layout) on datasets of ~64-130 MB made here, each in its own process."""
    import shutil
    import subprocess
    import tempfile

    tmp = Path(work) if work else Path(tempfile.mkdtemp(prefix="bench-layouts-"))
    py = [sys.executable, "-m", "pipeline"]
    made = {"images": ["data", "synth", "--samples", "60000", "--val-samples", "0", "--shards", "4"],
            "images-gzip": ["data", "synth", "--samples", "60000", "--val-samples", "0", "--shards", "4",
                            "--compression", "gzip:1"],
            "segmentation": ["data", "synth", "--kind", "segmentation", "--samples", "1000"],
            "cosmoflow": ["data", "synth", "--kind", "cosmoflow", "--samples", "64", "--shape", "64"]}
    rows = []
    try:
        for label, source, index_args in LAYOUTS:
            src = tmp / source
            if not src.exists():
                subprocess.run(py + made[source] + ["--out", str(src)], check=True, capture_output=True)
            data = src
            if index_args:
                data = tmp / f"index-{len(rows)}"
                shutil.rmtree(data, ignore_errors=True)
                subprocess.run(py + ["data", "index", str(src), "--out", str(data), "--val-fraction", "0"]
                               + index_args, check=True, capture_output=True)
            if label == STAGED:
                # The same index read from a staged copy (pipeline data stage): on this machine the
                # copy is on the same disk as the source, so the row shows the reader on a copy, not
                # a faster disk.
                subprocess.run(py + ["data", "stage", str(data), "--to", str(tmp / "staged")], check=True,
                               capture_output=True)
                root_args = ["--root", str(tmp / "staged")]
            else:
                root_args = []
            res_file = tmp / f"res-{len(rows)}.json"
            r = subprocess.run(py + ["bench", "data", str(data), "--repeats", str(repeats), "--batch-size",
                                     str(batch_size), "--json", str(res_file)] + root_args,
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"bench data on {label} failed:\n{r.stderr[-2000:]}")
            res = json.loads(res_file.read_text())
            rows.append({"layout": label, "samples": res["per_rank"][0]["samples"],
                         "share_mb": res["per_rank"][0]["share_mb"], "raw_cold": res["per_rank"][0]["raw_cold"],
                         "stream_cold": res["per_rank"][0]["stream_cold"], "reader_vs_raw": res["reader_vs_raw"],
                         "reader_epoch2_vs_raw": res["reader_epoch2_vs_raw"],
                         "old_reader_vs_raw": res["old_reader_vs_raw"],
                         "met": res["reader_vs_raw"]["value"] >= 0.8})
            x = rows[-1]
            print(f"{label:<55} {x['share_mb']:>6.0f} MB  raw {fmt(x['raw_cold'])}  reader {fmt(x['stream_cold'])}"
                  f"  reader/raw {fmt(x['reader_vs_raw'], 'x', digits=2)} "
                  f"{'met' if x['met'] else 'MISSED'} (>= 0.8); 2nd epoch "
                  f"{fmt(x['reader_epoch2_vs_raw'], 'x', digits=2)}; old reader (no sidecar) "
                  f"{fmt(x['old_reader_vs_raw'], 'x', digits=2)}", file=out, flush=True)
    finally:
        if not work:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


# --- the command line (pipeline/cli.py dispatches) ---

def add_arguments(p) -> None:
    p.add_argument("dir", nargs="?", help="a dataset directory (shards or indexed)")
    p.add_argument("--layouts", action="store_true", help="one row per layout (shards, many per file, gzip "
                                                          "chunks, one sample per file, sub-volumes) on data made here")
    p.add_argument("--work", help="with --layouts: where the generated data goes (default: a temporary directory)")
    config.flag(p, "--batch-size", "train.batch_size")
    p.add_argument("--repeats", type=int, default=3)
    config.flag(p, "--read-block", "data.read_block")
    config.flag(p, "--shuffle-buffer", "data.shuffle_buffer")
    config.flag(p, "--threads", "train.threads")
    config.flag(p, "--root", "data.root")
    p.add_argument("--json", help="also write the results here")
    p.set_defaults(func=cli)


def cli(a) -> int:
    if a.layouts:
        rows = layouts(a.work, a.repeats)
        return 0 if all(r["met"] for r in rows) else 1
    if not a.dir:
        raise UserError("pipeline bench data: give a dataset directory, or --layouts")
    run(a.dir, root=a.root or None, batch_size=a.batch_size, repeats=a.repeats, read_block=a.read_block,
        shuffle_buffer=a.shuffle_buffer, threads=a.threads, json_out=a.json)
    return 0
