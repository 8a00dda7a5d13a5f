"""Reading a file's samples without h5py: where a dataset's bytes lie, and reads of them.

Each map knows where one dataset's bytes lie in its file and turns "samples [start, stop) of
this file into `out`" into reads (zero-argument callables) that the reader runs on its
threads: pread and zlib release the GIL, h5py does not. A map comes either from the open
dataset (`for_dataset`, `slabs_for`: HDF5 is asked once per file) or from the extents
sidecar written by `pipeline data index` (pipeline/data/extents.py), which holds each map as
a few integers (`record` / `from_record`), so a file is never opened with h5py at all.
"""

from __future__ import annotations

from functools import partial

import numpy as np

# Map kinds as recorded in the sidecar.
NONE, CONTIGUOUS, CHUNKS, DEFLATE, SLABS, KEPT = range(6)


class _Extents:
    """Base of the maps whose bytes are the samples as stored: subclasses give extents()."""

    sample_bytes: int

    def extents(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        raise NotImplementedError

    def reads(self, path, start: int, stop: int, out: np.ndarray) -> list:
        flat = out.reshape(-1).view(np.uint8)
        return [partial(pread_path, path, flat[rel * self.sample_bytes:rel * self.sample_bytes + size], off)
                for off, size, rel in self.extents(start, stop)]


class ChunkMap(_Extents):
    """Where each chunk of an uncompressed dataset chunked along samples lies in the file."""

    kind = CHUNKS

    def __init__(self, chunk: int, offsets: np.ndarray, sample_bytes: int):
        self.chunk, self.offsets, self.sample_bytes = int(chunk), np.asarray(offsets, np.int64), sample_bytes

    def extents(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(file offset, byte count, sample position relative to start) reads for [start, stop),
        adjacent chunks merged into one read."""
        out: list[list[int]] = []
        c, sb = self.chunk, self.sample_bytes
        for k in range(start // c, (stop - 1) // c + 1):
            a, b = max(start, k * c), min(stop, (k + 1) * c)
            off, size = int(self.offsets[k]) + (a - k * c) * sb, (b - a) * sb
            if out and out[-1][0] + out[-1][1] == off:
                out[-1][1] += size
            else:
                out.append([off, size, a - start])
        return [tuple(e) for e in out]

    def record(self) -> tuple[int, int, np.ndarray, np.ndarray]:
        return self.kind, self.chunk, self.offsets, np.zeros(0, np.int64)


class Contiguous(_Extents):
    """An uncompressed, contiguous dataset: sample j's bytes start at offset + j x sample_bytes
    (with one sample per file, the whole dataset is the sample)."""

    kind = CONTIGUOUS

    def __init__(self, offset: int, sample_bytes: int):
        self.offset, self.sample_bytes = int(offset), sample_bytes

    def extents(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        return [(self.offset + start * self.sample_bytes, (stop - start) * self.sample_bytes, 0)]

    def record(self):
        return self.kind, self.offset, np.zeros(0, np.int64), np.zeros(0, np.int64)


class DeflateChunks:
    """A dataset chunked along samples with only the deflate (gzip) filter: each chunk's
    compressed bytes are read with pread and inflated with zlib on the reader's threads, where
    h5py would inflate them one at a time under its lock."""

    kind = DEFLATE

    def __init__(self, chunk: int, offsets: np.ndarray, sizes: np.ndarray, sample_bytes: int):
        self.chunk = int(chunk)
        self.offsets, self.sizes = np.asarray(offsets, np.int64), np.asarray(sizes, np.int64)
        self.sample_bytes = sample_bytes

    def reads(self, path, start: int, stop: int, out: np.ndarray) -> list:
        flat = out.reshape(-1).view(np.uint8)
        c, sb = self.chunk, self.sample_bytes
        jobs = []
        for k in range(start // c, (stop - 1) // c + 1):
            a, b = max(start, k * c), min(stop, (k + 1) * c)
            jobs.append(partial(self._inflate, path, int(self.offsets[k]), int(self.sizes[k]), (a - k * c) * sb,
                                flat[(a - start) * sb:(b - start) * sb]))
        return jobs

    @staticmethod
    def _inflate(path, off: int, size: int, skip: int, dst: np.ndarray) -> None:
        import zlib

        raw = np.empty(size, np.uint8)
        pread_path(path, raw, off)
        dst[:] = np.frombuffer(zlib.decompress(raw), np.uint8, len(dst), skip)

    def record(self):
        return self.kind, self.chunk, self.offsets, self.sizes


class Slabs:
    """Sub-volumes of a contiguous, uncompressed volume: the S rows of the outermost axis that
    hold a row of the sub-volume grid are one contiguous slab in the file. Each slab is read
    once with pread and its sub-volumes cut out with numpy, instead of one h5py hyperslab read
    (a strided gather under h5py's lock) per sub-volume."""

    kind = SLABS

    def __init__(self, offset: int, file_shape: tuple[int, ...], dtype, layout):
        self.offset, self.dtype, self.layout = int(offset), np.dtype(dtype), layout
        self.slab_shape = (layout.subvolume, *file_shape[1:])
        self.slab_bytes = int(np.prod(self.slab_shape)) * self.dtype.itemsize
        self.per_slab = int(np.prod(layout.grid[1:]))  # sub-volumes in one slab

    def reads(self, path, start: int, stop: int, out: np.ndarray) -> list:
        n = self.per_slab
        return [partial(self._cut, path, slab, range(max(start, slab * n), min(stop, (slab + 1) * n)), start, out)
                for slab in range(start // n, (stop - 1) // n + 1)]

    def _cut(self, path, slab: int, js: range, start: int, out: np.ndarray) -> None:
        buf = np.empty(self.slab_bytes, np.uint8)
        pread_path(path, buf, self.offset + slab * self.slab_bytes)
        vol = buf.view(self.dtype).reshape(self.slab_shape)
        for j in js:
            out[j - start] = vol[(slice(None),) + self.layout.cube(j)[1:]]

    def record(self):
        return self.kind, self.offset, np.zeros(0, np.int64), np.zeros(0, np.int64)


class Kept:
    """A file's one target (every sub-volume of a file has it), kept in memory."""

    kind = KEPT

    def __init__(self, value: np.ndarray):
        self.value = value

    def reads(self, path, start: int, stop: int, out: np.ndarray) -> list:
        out[:] = self.value
        return []

    def record(self):
        raw = np.frombuffer(np.ascontiguousarray(self.value).tobytes(), np.uint8).astype(np.int64)
        return self.kind, 0, raw, np.zeros(0, np.int64)


def _chunked_by_sample(dset, nfilters: int) -> bool:
    """Chunks hold whole samples, every chunk is allocated, and `nfilters` filters apply."""
    import h5py

    plist = dset.id.get_create_plist()
    return (plist.get_layout() == h5py.h5d.CHUNKED and plist.get_nfilters() == nfilters
            and dset.chunks[1:] == dset.shape[1:] and dset.id.get_num_chunks() == -(-dset.shape[0] // dset.chunks[0]))


def _chunk_table(dset) -> tuple[np.ndarray, np.ndarray, bool]:
    """(byte offset, stored size) of each chunk along axis 0, and whether every chunk went
    through the dataset's filters (HDF5 may store one raw, marked in its mask)."""
    chunk = dset.chunks[0]
    n = -(-dset.shape[0] // chunk)
    offsets, sizes = np.full(n, -1, np.int64), np.zeros(n, np.int64)
    masks = []

    def see(info):
        k = info.chunk_offset[0] // chunk
        offsets[k], sizes[k] = info.byte_offset, info.size
        masks.append(info.filter_mask)

    dset.id.chunk_iter(see)
    return offsets, sizes, not any(masks)


def for_dataset(dset, sample_bytes: int, dtype) -> "Contiguous | ChunkMap | DeflateChunks | None":
    """How to read `dset`'s samples without h5py; None where only h5py can (other filters,
    not allocated, another byte order or type than the manifest's)."""
    import h5py

    if dset.dtype != dtype or not dset.dtype.isnative or dset.ndim == 0:
        return None
    plist = dset.id.get_create_plist()
    if plist.get_layout() == h5py.h5d.CONTIGUOUS:
        offset = dset.id.get_offset()
        return Contiguous(offset, sample_bytes) if offset is not None else None
    if _chunked_by_sample(dset, 0):
        return ChunkMap(dset.chunks[0], _chunk_table(dset)[0], sample_bytes)
    if _chunked_by_sample(dset, 1) and plist.get_filter(0)[0] == h5py.h5z.FILTER_DEFLATE:
        offsets, sizes, filtered = _chunk_table(dset)
        return DeflateChunks(dset.chunks[0], offsets, sizes, sample_bytes) if filtered else None
    return None


def slabs_for(dset, dtype, layout) -> Slabs | None:
    """Slab reads for a sub-volume layout whose volume is contiguous, uncompressed and in the
    manifest's type; None (h5py hyperslabs) otherwise."""
    import h5py

    if dset.dtype != dtype or not dset.dtype.isnative or tuple(dset.shape) != tuple(layout.file_shape):
        return None
    if dset.id.get_create_plist().get_layout() != h5py.h5d.CONTIGUOUS or dset.id.get_offset() is None:
        return None
    return Slabs(dset.id.get_offset(), tuple(dset.shape), dtype, layout)


def kept_for(dset, dtype) -> Kept | None:
    """A sub-volume layout's target, when small enough to keep (64 KiB)."""
    return Kept(np.asarray(dset[()], dtype)) if dset.nbytes <= 1 << 16 else None


def maps_for_file(f, m_layout, sample_bytes: int, target_bytes: int, x_dtype, y_dtype) -> tuple:
    """(x map, y map) of an open file, each None where only h5py can read it."""
    if not m_layout.subvolume:
        return (for_dataset(f[m_layout.x_key], sample_bytes, x_dtype),
                for_dataset(f[m_layout.y_key], target_bytes, y_dtype))
    return slabs_for(f[m_layout.x_key], x_dtype, m_layout), kept_for(f[m_layout.y_key], y_dtype)


def from_record(kind: int, a: int, arr: np.ndarray, sizes: np.ndarray, sample_bytes: int, dtype, layout,
                shape: tuple[int, ...]):
    """The map a sidecar record describes (see each map's `record()`); None for NONE."""
    if kind == CONTIGUOUS:
        return Contiguous(a, sample_bytes)
    if kind == CHUNKS:
        return ChunkMap(a, arr, sample_bytes)
    if kind == DEFLATE:
        return DeflateChunks(a, arr, sizes, sample_bytes)
    if kind == SLABS:
        return Slabs(a, tuple(layout.file_shape), dtype, layout)
    if kind == KEPT:
        return Kept(np.frombuffer(arr.astype(np.uint8).tobytes(), np.dtype(dtype)).reshape(shape))
    return None


def record_of(cmap) -> tuple[int, int, np.ndarray, np.ndarray]:
    return (NONE, 0, np.zeros(0, np.int64), np.zeros(0, np.int64)) if cmap is None else cmap.record()


def pread_path(path, buf: np.ndarray, offset: int) -> None:
    """Opens, reads and closes: a file descriptor per read keeps thousands of files cheap."""
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        pread_full(fd, buf, offset)
    finally:
        os.close(fd)


def pread_full(fd: int, buf: np.ndarray, offset: int) -> None:
    import os

    view = memoryview(buf)
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise OSError(f"unexpected end of file at byte {offset}")
        view, offset = view[n:], offset + n
