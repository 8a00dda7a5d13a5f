"""Which samples each rank reads, decided from the manifest alone before any data is read.

Every rank gets the same number of samples (a contiguous range of the split's global index
space, which may span shards), so every rank runs the same number of steps: ranks that
disagree on the step count hang in Horovod's allreduce. The remainder that does not divide
evenly is dropped and reported once. Validation drops nothing: every sample is evaluated
once, the first ranks taking one more (evaluation's only collective is its final sum).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Plan:
    rank: int
    size: int
    samples_per_rank: int
    steps_per_epoch: int
    dropped: int  # samples of the split no rank reads (total - size * samples_per_rank)
    ranges: tuple[tuple[int, int, int], ...]  # (shard index, start, stop) inside each shard


def assign(shard_counts: Sequence[int], rank: int, size: int, batch_size: int | None = None,
           drop_last: bool = True) -> Plan:
    """Rank `rank` of `size` gets samples [rank * per, (rank + 1) * per) of the split.

    With a batch size and drop_last, each rank's share is cut to whole batches so that
    steps_per_epoch is the same on every rank. Without drop_last (evaluation, where no
    collective runs per batch) every sample is some rank's exactly once: the first
    `total % size` ranks take one more, and a rank keeps its partial last batch.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in [0, {size})")
    total = sum(shard_counts)
    per = total // size
    steps = 0
    if not drop_last:
        extra = total % size
        lo = rank * per + min(rank, extra)
        per += rank < extra
        hi = lo + per
        steps = -(-per // batch_size) if batch_size else 0
        return Plan(rank, size, per, steps, 0, _ranges(shard_counts, lo, hi))
    if batch_size:
        steps = per // batch_size
        per = steps * batch_size
    lo, hi = rank * per, (rank + 1) * per
    return Plan(rank, size, per, steps, total - per * size, _ranges(shard_counts, lo, hi))


def _ranges(shard_counts: Sequence[int], lo: int, hi: int) -> tuple[tuple[int, int, int], ...]:
    """(shard index, start, stop) of the global sample range [lo, hi)."""
    ranges = []
    offset = 0
    for i, n in enumerate(shard_counts):
        a, b = max(lo, offset), min(hi, offset + n)
        if a < b:
            ranges.append((i, a - offset, b - offset))
        offset += n
    return tuple(ranges)


def total_steps(steps_per_epoch: int, epochs: int, max_steps: int = 0) -> int:
    """Global steps the run takes: all epochs, or max_steps when that is set and smaller."""
    full = steps_per_epoch * epochs
    return min(full, max_steps) if max_steps > 0 else full
