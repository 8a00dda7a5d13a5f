"""Evaluation: the validation loss and every metric of the task over every rank's share of the
validation split, exact: each rank accumulates sums (the loss's sum and element count, each
metric's own state: totals and counts, or a confusion matrix), the sums are allreduced in
float64, and the figures are computed once from them. Never an average of averages."""

from __future__ import annotations

import time

import numpy as np


class Evaluator:
    def __init__(self, model, inp, batch_size: int, dist, task):
        import tensorflow as tf

        self.model, self.inp, self.batch_size, self.dist, self.task = model, inp, batch_size, dist, task
        self.metrics = task.metrics

        @tf.function
        def eval_step(xb, yb):
            pred = model(task.prepare_x(xb), training=False)
            y = task.prepare_y(yb)
            values = task.loss_values(y, pred)
            for _, m in self.metrics:
                m.update_state(y, pred)
            return tf.reduce_sum(tf.cast(values, tf.float64)), tf.cast(tf.size(values), tf.float64)

        self._step = eval_step

    def __call__(self) -> dict:
        """{"val_loss", "val_<metric>"..., "val_samples", "eval_s"}; every rank must call it at
        the same step."""
        t0 = time.perf_counter()
        # BatchNorm statistics (if any) are per rank; average them so every replica evaluates
        # (and later checkpoints) the same model.
        self.dist.average_variables(self.model.non_trainable_variables)
        for _, m in self.metrics:
            m.reset_state()
        loss_sum, count, samples = 0.0, 0.0, 0
        for xb, yb in self.inp.eval_batches(self.batch_size):
            s, n = self._step(xb, yb)
            loss_sum += float(s)
            count += float(n)
            samples += len(yb)
        # One allreduce for the loss, the samples evaluated and every metric's state.
        states = [v for _, m in self.metrics for v in m.variables]
        flat = [np.asarray([loss_sum, count, samples], np.float64)] + \
            [np.asarray(v.numpy(), np.float64).ravel() for v in states]
        summed = self.dist.allreduce_sum(np.concatenate(flat))
        loss_sum, count, samples = summed[0], summed[1], int(round(summed[2]))
        pos = 3
        for v in states:
            n = int(np.prod(v.shape))
            v.assign(summed[pos:pos + n].reshape(v.shape).astype(v.dtype.as_numpy_dtype))
            pos += n
        out = {"val_loss": float(loss_sum / count) if count else float("nan")}
        for name, m in self.metrics:
            out[f"val_{name}"] = float(m.result()) if count else float("nan")
        out["val_samples"] = samples  # every validation sample, once (pipeline/data/sharding.py)
        out["eval_s"] = round(time.perf_counter() - t0, 3)
        return out
