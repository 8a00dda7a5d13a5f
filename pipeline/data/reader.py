"""Per-rank input: read this rank's share of the shards, then feed batches through tf.data.

The share is read once into memory as uint8 (contiguous, chunk-aligned slices of each
shard) and scaled to float on the fly. The order of batches is a pure function of
(seed, epoch, rank), so a run resumed at global step s replays exactly the batches an
uninterrupted run would have seen from s on. Shards are opened here, inside the rank's own
process, never before a fork: h5py handles are not fork-safe.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .sharding import Plan
from .shards import Manifest, open_shard


def read_share(m: Manifest, split: str, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """This rank's samples of `split` as (uint8 x, int32 y), in shard order."""
    shards = m.shards(split)
    x = np.empty((plan.samples_per_rank, *m.shape), dtype=np.uint8)
    y = np.empty((plan.samples_per_rank,), dtype=np.int32)
    pos = 0
    for shard_index, start, stop in plan.ranges:
        with open_shard(m.path(shards[shard_index])) as f:
            n = stop - start
            f["x"].read_direct(x, np.s_[start:stop], np.s_[pos:pos + n])
            y[pos:pos + n] = f["y"][start:stop]
            pos += n
    return x, y


def epoch_order(n: int, seed: int, epoch: int, rank: int, shuffle: bool = True) -> np.ndarray:
    """The order this rank visits its n samples in `epoch` (0-based)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, rank]).permutation(n)


def batch_indices(n: int, batch_size: int, steps_per_epoch: int, seed: int, rank: int,
                  start_step: int, end_step: int, shuffle: bool = True) -> Iterator[np.ndarray]:
    """Sample indices for global steps start_step+1 .. end_step (steps count from 1)."""
    epoch = None
    order = None
    for done in range(start_step, end_step):
        e, b = divmod(done, steps_per_epoch)
        if e != epoch:
            epoch, order = e, epoch_order(n, seed, e, rank, shuffle)
        yield order[b * batch_size:(b + 1) * batch_size]


def _scale(x, y):
    import tensorflow as tf

    return tf.cast(x, tf.float32) * (1.0 / 255.0), y


def train_dataset(x: np.ndarray, y: np.ndarray, plan: Plan, batch_size: int, seed: int,
                  start_step: int, end_step: int, shuffle: bool = True, prefetch: int = -1):
    """tf.data batches for steps start_step+1 .. end_step, prefetched so reads overlap compute."""
    import tensorflow as tf

    def gen():
        for idx in batch_indices(len(x), batch_size, plan.steps_per_epoch, seed, plan.rank,
                                 start_step, end_step, shuffle):
            yield x[idx], y[idx]

    spec = (tf.TensorSpec((batch_size, *x.shape[1:]), tf.uint8), tf.TensorSpec((batch_size,), tf.int32))
    ds = tf.data.Dataset.from_generator(gen, output_signature=spec)
    ds = ds.map(_scale, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE if prefetch < 0 else prefetch)


def eval_dataset(x: np.ndarray, y: np.ndarray, batch_size: int):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    return ds.map(_scale, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
