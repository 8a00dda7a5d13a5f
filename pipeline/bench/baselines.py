"""What people would run instead of the pipeline, timed the same way.

- `--mode keras`: one process, `model.fit` on the whole training split held in memory as
  numpy arrays (the plain Keras way);
- `--mode horovod`: under `mpirun -np N`, the loop from Horovod's Keras examples: `hvd.init`,
  the learning rate scaled by size, `hvd.DistributedOptimizer`, the broadcast callback, and
  `model.fit` on this rank's slice of the arrays.

Same model (`pipeline.train.models`), batch and threads as the pipeline run it is compared with.
Each is measured twice in the one process, with Keras's default `steps_per_execution=1` and
with `--steps-per-execution K` (the pipeline's `train.steps_per_call`), in the order
`--order` gives, so neither setting always runs on a warmer process; the bench compares the
pipeline with the faster of the two. `--only-given`: once, at K (the bench's model rows,
whose steps are long enough that the setting is lost in the noise). Rank 0 writes `--out`: per setting, the wall-clock
throughput over the steps after warm-up (the definition the bench applies to the pipeline's
step logs), and the best of them as `throughput_samples_per_s`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from pipeline import config


def load_arrays(data_dir: str):
    import h5py
    import numpy as np

    from pipeline.data import shards

    m = shards.load_manifest(data_dir)
    xs, ys = [], []
    for s in m.shards("train"):
        with h5py.File(m.path(s), "r") as f:
            xs.append(f["x"][...])
            ys.append(f["y"][...])
    x = np.concatenate(xs).astype(np.float32) / 255.0  # normalized in memory, as users do
    return x, np.concatenate(ys).astype(np.int32), m


def _parser() -> argparse.ArgumentParser:
    t = config.TrainConfig
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["keras", "horovod"], required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, default=t.batch_size)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=t.threads)
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--model", default=config.ModelConfig.name)
    p.add_argument("--steps-per-execution", type=int, default=1)
    p.add_argument("--order", choices=["default-first", "default-last"], default="default-first")
    p.add_argument("--only-given", action="store_true",
                   help="one fit, at --steps-per-execution only (the pipeline's setting: equal settings)")
    p.add_argument("--precision", choices=["float32", "mixed_float16", "mixed_bfloat16"], default="float32",
                   help="Keras's global dtype policy (the pipeline's train.precision)")
    p.add_argument("--jit-compile", action="store_true", help="model.compile(jit_compile=True): XLA")
    p.add_argument("--out", required=True)
    return p


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rank, size, hvd = 0, 1, None
    if a.mode == "horovod":
        import horovod.tensorflow.keras as hvd

        hvd.init()
        rank, size = hvd.rank(), hvd.size()
    import tensorflow as tf

    from pipeline.runtime.dist import rank_threads
    from pipeline.train import models

    threads = rank_threads(a.threads, hvd.local_size() if hvd else 1)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
    x, y, m = load_arrays(a.data)
    x, y = x[rank::size], y[rank::size]  # this rank's slice
    tf.keras.mixed_precision.set_global_policy(a.precision)
    # Float32 logits under a mixed policy, as the pipeline builds them; with mixed_float16
    # Keras's compile wraps the optimizer in its loss scaling.
    model = models.build(a.model, m.shape, m.num_classes, output_dtype="float32" if a.precision != "float32" else None)
    opt = tf.keras.optimizers.Adam(a.lr * size)
    callbacks = []
    if hvd is not None:
        opt = hvd.DistributedOptimizer(opt)
        callbacks.append(hvd.callbacks.BroadcastGlobalVariablesCallback(0))
    runs = _fits(model, opt, x, y, a, callbacks)
    best = max(runs, key=lambda k: runs[k]["throughput_samples_per_s"])
    step_times = runs[best]["step_times"]
    for r in runs.values():
        r["throughput_samples_per_s"] *= size  # rank 0's rate for every rank: the job's samples/s
        del r["step_times"]
    if rank == 0:
        res = {"mode": a.mode, "model": a.model, "ranks": size, "threads": threads, "batch_size": a.batch_size,
               "steps": a.steps, "runs": runs, "best_steps_per_execution": int(best),
               "throughput_samples_per_s": runs[best]["throughput_samples_per_s"], "step_s": step_times,
               "precision": a.precision, "jit_compile": a.jit_compile}
        if tf.config.get_visible_devices("GPU"):  # the allocator's peak over both fits
            res["gpu_mem_peak_mb"] = round(tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20, 1)
        with open(a.out + ".tmp", "w") as f:
            json.dump(res, f)
        os.replace(a.out + ".tmp", a.out)
    return 0


def _fits(model, opt, x, y, a, callbacks) -> dict:
    """One fit per steps_per_execution: Keras's default (1) and the asked-for value."""
    import tensorflow as tf

    runs = {}
    # At least four executions per fit, so that some remain after warm-up on short runs.
    spe = min(a.steps_per_execution, max(1, a.steps // 4))
    settings = [spe] if a.only_given else [1, spe] if spe > 1 else [1]
    for spe in (settings if a.order == "default-first" else settings[::-1]):
        # Recompiling keeps the weights and the optimizer; the fit traces its function anew.
        model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), optimizer=opt,
                      steps_per_execution=spe, jit_compile=a.jit_compile)
        runs[str(spe)] = timed_fit(model, x, y, a.batch_size, a.steps, a.warmup, spe, callbacks)
    return runs


def timed_fit(model, x, y, batch_size: int, steps: int, warmup: int, spe: int, callbacks: list) -> dict:
    """One `fit` of `steps` steps; this process's samples/s after the first `warmup` steps.
    Keras calls the batch callbacks once per execution of `spe` steps, so warm-up is rounded
    up to whole executions."""
    import tensorflow as tf

    ends = []

    class Timer(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            ends.append(time.perf_counter())

    steps = min(steps, len(x) // batch_size)
    model.fit(x, y, batch_size=batch_size, epochs=1, steps_per_epoch=steps, shuffle=True, verbose=0,
              callbacks=callbacks + [Timer()])
    skip = max(1, -(-warmup // spe))  # executions left out, at least the first (tracing)
    skip = min(skip, len(ends) - 1)
    timed_steps = steps - min(steps, skip * spe)
    wall = ends[-1] - ends[skip - 1]
    return {"steps_per_execution": spe, "steps": steps, "warmup": skip * spe,
            "throughput_samples_per_s": timed_steps * batch_size / wall, "step_s": wall / timed_steps,
            # each steady execution's time over its steps
            "step_times": [(e - s) / spe for s, e in zip(ends[skip - 1:], ends[skip:])]}


if __name__ == "__main__":
    raise SystemExit(main())
