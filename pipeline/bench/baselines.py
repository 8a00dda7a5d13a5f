"""What people would run instead of the pipeline, timed the same way.

- `--mode keras`: one process, `model.fit` on the whole training split held in memory as
  numpy arrays (the plain Keras way);
- `--mode horovod`: under `mpirun -np N`, the loop from Horovod's Keras examples: `hvd.init`,
  the learning rate scaled by size, `hvd.DistributedOptimizer`, the broadcast callback, and
  `model.fit` on this rank's slice of the arrays.

Same model (`pipeline.models`), batch and threads as the pipeline run it is compared with.
Rank 0 writes `--out`: per-batch durations and the wall-clock throughput over the steps
after warm-up, the figure the bench compares (the same definition it applies to the
pipeline's step logs).
"""

from __future__ import annotations

import argparse
import json
import os
import time


def load_arrays(data_dir: str):
    import h5py
    import numpy as np

    from ..data import shards

    m = shards.load_manifest(data_dir)
    xs, ys = [], []
    for s in m.shards("train"):
        with h5py.File(m.path(s), "r") as f:
            xs.append(f["x"][...])
            ys.append(f["y"][...])
    x = np.concatenate(xs).astype(np.float32) / 255.0  # normalized in memory, as users do
    return x, np.concatenate(ys).astype(np.int32), m


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["keras", "horovod"], required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--model", default="cnn")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    rank, size, hvd = 0, 1, None
    if a.mode == "horovod":
        import horovod.tensorflow.keras as hvd

        hvd.init()
        rank, size = hvd.rank(), hvd.size()
    import tensorflow as tf

    from .. import models
    from ..dist import rank_threads

    threads = rank_threads(a.threads, hvd.local_size() if hvd else 1)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))

    x, y, m = load_arrays(a.data)
    x, y = x[rank::size], y[rank::size]  # this rank's slice
    model = models.build(a.model, m.shape, m.num_classes)
    opt = tf.keras.optimizers.Adam(a.lr * size)
    callbacks = []
    if hvd is not None:
        opt = hvd.DistributedOptimizer(opt)
        callbacks.append(hvd.callbacks.BroadcastGlobalVariablesCallback(0))
    model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), optimizer=opt)

    begins, ends = [], []

    class Timer(tf.keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            begins.append(time.perf_counter())

        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.perf_counter())

    callbacks.append(Timer())
    steps = min(a.steps, len(x) // a.batch_size)
    model.fit(x, y, batch_size=a.batch_size, epochs=1, steps_per_epoch=steps, shuffle=True, verbose=0,
              callbacks=callbacks)
    w = min(a.warmup, steps - 1)
    wall = ends[-1] - ends[w - 1] if w > 0 else ends[-1] - begins[0]
    if rank == 0:
        res = {"mode": a.mode, "ranks": size, "threads": threads, "batch_size": a.batch_size, "steps": steps,
               "warmup": w, "throughput_samples_per_s": (steps - w) * a.batch_size * size / wall,
               "step_s": [e - b for b, e in zip(begins, ends)]}
        with open(a.out + ".tmp", "w") as f:
            json.dump(res, f)
        os.replace(a.out + ".tmp", a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
