import numpy as np
import pytest

from pipeline.data import reader, shards
from pipeline.data.sharding import assign


def test_ranks_read_disjoint_equal_shares_of_real_shards(small_dataset):
    m = shards.load_manifest(small_dataset)
    counts = [s.num_samples for s in m.shards("train")]
    everything_x = np.concatenate([shards.open_shard(m.path(s))["x"][:] for s in m.shards("train")])
    parts = []
    for rank in range(3):
        plan = assign(counts, rank, 3, batch_size=32)
        x, y = reader.read_share(m, "train", plan)
        assert len(x) == len(y) == plan.samples_per_rank
        parts.append(x)
    # Rank shares, in rank order, are the split's first 3 * share samples: disjoint and complete.
    assert np.array_equal(np.concatenate(parts), everything_x[:sum(len(p) for p in parts)])


def test_batches_are_a_pure_function_of_seed_epoch_and_step():
    full = list(reader.batch_indices(100, 10, 10, seed=7, rank=1, start_step=0, end_step=30))
    assert len(full) == 30
    for e in range(3):
        epoch = np.concatenate(full[e * 10:(e + 1) * 10])
        assert sorted(epoch) == list(range(100)), "each epoch visits every sample once"
    assert not np.array_equal(np.concatenate(full[:10]), np.concatenate(full[10:20])), "epochs reshuffle"
    resumed = list(reader.batch_indices(100, 10, 10, seed=7, rank=1, start_step=13, end_step=30))
    assert all(np.array_equal(a, b) for a, b in zip(full[13:], resumed)), "resume replays the same batches"
    other_rank = list(reader.batch_indices(100, 10, 10, seed=7, rank=0, start_step=0, end_step=10))
    assert not np.array_equal(np.concatenate(other_rank), np.concatenate(full[:10]))
    plain = list(reader.batch_indices(100, 10, 10, seed=7, rank=1, start_step=0, end_step=10, shuffle=False))
    assert np.array_equal(np.concatenate(plain), np.arange(100))


def test_train_dataset_scales_pixels_on_the_fly(small_dataset):
    m = shards.load_manifest(small_dataset)
    plan = assign([s.num_samples for s in m.shards("train")], 0, 2, batch_size=16)
    x, y = reader.read_share(m, "train", plan)
    assert x.dtype == np.uint8, "stored and held as uint8"
    ds = reader.train_dataset(x, y, plan, 16, seed=1, start_step=5, end_step=8)
    batches = list(ds)
    assert len(batches) == 3
    idx = next(reader.batch_indices(len(x), 16, plan.steps_per_epoch, 1, 0, 5, 6))
    xb, yb = batches[0]
    assert xb.dtype.name == "float32" and xb.shape == (16, 28, 28, 1)
    assert np.allclose(xb.numpy(), x[idx] / 255.0) and np.array_equal(yb.numpy(), y[idx])
