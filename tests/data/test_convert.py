"""Converters on small files written here in each format's published byte layout."""

import gzip
import struct
import tarfile

import h5py
import numpy as np
import pytest
from conftest import pipeline

from pipeline.data import shards
from pipeline.data.convert import BLOCK, convert, holdout_mask
from pipeline.errors import UserError

QUIET = dict(progress=lambda *_: None)


def all_samples(out, split):
    m = shards.load_manifest(out)
    xs, ys = [], []
    for s in m.shards(split):
        with h5py.File(m.path(s), "r") as f:
            xs.append(f["x"][:])
            ys.append(f["y"][:])
    return np.concatenate(xs), np.concatenate(ys)


def images(n, h, w, seed, c=None):
    shape = (n, h, w) if c is None else (n, h, w, c)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def write_idx(path, array, type_code=0x08, compress=False):
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(">u1" if type_code == 0x08 else array.dtype).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def test_npz_round_trip(tmp_path):
    # More rows than one read block, so the stream crosses block and shard boundaries.
    x_train, x_test = images(BLOCK + 500, 8, 6, 1), images(300, 8, 6, 2)
    y_train = np.random.default_rng(3).integers(0, 10, BLOCK + 500).astype(np.uint8)
    y_test = np.arange(300) % 10
    np.savez(tmp_path / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    convert("npz", tmp_path / "mnist.npz", tmp_path / "out", shards=3, **QUIET)
    x, y = all_samples(tmp_path / "out", "train")
    assert np.array_equal(x[..., 0], x_train) and np.array_equal(y, y_train)
    x, y = all_samples(tmp_path / "out", "val")
    assert np.array_equal(x[..., 0], x_test) and np.array_equal(y, y_test)
    m = shards.load_manifest(tmp_path / "out")
    assert m.shape == (8, 6, 1) and m.num_classes == 10 and len(m.shards("train")) == 3
    assert list(shards.verify(m)) == []


def test_compressed_npz_without_test_split_holds_out_a_fraction(tmp_path):
    x_train = images(1000, 5, 5, 4, c=3)
    y_train = np.random.default_rng(5).integers(0, 4, 1000)
    np.savez_compressed(tmp_path / "d.npz", x_train=x_train, y_train=y_train)
    convert("npz", tmp_path / "d.npz", tmp_path / "out", shards=2, val_fraction=0.2, seed=9, **QUIET)
    held = holdout_mask(1000, 0.2, 9)
    assert held.sum() == 200
    x, y = all_samples(tmp_path / "out", "train")
    assert np.array_equal(x, x_train[~held]) and np.array_equal(y, y_train[~held])
    x, y = all_samples(tmp_path / "out", "val")
    assert np.array_equal(x, x_train[held]) and np.array_equal(y, y_train[held])


def test_npz_with_objects_is_refused(tmp_path):
    np.savez(tmp_path / "bad.npz", x_train=np.array([object()] * 3), y_train=np.arange(3))
    with pytest.raises(UserError, match="refusing to unpickle"):
        convert("npz", tmp_path / "bad.npz", tmp_path / "out", **QUIET)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    src = tmp_path / "fashion"
    src.mkdir()
    ext = ".gz" if compress else ""
    x_train, x_test = images(700, 28, 28, 6), images(90, 28, 28, 7)
    y_train, y_test = np.arange(700) % 10, np.arange(90) % 10
    write_idx(src / f"train-images-idx3-ubyte{ext}", x_train, compress=compress)
    write_idx(src / f"train-labels-idx1-ubyte{ext}", y_train.astype(np.uint8), compress=compress)
    write_idx(src / f"t10k-images-idx3-ubyte{ext}", x_test, compress=compress)
    write_idx(src / f"t10k-labels-idx1-ubyte{ext}", y_test.astype(np.uint8), compress=compress)
    convert("idx", src, tmp_path / "out", shards=2, **QUIET)
    x, y = all_samples(tmp_path / "out", "train")
    assert np.array_equal(x[..., 0], x_train) and np.array_equal(y, y_train)
    x, y = all_samples(tmp_path / "out", "val")
    assert np.array_equal(x[..., 0], x_test) and np.array_equal(y, y_test)


def test_idx_truncated_images_name_the_file(tmp_path):
    src = tmp_path / "mnist"
    src.mkdir()
    write_idx(src / "train-images-idx3-ubyte", images(50, 28, 28, 1))
    write_idx(src / "train-labels-idx1-ubyte", (np.arange(50) % 10).astype(np.uint8))
    data = (src / "train-images-idx3-ubyte").read_bytes()
    (src / "train-images-idx3-ubyte").write_bytes(data[:-100])
    r = pipeline("data", "convert", "--format", "idx", "--src", src, "--out", tmp_path / "out")
    assert r.returncode == 2 and "train-images-idx3-ubyte: truncated" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "out").glob("*.h5")), "no partial shards left"


def cifar_records(labels, pixels):
    """CIFAR-10 binary: 1 label byte, then 1024 R, 1024 G, 1024 B bytes (channel-first)."""
    planar = pixels.transpose(0, 3, 1, 2).reshape(len(labels), 3072)
    return np.concatenate([labels.astype(np.uint8)[:, None], planar], axis=1).tobytes()


@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar10_round_trip(tmp_path, as_tar):
    src = tmp_path / "cifar-10-batches-bin"
    src.mkdir()
    xs, ys = [], []
    for i in range(1, 6):
        x, y = images(40, 32, 32, i, c=3), (np.arange(40) + i) % 10
        (src / f"data_batch_{i}.bin").write_bytes(cifar_records(y, x))
        xs.append(x)
        ys.append(y)
    x_test, y_test = images(30, 32, 32, 99, c=3), np.arange(30) % 10
    (src / "test_batch.bin").write_bytes(cifar_records(y_test, x_test))
    given = src
    if as_tar:
        given = tmp_path / "cifar-10-binary.tar.gz"
        with tarfile.open(given, "w:gz") as tar:
            tar.add(src, arcname="cifar-10-batches-bin")
    convert("cifar10", given, tmp_path / "out", shards=3, **QUIET)
    x, y = all_samples(tmp_path / "out", "train")
    assert np.array_equal(x, np.concatenate(xs)) and np.array_equal(y, np.concatenate(ys))
    x, y = all_samples(tmp_path / "out", "val")
    assert np.array_equal(x, x_test) and np.array_equal(y, y_test)
    assert shards.load_manifest(tmp_path / "out").shape == (32, 32, 3)


def test_cifar10_partial_record_is_an_error(tmp_path):
    (tmp_path / "data_batch_1.bin").write_bytes(b"\x01" * 3073 * 2 + b"\x00" * 10)
    with pytest.raises(UserError, match=r"data_batch_1\.bin: .* not a whole number"):
        convert("cifar10", tmp_path, tmp_path / "out", **QUIET)


def test_writer_options_reach_the_shards(tmp_path):
    np.savez(tmp_path / "m.npz", x_train=images(600, 4, 4, 1), y_train=np.arange(600) % 3)
    convert("npz", tmp_path / "m.npz", tmp_path / "out", shards=1, chunk_samples=64, compression="gzip:6",
            x_dtype="float16", **QUIET)
    m = shards.load_manifest(tmp_path / "out")
    with h5py.File(m.path(m.shards("train")[0]), "r") as f:
        assert f["x"].chunks[0] == 64 and f["x"].compression == "gzip" and f["x"].compression_opts == 6
        assert f["x"].dtype == np.float16 and float(f["x"][:].max()) <= 1.0
    assert m.x_dtype == "float16" and m.raw["compression"] == "gzip:6"
