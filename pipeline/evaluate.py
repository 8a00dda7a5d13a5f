"""Evaluation: validation loss and accuracy over every rank's share of the validation split,
summed exactly across ranks (float64 allreduce of sums and counts), so the figure is the
same as one process evaluating the whole split."""

from __future__ import annotations

import time


class Evaluator:
    def __init__(self, model, inp, batch_size: int, dist):
        import tensorflow as tf

        from .data.reader import to_float

        self.model, self.inp, self.batch_size, self.dist = model, inp, batch_size, dist
        per_sample = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")

        @tf.function
        def eval_step(xb, yb):
            logits = model(to_float(xb), training=False)
            hits = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), yb)
            return tf.reduce_sum(per_sample(yb, logits)), tf.reduce_sum(tf.cast(hits, tf.float32))

        self._step = eval_step

    def __call__(self) -> dict:
        """{"val_loss", "val_accuracy", "eval_s"}; every rank must call it at the same step."""
        t0 = time.perf_counter()
        # BatchNorm statistics (if any) are per rank; average them so every replica evaluates
        # (and later checkpoints) the same model.
        self.dist.average_variables(self.model.non_trainable_variables)
        sums = [0.0, 0.0, 0.0]
        for xb, yb in self.inp.eval_batches(self.batch_size):
            loss_sum, hits = self._step(xb, yb)
            sums[0] += float(loss_sum)
            sums[1] += float(hits)
            sums[2] += len(yb)
        loss_sum, hits, n = self.dist.allreduce_sum(sums)
        loss, acc = (loss_sum / n, hits / n) if n else (float("nan"), float("nan"))
        return {"val_loss": float(loss), "val_accuracy": float(acc), "eval_s": round(time.perf_counter() - t0, 3)}
