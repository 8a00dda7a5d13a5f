"""Learning rate at a step: a linear warm-up to the peak rate, then constant, cosine, step,
multistep or polynomial decay.

The peak is the base rate times a factor: the number of ranks (`train.scale_lr`, after Goyal et
al., 2017, "Accurate, Large Minibatch SGD": the global batch grows with the ranks, so the rate
does too), the global batch over `train.lr_base_batch` (`train.lr_scaling: linear`) or its
square root (`sqrt`), or `train.warmup_factor` as MLPerf HPC's references give it. Ramping up
from the base rate over the first steps avoids the early divergence a large rate causes on
fresh weights.

`multistep` decays at boundaries (steps, or epochs as CosmoFlow and DeepCAM write them): from
each boundary on the rate is the peak times that boundary's factor (`train.lr_decay_factors`,
CosmoFlow's `{32: 0.25, 64: 0.125}`), or times gamma once more at each (`train.lr_decay_gamma`,
DeepCAM's). `polynomial` goes from the peak to `train.lr_end` at the last step, with
`train.lr_power` (1: linear).

`lr_at` is the rule as a pure Python function (logged per step; resume relies on it being a
function of the step alone); `keras_schedule` the same rule in graph ops, held equal to it by
the tests.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass


def lr_at(step: int, base_lr: float, size: int = 1, warmup_steps: int = 0, scale: bool = True,
          schedule: str = "constant", total_steps: int = 0, step_every: int = 0, step_factor: float = 0.1, *,
          factor: float = 0.0, boundaries: tuple = (), decay_factors: tuple = (), gamma: float = 0.0,
          power: float = 1.0, end_lr: float = 0.0) -> float:
    """The rate used for the update of 0-based step `step`. `factor` > 0 gives the peak as
    base_lr x factor (else x size when `scale`); `boundaries` are steps."""
    peak = base_lr * (factor if factor > 0 else (size if scale else 1))
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr + (peak - base_lr) * step / warmup_steps
    if schedule == "cosine" and total_steps > warmup_steps:
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step" and step_every > 0:
        return peak * step_factor ** (step // step_every)
    if schedule == "multistep" and boundaries:
        k = bisect.bisect_right(boundaries, step)  # boundaries passed: from boundary b on, step >= b
        if k == 0:
            return peak
        return peak * (decay_factors[k - 1] if decay_factors else gamma ** k)
    if schedule == "polynomial" and total_steps > warmup_steps:
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return (peak - end_lr) * (1.0 - progress) ** power + end_lr
    return peak


def keras_schedule(base_lr: float, size: int = 1, warmup_steps: int = 0, scale: bool = True,
                   schedule: str = "constant", total_steps: int = 0, step_every: int = 0, step_factor: float = 0.1,
                   factor: float = 0.0, boundaries: tuple = (), decay_factors: tuple = (), gamma: float = 0.0,
                   power: float = 1.0, end_lr: float = 0.0):
    """lr_at in TensorFlow ops, as a Keras LearningRateSchedule on the optimizer's iterations.

    Kept in graph ops rather than a Python callback so the step stays one compiled
    function; tests hold it equal to lr_at.
    """
    import tensorflow as tf

    peak = base_lr * (factor if factor > 0 else (size if scale else 1))
    cosine = schedule == "cosine" and total_steps > warmup_steps
    polynomial = schedule == "polynomial" and total_steps > warmup_steps
    multistep = schedule == "multistep" and bool(boundaries)
    config = dict(base_lr=base_lr, size=size, warmup_steps=warmup_steps, scale=scale, schedule=schedule,
                  total_steps=total_steps, step_every=step_every, step_factor=step_factor, factor=factor,
                  boundaries=tuple(boundaries), decay_factors=tuple(decay_factors), gamma=gamma, power=power,
                  end_lr=end_lr)
    if multistep:
        multipliers = [1.0] + ([float(f) for f in decay_factors] if decay_factors else
                               [gamma ** k for k in range(1, len(boundaries) + 1)])

    class Schedule(tf.keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            step = tf.cast(step, tf.float32)
            rate = tf.constant(peak, tf.float32)
            if cosine:
                progress = tf.minimum(1.0, (step - warmup_steps) / float(total_steps - warmup_steps))
                rate = peak * 0.5 * (1.0 + tf.cos(math.pi * progress))
            if schedule == "step" and step_every > 0:
                rate = peak * tf.pow(float(step_factor), tf.floor(step / float(step_every)))
            if multistep:
                passed = tf.reduce_sum(tf.cast(step >= tf.constant(boundaries, tf.float32), tf.int32))
                rate = peak * tf.gather(tf.constant(multipliers, tf.float32), passed)
            if polynomial:
                progress = tf.minimum(1.0, (step - warmup_steps) / float(total_steps - warmup_steps))
                rate = (peak - end_lr) * tf.pow(1.0 - progress, float(power)) + end_lr
            if warmup_steps > 0:
                warm = base_lr + (peak - base_lr) * step / float(warmup_steps)
                rate = tf.where(step < warmup_steps, warm, rate)
            return rate

        def get_config(self):
            return dict(config)

    return Schedule()


def peak_factor(train, size: int, global_batch: int, update_batch: int) -> float:
    """What the base rate is multiplied by at the peak: train.warmup_factor when set, else
    train.lr_scaling against train.lr_base_batch (0: one rank's batch), else the number of
    ranks when train.scale_lr (else 1)."""
    if train.warmup_factor > 0:
        return train.warmup_factor
    if train.lr_scaling:
        ratio = global_batch / (train.lr_base_batch or update_batch)
        return {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[train.lr_scaling]
    return float(size) if train.scale_lr else 1.0


@dataclass(frozen=True)
class LR:
    """The run's learning-rate rule, from the config's train section: `at(step)` in Python
    (logged per step) and `keras()` in graph ops (what the optimizer uses); the same rule.
    Every length is in steps here (epochs resolved with the run's steps per epoch)."""
    base_lr: float
    size: int = 1
    warmup_steps: int = 0
    scale: bool = True
    schedule: str = "constant"
    total_steps: int = 0
    step_every: int = 0
    step_factor: float = 0.1
    factor: float = 0.0
    boundaries: tuple = ()
    decay_factors: tuple = ()
    gamma: float = 0.0
    power: float = 1.0
    end_lr: float = 0.0

    @classmethod
    def from_config(cls, train, size: int, total_steps: int, steps_per_epoch: int = 0, global_batch: int = 0,
                    update_batch: int = 0) -> "LR":
        spe = steps_per_epoch or 1
        warmup = round(train.warmup_epochs * spe) if train.warmup_epochs > 0 else train.warmup_steps
        unit = spe if train.lr_boundary_unit == "epochs" else 1
        explicit = train.warmup_factor > 0 or bool(train.lr_scaling)
        return cls(base_lr=train.lr, size=size, warmup_steps=warmup, scale=train.scale_lr,
                   schedule=train.lr_schedule, total_steps=total_steps, step_every=train.lr_step_every,
                   step_factor=train.lr_step_factor,
                   factor=peak_factor(train, size, global_batch, update_batch or 1) if explicit else 0.0,
                   boundaries=tuple(round(b * unit) for b in train.lr_boundaries),
                   decay_factors=tuple(train.lr_decay_factors), gamma=train.lr_decay_gamma,
                   power=train.lr_power, end_lr=train.lr_end)

    @property
    def peak(self) -> float:
        return self.base_lr * (self.factor if self.factor > 0 else (self.size if self.scale else 1))

    def at(self, step: int) -> float:
        # Called every step (the step log's lr): positional, without building a dict each time.
        return lr_at(step, self.base_lr, self.size, self.warmup_steps, self.scale, self.schedule, self.total_steps,
                     self.step_every, self.step_factor, factor=self.factor, boundaries=self.boundaries,
                     decay_factors=self.decay_factors, gamma=self.gamma, power=self.power, end_lr=self.end_lr)

    def keras(self):
        return keras_schedule(**asdict(self))
