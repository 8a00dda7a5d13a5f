"""Learning rate at a step: linear scaling by the number of ranks with a linear warm-up, then
constant, cosine or step decay.

Following Goyal et al. (2017), "Accurate, Large Minibatch SGD": the global batch grows with
the ranks, so the rate does too, but ramping up from the single-rank rate over the first
steps avoids the early divergence a large rate causes on fresh weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def lr_at(step: int, base_lr: float, size: int = 1, warmup_steps: int = 0, scale: bool = True,
          schedule: str = "constant", total_steps: int = 0, step_every: int = 0, step_factor: float = 0.1) -> float:
    """The rate used for the update of 0-based step `step`."""
    peak = base_lr * size if scale else base_lr
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr + (peak - base_lr) * step / warmup_steps
    if schedule == "cosine" and total_steps > warmup_steps:
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step" and step_every > 0:
        return peak * step_factor ** (step // step_every)
    return peak


def keras_schedule(base_lr: float, size: int = 1, warmup_steps: int = 0, scale: bool = True,
                   schedule: str = "constant", total_steps: int = 0, step_every: int = 0, step_factor: float = 0.1):
    """lr_at in TensorFlow ops, as a Keras LearningRateSchedule on the optimizer's iterations.

    Kept in graph ops rather than a Python callback so the step stays one compiled
    function; tests hold it equal to lr_at.
    """
    import tensorflow as tf

    peak = base_lr * size if scale else base_lr
    cosine = schedule == "cosine" and total_steps > warmup_steps

    class Schedule(tf.keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            step = tf.cast(step, tf.float32)
            rate = tf.constant(peak, tf.float32)
            if cosine:
                progress = tf.minimum(1.0, (step - warmup_steps) / float(total_steps - warmup_steps))
                rate = peak * 0.5 * (1.0 + tf.cos(math.pi * progress))
            if schedule == "step" and step_every > 0:
                rate = peak * tf.pow(float(step_factor), tf.floor(step / float(step_every)))
            if warmup_steps > 0:
                warm = base_lr + (peak - base_lr) * step / float(warmup_steps)
                rate = tf.where(step < warmup_steps, warm, rate)
            return rate

        def get_config(self):
            return dict(base_lr=base_lr, size=size, warmup_steps=warmup_steps, scale=scale,
                        schedule=schedule, total_steps=total_steps, step_every=step_every,
                        step_factor=step_factor)

    return Schedule()


@dataclass(frozen=True)
class LR:
    """The run's learning-rate rule, from the config's train section: `at(step)` in Python
    (logged per step) and `keras()` in graph ops (what the optimizer uses); the same rule."""
    base_lr: float
    size: int = 1
    warmup_steps: int = 0
    scale: bool = True
    schedule: str = "constant"
    total_steps: int = 0
    step_every: int = 0
    step_factor: float = 0.1

    @classmethod
    def from_config(cls, train, size: int, total_steps: int) -> "LR":
        return cls(base_lr=train.lr, size=size, warmup_steps=train.warmup_steps, scale=train.scale_lr,
                   schedule=train.lr_schedule, total_steps=total_steps, step_every=train.lr_step_every,
                   step_factor=train.lr_step_factor)

    def at(self, step: int) -> float:
        # Called every step (the step log's lr): positional, without building a dict each time.
        return lr_at(step, self.base_lr, self.size, self.warmup_steps, self.scale, self.schedule, self.total_steps,
                     self.step_every, self.step_factor)

    def keras(self):
        return keras_schedule(**asdict(self))
