"""Per-rank input: this rank's share of the shards, in a deterministic order, through tf.data.

The share (a contiguous index range from `sharding.assign`) is cut into blocks at multiples
of `read_block` samples in each shard's own coordinates, so each block is one contiguous,
chunk-aligned HDF5 read. An epoch visits the blocks in a permuted order, a window of blocks
(the shuffle buffer, `shuffle_buffer` samples) at a time, shuffling samples within the
window. That order is a pure function of (seed, epoch, rank), and two sources follow it:

- MemorySource: the whole share read once into memory, used when it fits `data.cache_mb`;
- ShardSource: streams each window's blocks from the shards, for data larger than memory.

Both give the same batches, and a run resumed at any step sees exactly the batches the
uninterrupted run would have. Batches leave as uint8 (scaled to float inside the step), in
stacks of several batches so tf.data's per-element cost is paid once per stack. Shards are
opened inside the rank's own process, never before a fork: h5py handles are not fork-safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from pipeline.data import direct, extents
from pipeline.data.sharding import Plan
from pipeline.data.shards import Manifest, open_shard

# About this much input is handed to tf.data per element (a stack of batches). Measured: 1 MiB
# stacks ran 4x faster than 4 MiB ones, whose fresh allocations fault in every page.
STACK_BYTES = 1 << 20


@dataclass(frozen=True)
class Block:
    shard: int
    start: int  # first sample, in the shard's own indices
    stop: int
    offset: int  # rank-local index of the first sample

    @property
    def size(self) -> int:
        return self.stop - self.start


def cut_blocks(plan: Plan, block: int) -> list[Block]:
    """The rank's ranges cut at multiples of `block` (shard coordinates); in order."""
    out, offset = [], 0
    for shard, a, b in plan.ranges:
        s = a
        while s < b:
            e = min(b, (s // block + 1) * block)
            out.append(Block(shard, s, e, offset))
            offset += e - s
            s = e
    return out


def block_size(read_block: int, chunk: int) -> int:
    """read_block rounded down to whole chunks (at least one), so reads stay chunk-aligned."""
    return max(chunk, read_block - read_block % chunk)


def epoch_groups(blocks: list[Block], seed: int, epoch: int, rank: int, window: int,
                 shuffle: bool = True) -> Iterator[tuple[list[Block], np.ndarray]]:
    """Windows of blocks read together, each with the order (rank-local indices) its samples go in."""
    rng = np.random.default_rng([seed, epoch, rank]) if shuffle else None
    order = rng.permutation(len(blocks)) if shuffle else range(len(blocks))
    group: list[Block] = []
    size = 0
    for i in order:
        group.append(blocks[i])
        size += blocks[i].size
        if size >= window:
            yield group, _group_order(group, rng)
            group, size = [], 0
    if group:
        yield group, _group_order(group, rng)


def _group_order(group: list[Block], rng) -> np.ndarray:
    idx = np.concatenate([np.arange(b.offset, b.offset + b.size) for b in group])
    return rng.permutation(idx) if rng is not None else idx


def epoch_order(blocks: list[Block], seed: int, epoch: int, rank: int, window: int, shuffle: bool = True) -> np.ndarray:
    """The whole epoch's order of rank-local indices (for tests and small shares)."""
    return np.concatenate([o for _, o in epoch_groups(blocks, seed, epoch, rank, window, shuffle)])


class MemorySource:
    """The share in memory; `take` gathers samples by rank-local index."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y

    def load(self, group: list[Block], next_group: list[Block] | None = None) -> None:
        pass

    def take(self, idx: np.ndarray, out_x: np.ndarray, out_y: np.ndarray) -> None:
        np.take(self.x, idx, axis=0, out=out_x)
        np.take(self.y, idx, axis=0, out=out_y)


class ShardSource:
    """Streams a window's blocks from the files into a buffer, then gathers from it.

    Where a dataset is stored uncompressed (chunked along samples, or contiguous, as one
    sample per file usually is), the byte offsets come from HDF5 once per file and the bytes
    go with os.preadv straight into the window buffer on a few threads. preadv releases the
    GIL (h5py's reads do not), so reads run in parallel, and the next window loads while this
    one is gathered and trained on. gzip chunks are read the same way and inflated with zlib
    on those threads; sub-volumes of a contiguous volume are cut from slabs read whole. Only
    what none of these fit (other filters, odd layouts) goes through h5py. At most MAX_OPEN
    files are held open at once: datasets of one sample per file have thousands; offsets
    (a few integers per file) are kept, so later epochs open no file with h5py. With an
    index's extents sidecar (pipeline/data/extents.py) the first epoch opens none either:
    the offsets come from the sidecar for every file whose size and mtime it still matches.
    """

    MAX_OPEN = 64

    def __init__(self, m: Manifest, split: str, threads: int = 4, use_extents: bool = True):
        from collections import OrderedDict
        from concurrent.futures import ThreadPoolExecutor

        self.paths = [m.path(s) for s in m.shards(split)]
        self.layout = m.layout
        self.shape, self.dtype = m.shape, np.dtype(m.x_dtype)
        self.y_shape, self.y_dtype = m.y_shape, np.dtype(m.y_dtype)
        self.sample_bytes, self.target_bytes = m.sample_bytes, m.target_bytes
        self._files: OrderedDict[int, object] = OrderedDict()  # h5py handles, least recently used first
        self._maps: dict[int, tuple] = {}  # shard -> (x map, y map): a few integers each, kept
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="shard-read")
        self._buffers = [None, None]  # (x, y) pairs reused: fresh ones would fault in every page
        self._ahead = None  # (group key, future) of the window loading in the background
        self.bytes_read = 0
        self._m = m
        self._files_names = [s.file for s in m.shards(split)]
        # The index's extents sidecar: files it still describes are never opened with h5py.
        self.sidecar = extents.load(m) if use_extents else None
        self.h5py_opens = 0

    def _file(self, shard: int):
        f = self._files.get(shard)
        if f is None:
            if len(self._files) >= self.MAX_OPEN:
                self._files.popitem(last=False)[1].close()
            f = self._files[shard] = open_shard(self.paths[shard])
            self.h5py_opens += 1
        else:
            self._files.move_to_end(shard)
        return f

    def _map(self, shard: int) -> tuple:
        maps = self._maps.get(shard)
        if maps is None:
            name = self._files_names[shard]
            if self.sidecar is not None and self.sidecar.current(name, self.paths[shard]):
                maps = self.sidecar.maps(name, self._m)
            else:
                f = self._file(shard)
                maps = direct.maps_for_file(f, self.layout, self.sample_bytes, self.target_bytes, self.dtype,
                                            self.y_dtype)
            self._maps[shard] = maps
        return maps

    def _buffer(self, slot: int, n: int):
        buf = self._buffers[slot]
        if buf is None or len(buf[0]) < n:
            buf = self._buffers[slot] = (np.empty((n, *self.shape), self.dtype),
                                         np.empty((n, *self.y_shape), self.y_dtype))
        return buf[0][:n], buf[1][:n]

    def _read(self, group: list[Block], slot: int):
        """Reads `group` (sorted by offset) into buffer `slot`; returns (x, y, offsets, starts)."""
        n = sum(b.size for b in group)
        x, y = self._buffer(slot, n)
        jobs = []
        pos = 0
        for b in group:
            for cmap, out, read in zip(self._map(b.shard), (x, y), (self.layout.read_x, self.layout.read_y)):
                if cmap is None:
                    read(self._file(b.shard), b.start, b.stop, out[pos:pos + b.size])
                else:
                    jobs += [self._pool.submit(r) for r in cmap.reads(self.paths[b.shard], b.start, b.stop,
                                                                      out[pos:pos + b.size])]
            pos += b.size
        for j in jobs:
            j.result()
        self.bytes_read += x.nbytes + y.nbytes
        offsets = np.array([b.offset for b in group])
        starts = np.cumsum([0] + [b.size for b in group[:-1]])
        return x, y, offsets, starts

    def load(self, group: list[Block], next_group: list[Block] | None = None) -> None:
        group = sorted(group, key=lambda b: b.offset)
        key = tuple(b.offset for b in group)
        if self._ahead is not None and self._ahead[0] == key:
            loaded, slot = self._ahead[1].result(), self._ahead[2]
        else:
            if self._ahead is not None:
                self._ahead[1].result()  # never leave a read writing into a buffer we reuse
            slot = 0
            loaded = self._read(group, slot)
        self._ahead = None
        self.x, self.y, self._offsets, self._starts = loaded
        if next_group:
            nxt = sorted(next_group, key=lambda b: b.offset)
            other = 1 - slot
            self._ahead = (tuple(b.offset for b in nxt), self._pool.submit(self._read, nxt, other), other)

    def take(self, idx: np.ndarray, out_x: np.ndarray, out_y: np.ndarray) -> None:
        j = np.searchsorted(self._offsets, idx, side="right") - 1
        pos = idx - self._offsets[j] + self._starts[j]
        np.take(self.x, pos, axis=0, out=out_x)
        np.take(self.y, pos, axis=0, out=out_y)

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead[1].result()
            self._ahead = None
        self._pool.shutdown(wait=True)
        for f in self._files.values():
            f.close()
        self._files.clear()


def read_share(m: Manifest, split: str, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """This rank's samples of `split` as (x, y) in rank-local order: one read per range."""
    shards = m.shards(split)
    x = np.empty((plan.samples_per_rank, *m.shape), dtype=m.x_dtype)
    y = np.empty((plan.samples_per_rank, *m.y_shape), dtype=m.y_dtype)
    pos = 0
    for shard_index, start, stop in plan.ranges:
        with open_shard(m.path(shards[shard_index])) as f:
            n = stop - start
            m.layout.read_x(f, start, stop, x[pos:pos + n])
            m.layout.read_y(f, start, stop, y[pos:pos + n])
            pos += n
    return x, y


def stack_size(batch_size: int, sample_bytes: int) -> int:
    """Batches per tf.data element: about STACK_BYTES, between 1 and 64 batches."""
    return max(1, min(64, STACK_BYTES // max(1, batch_size * sample_bytes)))



def batch_stacks(source, blocks: list[Block], batch_size: int, steps_per_epoch: int, seed: int, rank: int,
                 start_step: int, end_step: int, window: int, shuffle: bool = True,
                 stack: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches for global steps start_step+1 .. end_step, as (k, batch, ...) stacks, k <= stack."""
    shape, dtype, y_shape, y_dtype = _sample_spec(source)
    stack = stack or stack_size(batch_size, int(np.prod(shape)) * dtype.itemsize
                                + int(np.prod(y_shape)) * y_dtype.itemsize)
    step = start_step
    while step < end_step:
        epoch, first = divmod(step, steps_per_epoch)
        batches = min(steps_per_epoch - first, end_step - step)
        # `left`: samples of this segment not yet taken (a stack may span two windows).
        skip, left = first * batch_size, batches * batch_size
        out_x = out_y = None
        filled = 0
        groups = list(epoch_groups(blocks, seed, epoch, rank, window, shuffle))
        for g, (group, order) in enumerate(groups):
            if skip >= len(order):
                skip -= len(order)  # a window wholly before the resume point is never read
                continue
            order = order[skip:skip + left]
            skip = 0
            ahead = groups[g + 1][0] if g + 1 < len(groups) and left > len(order) else None
            source.load(group, ahead)
            pos = 0
            while pos < len(order):
                if out_x is None:
                    k = min(stack * batch_size, left + filled)
                    out_x, out_y, filled = np.empty((k, *shape), dtype), np.empty((k, *y_shape), y_dtype), 0
                n = min(len(out_x) - filled, len(order) - pos)
                source.take(order[pos:pos + n], out_x[filled:filled + n], out_y[filled:filled + n])
                filled += n
                pos += n
                left -= n
                if filled == len(out_x):
                    yield out_x.reshape(-1, batch_size, *shape), out_y.reshape(-1, batch_size, *y_shape)
                    out_x, filled = None, 0
            if left == 0:
                break
        step += batches


def _sample_spec(source) -> tuple[tuple[int, ...], np.dtype, tuple[int, ...], np.dtype]:
    """(x shape, x dtype, y shape, y dtype) of one sample."""
    if isinstance(source, MemorySource):
        return source.x.shape[1:], source.x.dtype, source.y.shape[1:], source.y.dtype
    return source.shape, source.dtype, source.y_shape, source.y_dtype


def to_float(x):
    """Pixels to float32 in [0, 1], inside the step: uint8 travels, float is computed."""
    import tensorflow as tf

    if x.dtype == tf.uint8:
        return tf.cast(x, tf.float32) * (1.0 / 255.0)
    return tf.cast(x, tf.float32)


def train_dataset(source, blocks: list[Block], plan: Plan, batch_size: int, seed: int, start_step: int,
                  end_step: int, window: int, shuffle: bool = True, prefetch: int = 2, device: str | None = None):
    """tf.data stacks of batches for steps start_step+1 .. end_step, prefetched so reads overlap
    compute; iterate it with `batches()`. `device` ("/GPU:0"): each stack is copied there one
    ahead of the call that uses it, so the copy overlaps the step before."""
    import tensorflow as tf

    shape, dtype, y_shape, y_dtype = _sample_spec(source)

    def gen():
        yield from batch_stacks(source, blocks, batch_size, plan.steps_per_epoch, seed, plan.rank,
                                start_step, end_step, window, shuffle)

    spec = (tf.TensorSpec((None, batch_size, *shape), tf.as_dtype(dtype)),
            tf.TensorSpec((None, batch_size, *y_shape), tf.as_dtype(y_dtype)))
    ds = tf.data.Dataset.from_generator(gen, output_signature=spec)
    ds = ds.prefetch(tf.data.AUTOTUNE if prefetch < 0 else prefetch)
    # tf.data's rule: the copy to the device is the last transformation.
    return ds.apply(tf.data.experimental.prefetch_to_device(device, 1)) if device else ds


def batches(dataset) -> Iterator[tuple]:
    """One (x, y) batch at a time from a dataset of stacks. A tf.data element costs tens of
    microseconds to fetch from Python; unstacking costs one op per stack instead."""
    import tensorflow as tf

    for xs, ys in dataset:
        yield from zip(tf.unstack(xs), tf.unstack(ys))


def eval_batches(source, blocks: list[Block], batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The share in order, in batches (the last may be short)."""
    shape, dtype, y_shape, y_dtype = _sample_spec(source)
    pending_x, pending_y = [], []
    for block in blocks:
        source.load([block])
        idx = np.arange(block.offset, block.stop - block.start + block.offset)
        x, y = np.empty((len(idx), *shape), dtype), np.empty((len(idx), *y_shape), y_dtype)
        source.take(idx, x, y)
        pending_x.append(x)
        pending_y.append(y)
        while sum(len(p) for p in pending_y) >= batch_size:
            xs, ys = np.concatenate(pending_x), np.concatenate(pending_y)
            yield xs[:batch_size], ys[:batch_size]
            pending_x, pending_y = [xs[batch_size:]], [ys[batch_size:]]
    if pending_y and sum(len(p) for p in pending_y):
        yield np.concatenate(pending_x), np.concatenate(pending_y)


def share_bytes(m: Manifest, plan: Plan) -> int:
    return plan.samples_per_rank * (m.sample_bytes + m.target_bytes)


class Input:
    """One rank's input for a run, built from the config's data section: its training share
    (in memory when it fits data.cache_mb, else streamed from the shards) and its validation
    share, cut into read blocks. Open it after the process started: h5py is not fork-safe."""

    def __init__(self, m: Manifest, plan: Plan, val_plan: Plan | None, data):
        self.data = data
        budget = data.cache_mb * 2**20
        block = block_size(data.read_block, m.chunk_samples)
        self.train, self.mode = _open_source(m, "train", plan, budget, block)
        self.val = _open_source(m, "val", val_plan, budget - share_bytes(m, plan), block)[0] if val_plan else None
        self.plan = plan
        self.blocks = cut_blocks(plan, block)
        self.val_blocks = cut_blocks(val_plan, block) if val_plan else []

    def train_dataset(self, batch_size: int, seed: int, start_step: int, end_step: int, device: str | None = None):
        return train_dataset(self.train, self.blocks, self.plan, batch_size, seed, start_step, end_step,
                             self.data.shuffle_buffer, self.data.shuffle, self.data.prefetch, device)

    def release_train(self):
        """Hands over the in-memory training share and lets go of it here, so that only its
        copy in the feed's variables stays in memory (pipeline/data/feed.py)."""
        source, self.train = self.train, None
        return source

    def eval_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self.val is None:
            return iter(())
        return eval_batches(self.val, self.val_blocks, batch_size)


def load_share(m: Manifest, split: str, plan: Plan, block: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's samples of `split` in rank-local order, as `read_share` gives them. With an
    extents sidecar, read with pread on the reader's threads (one h5py open per file
    otherwise: thousands of opens for one sample per file), else with h5py."""
    if extents.load(m) is None:
        return read_share(m, split, plan)
    src = ShardSource(m, split)
    try:
        src.load(cut_blocks(plan, block))
        return src.x, src.y
    finally:
        src.close()


def _open_source(m: Manifest, split: str, plan: Plan, budget: int, block: int):
    """In memory when this rank's share fits the budget, else streamed from the shards."""
    need = share_bytes(m, plan)
    if need <= budget:
        return MemorySource(*load_share(m, split, plan, block)), f"in memory ({need / 2**20:.0f} MiB per rank)"
    return ShardSource(m, split), f"streamed from the shards ({need / 2**20:.0f} MiB per rank > data.cache_mb)"
