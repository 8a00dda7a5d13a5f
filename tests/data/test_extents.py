"""The extents sidecar: `pipeline data index` records where each file's sample bytes lie, and
the reader reads from the first epoch with pread, opening no file with h5py, while every file
still has the recorded size and mtime. Real HDF5 files of each layout users bring; the
samples read are compared with what h5py reads."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
from conftest import pipeline

from pipeline.data import extents, reader, sharding, shards


def _index(src, out, *args):
    r = pipeline("data", "index", src, "--out", out, *args)
    assert r.returncode == 0, r.stderr
    assert (out / extents.NAME).exists(), "the index writes its sidecar"
    return shards.load_manifest(out)


def _many(d, n_files=3, per=40, compression=None, chunks=None):
    rng = np.random.default_rng(1)
    d.mkdir()
    for i in range(n_files):
        with h5py.File(d / f"part-{i}.h5", "w") as f:
            f.create_dataset("x", data=rng.random((per, 6, 6, 2), dtype=np.float32), compression=compression,
                             chunks=chunks)
            f.create_dataset("y", data=rng.integers(0, 5, per).astype(np.int64))
    return d


def _one(d, n_files=12):
    rng = np.random.default_rng(2)
    d.mkdir()
    for i in range(n_files):
        with h5py.File(d / f"s-{i:03d}.h5", "w") as f:
            f["data"] = rng.random((8, 8, 3), dtype=np.float32)
            f["label"] = rng.integers(0, 3, (8, 8)).astype(np.uint8)
    return d


def _vol(d, n_files=4):
    rng = np.random.default_rng(3)
    d.mkdir()
    for i in range(n_files):
        with h5py.File(d / f"u-{i}.h5", "w") as f:
            f["full"] = rng.integers(0, 100, (16, 16, 16, 2)).astype(np.int16)
            f["par"] = rng.random(4, dtype=np.float32)
    return d


CASES = {
    "one-per-file": (_one, ["--x", "data", "--y", "label", "--per-file", "one", "--num-classes", "3"]),
    "subvolume": (_vol, ["--x", "full", "--y", "par", "--subvolume", "8"]),
    "chunked": (lambda d: _many(d, chunks=(8, 6, 6, 2)), ["--x", "x", "--y", "y", "--num-classes", "5"]),
    "contiguous": (_many, ["--x", "x", "--y", "y", "--num-classes", "5"]),
    "gzip": (lambda d: _many(d, compression="gzip", chunks=(8, 6, 6, 2)), ["--x", "x", "--y", "y",
                                                                            "--num-classes", "5"]),
}


def _stream(m, **kw):
    """The whole training split through ShardSource, in rank-local order, and its h5py opens."""
    plan = sharding.assign([s.num_samples for s in m.shards("train")], 0, 1, 1)
    src = reader.ShardSource(m, "train", **kw)
    src.load(reader.cut_blocks(plan, reader.block_size(64, m.chunk_samples)))
    x = np.empty((plan.samples_per_rank, *m.shape), m.x_dtype)
    y = np.empty((plan.samples_per_rank, *m.y_shape), m.y_dtype)
    src.take(np.arange(len(x)), x, y)
    opens = src.h5py_opens
    src.close()
    return x, y, opens, plan


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_first_epoch_reads_with_pread_and_the_samples_are_h5pys(tmp_path, case):
    make, args = CASES[case]
    m = _index(make(tmp_path / "src"), tmp_path / "idx", *args, "--val-fraction", "0")
    want_x, want_y = reader.read_share(m, "train", sharding.assign([s.num_samples for s in m.shards("train")],
                                                                   0, 1, 1))
    x, y, opens, _ = _stream(m)
    assert np.array_equal(x, want_x) and np.array_equal(y, want_y)
    assert opens == 0, f"{case}: the sidecar describes every file, so none is opened with h5py"
    # The same through the old path (no sidecar): same samples, one open per file.
    x0, y0, opens0, _ = _stream(m, use_extents=False)
    assert np.array_equal(x0, want_x) and np.array_equal(y0, want_y)
    assert opens0 == len(m.shards("train"))
    # load_share (the in-memory path the trainer takes) reads the same through the sidecar.
    plan = sharding.assign([s.num_samples for s in m.shards("train")], 0, 1, 1)
    lx, ly = reader.load_share(m, "train", plan, reader.block_size(64, m.chunk_samples))
    assert np.array_equal(lx, want_x) and np.array_equal(ly, want_y)


def test_a_file_changed_after_indexing_is_read_through_h5py(tmp_path):
    """A rewritten file (other bytes, other mtime) is not read at the recorded offsets: the
    reader checks size and mtime and opens that file with h5py; the others still use pread."""
    src = _one(tmp_path / "src")
    m = _index(src, tmp_path / "idx", *CASES["one-per-file"][1], "--val-fraction", "0")
    victim = m.path(m.shards("train")[3])
    with h5py.File(victim, "w") as f:  # a new layout in the file: the old offsets would read garbage
        f["pad"] = np.zeros(1000, np.float64)
        f["data"] = np.full((8, 8, 3), 7.0, np.float32)
        f["label"] = np.ones((8, 8), np.uint8)
    os.utime(victim, ns=(1, 1))
    x, y, opens, plan = _stream(m)
    want_x, want_y = reader.read_share(m, "train", plan)
    assert np.array_equal(x, want_x) and np.array_equal(y, want_y)
    assert opens == 1, "only the changed file is opened with h5py"
    assert (x == 7.0).all(axis=(1, 2, 3)).sum() == 1


def test_an_index_without_a_sidecar_reads_as_before(tmp_path):
    m = _index(_vol(tmp_path / "src"), tmp_path / "idx", *CASES["subvolume"][1], "--val-fraction", "0")
    (tmp_path / "idx" / extents.NAME).unlink()
    assert extents.load(m) is None
    x, y, opens, plan = _stream(m)
    want_x, want_y = reader.read_share(m, "train", plan)
    assert np.array_equal(x, want_x) and np.array_equal(y, want_y) and opens == len(m.shards("train"))


def test_a_damaged_sidecar_is_ignored(tmp_path):
    m = _index(_one(tmp_path / "src"), tmp_path / "idx", *CASES["one-per-file"][1], "--val-fraction", "0")
    (tmp_path / "idx" / extents.NAME).write_bytes(b"not a zip")
    assert extents.load(m) is None
    x, _, opens, plan = _stream(m)
    assert np.array_equal(x, reader.read_share(m, "train", plan)[0]) and opens == len(m.shards("train"))
