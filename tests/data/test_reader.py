import numpy as np
import pytest

from pipeline.data import reader, shards
from pipeline.data.reader import MemorySource, ShardSource, batch_stacks, cut_blocks, epoch_order
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


def test_blocks_are_chunk_aligned_and_cover_the_share():
    plan = assign([1000, 700, 300], rank=1, size=3, batch_size=10)  # [660, 1320): spans shards 0 and 1
    blocks = cut_blocks(plan, block=256)
    assert [(b.shard, b.start, b.stop) for b in blocks] == [
        (0, 660, 768), (0, 768, 1000), (1, 0, 256), (1, 256, 320)]
    assert [b.offset for b in blocks] == [0, 108, 340, 596]
    assert sum(b.size for b in blocks) == plan.samples_per_rank
    assert reader.block_size(1000, 256) == 768 and reader.block_size(100, 256) == 256


def test_epoch_order_is_a_seeded_windowed_permutation():
    plan = assign([5000], 0, 1, batch_size=1)
    blocks = cut_blocks(plan, 100)
    e0 = epoch_order(blocks, seed=1, epoch=0, rank=0, window=1000)
    assert sorted(e0) == list(range(5000)), "each epoch visits every sample once"
    assert np.array_equal(e0, epoch_order(blocks, 1, 0, 0, 1000)), "same seed and epoch, same order"
    assert not np.array_equal(e0, epoch_order(blocks, 1, 1, 0, 1000)), "epochs reshuffle"
    assert not np.array_equal(e0, epoch_order(blocks, 1, 0, 1, 1000)), "ranks differ"
    # The shuffle buffer bounds locality: the first 1000 samples come from 10 blocks.
    assert len({i // 100 for i in e0[:1000]}) == 10
    # A buffer as large as the share is a full shuffle of it.
    full = epoch_order(blocks, 1, 0, 0, window=5000)
    assert len({i // 100 for i in full[:1000]}) > 40
    assert np.array_equal(epoch_order(blocks, 1, 0, 0, 1000, shuffle=False), np.arange(5000))


def stacks_to_batches(stacks):
    out = []
    for xs, ys in stacks:
        out.extend(zip(xs, ys))
    return out


@pytest.mark.parametrize("window", [100, 5000])
def test_streaming_and_memory_give_the_same_batches(small_dataset, window):
    m = shards.load_manifest(small_dataset)
    counts = [s.num_samples for s in m.shards("train")]
    plan = assign(counts, 1, 2, batch_size=32)
    blocks = cut_blocks(plan, reader.block_size(300, m.chunk_samples))
    memory = MemorySource(*reader.read_share(m, "train", plan))
    stream = ShardSource(m, "train")
    spe = plan.steps_per_epoch
    kw = dict(batch_size=32, steps_per_epoch=spe, seed=3, rank=1, window=window)
    a = stacks_to_batches(batch_stacks(memory, blocks, start_step=0, end_step=2 * spe + 5, **kw))
    b = stacks_to_batches(batch_stacks(stream, blocks, start_step=0, end_step=2 * spe + 5, **kw))
    assert len(a) == len(b) == 2 * spe + 5
    for (xa, ya), (xb, yb) in zip(a, b):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    # One epoch's batches hold the whole share once.
    epoch_labels = np.concatenate([y for _, y in a[:spe]])
    assert len(epoch_labels) == plan.samples_per_rank
    assert np.array_equal(np.sort(epoch_labels), np.sort(memory.y))
    # Resuming mid-epoch replays exactly the remaining batches, from either source.
    for resume in (1, spe - 1, spe + 7):
        r = stacks_to_batches(batch_stacks(stream, blocks, start_step=resume, end_step=2 * spe + 5, **kw))
        assert len(r) == len(a) - resume
        assert all(np.array_equal(x1, x2) for (x1, _), (x2, _) in zip(a[resume:], r))
    stream.close()


def test_train_dataset_hands_out_uint8_batches(small_dataset):
    m = shards.load_manifest(small_dataset)
    plan = assign([s.num_samples for s in m.shards("train")], 0, 2, batch_size=16)
    source = MemorySource(*reader.read_share(m, "train", plan))
    blocks = cut_blocks(plan, 256)
    ds = reader.train_dataset(source, blocks, plan, 16, seed=1, start_step=5, end_step=30, window=1000)
    batches = list(reader.batches(ds))
    assert len(batches) == 25
    expected = stacks_to_batches(batch_stacks(source, blocks, 16, plan.steps_per_epoch, 1, 0, 5, 30, 1000))
    for (xb, yb), (xe, ye) in zip(batches, expected):
        assert xb.dtype.name == "uint8" and xb.shape == (16, 28, 28, 1)
        assert np.array_equal(xb.numpy(), xe) and np.array_equal(yb.numpy(), ye)
    f = reader.to_float(batches[0][0])
    assert f.dtype.name == "float32" and np.allclose(f.numpy(), batches[0][0].numpy() / 255.0)


def test_eval_batches_cover_the_share_in_order(small_dataset):
    m = shards.load_manifest(small_dataset)
    plan = assign([s.num_samples for s in m.shards("val")], 1, 3, batch_size=64, drop_last=False)
    x, y = reader.read_share(m, "val", plan)
    blocks = cut_blocks(plan, 256)
    for source in (MemorySource(x, y), ShardSource(m, "val")):
        got = list(reader.eval_batches(source, blocks, 64))
        assert [len(b[1]) for b in got] == [64] * 5 + [333 - 320]
        assert np.array_equal(np.concatenate([b[0] for b in got]), x)


@pytest.mark.parametrize("compression", ["gzip:1", "lzf"])
def test_compressed_shards_stream_the_same_samples(tmp_path, compression):
    """gzip chunks are inflated on the reader's threads (pread + zlib); other filters go
    through h5py. Either way the samples are the ones h5py reads."""
    from pipeline.data.synth import synth

    synth(tmp_path / "d", samples_train=1500, samples_val=0, shards=2, seed=2, chunk_samples=100,
          compression=compression, progress=lambda *_: None)
    m = shards.load_manifest(tmp_path / "d")
    plan = assign([s.num_samples for s in m.shards("train")], 1, 2, batch_size=16)
    x, y = reader.read_share(m, "train", plan)
    stream = ShardSource(m, "train")
    stream.load(cut_blocks(plan, reader.block_size(250, m.chunk_samples)))
    xs, ys = np.empty_like(x), np.empty_like(y)
    stream.take(np.arange(len(x)), xs, ys)
    assert np.array_equal(xs, x) and np.array_equal(ys, y)
    kinds = {type(mp).__name__ for maps in stream._maps.values() for mp in maps}
    assert kinds == ({"DeflateChunks"} if compression.startswith("gzip") else {"NoneType"})
    stream.close()


def test_batch_stacks_end_exactly_where_a_stack_spans_two_windows(small_dataset):
    # 40 batches of 32 = 1280 samples in one stack, over windows of ~1000: the generator must
    # hand over exactly those batches and end (it once spun forever after the last stack).
    m = shards.load_manifest(small_dataset)
    plan = assign([s.num_samples for s in m.shards("train")], 1, 2, batch_size=32)
    blocks = cut_blocks(plan, 256)
    x, y = reader.read_share(m, "train", plan)
    stacks = list(batch_stacks(MemorySource(x, y), blocks, 32, plan.steps_per_epoch, 1, plan.rank, 0, 40, 1000))
    got = np.concatenate([s[0].reshape(-1, *x.shape[1:]) for s in stacks])
    assert np.array_equal(got, x[epoch_order(blocks, 1, 0, plan.rank, 1000)[:40 * 32]])
