
import pytest

from pipeline.data.sharding import assign, total_steps


@pytest.mark.parametrize("size", range(1, 9))
@pytest.mark.parametrize("shard_counts", [[1000], [333, 333, 334], [7] * 13, [5000, 1, 17, 999], [100] * 8])
@pytest.mark.parametrize("batch", [1, 7, 32])
def test_every_rank_gets_equal_disjoint_shares(size, shard_counts, batch):
    total = sum(shard_counts)
    plans = [assign(shard_counts, r, size, batch) for r in range(size)]
    assert len({p.steps_per_epoch for p in plans}) == 1, "ranks disagree on steps per epoch"
    assert len({p.samples_per_rank for p in plans}) == 1
    spe = plans[0].steps_per_epoch
    assert spe == (total // size) // batch
    assert plans[0].samples_per_rank == spe * batch
    # Ranges: inside their shards, add up to the share, never overlap between ranks.
    seen = set()
    for p in plans:
        covered = 0
        for shard, start, stop in p.ranges:
            assert 0 <= start < stop <= shard_counts[shard]
            covered += stop - start
            offset = sum(shard_counts[:shard])
            block = set(range(offset + start, offset + stop))
            assert not block & seen
            seen |= block
        assert covered == p.samples_per_rank
    assert plans[0].dropped == total - size * spe * batch
    assert len(seen) == total - plans[0].dropped


def test_eval_plan_keeps_partial_batches_and_every_sample_once():
    p = assign([1000], 1, 3, batch_size=64, drop_last=False)
    assert p.samples_per_rank == 333 and p.steps_per_epoch == 6 and p.dropped == 0
    for counts, size in (([1000], 3), ([7, 0, 5, 1], 4), ([3], 5), ([10, 11], 2)):
        plans = [assign(counts, r, size, batch_size=4, drop_last=False) for r in range(size)]
        seen = []
        for pl in plans:
            seen += [sum(counts[:i]) + j for i, a, b in pl.ranges for j in range(a, b)]
        assert sorted(seen) == list(range(sum(counts))), (counts, size)  # each sample once, in rank order
        assert seen == sorted(seen) and max(pl.samples_per_rank for pl in plans) - \
            min(pl.samples_per_rank for pl in plans) <= 1


def test_fewer_samples_than_ranks_gives_zero_steps_everywhere():
    assert {assign([3], r, 4, 1).steps_per_epoch for r in range(4)} == {0}


def test_rank_out_of_range():
    with pytest.raises(ValueError):
        assign([10], 2, 2)


@pytest.mark.parametrize("spe, epochs, max_steps, expected", [
    (100, 3, 0, 300), (100, 3, 150, 150), (100, 3, 1000, 300), (1, 1, 0, 1)])
def test_total_steps(spe, epochs, max_steps, expected):
    assert total_steps(spe, epochs, max_steps) == expected
