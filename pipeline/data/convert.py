"""Real datasets into the shard format, streamed: memory stays bounded by one block of samples.

Formats (the byte layouts their publishers document):
- npz: Keras' mnist.npz — a zip of .npy arrays x_train, y_train, x_test, y_test. Read as a
  stream of rows after the .npy header; object arrays are refused (they would need pickle).
- idx: MNIST and Fashion-MNIST IDX files, gzipped or not: a magic number whose third byte is
  the element type and fourth the rank, the dimensions as big-endian uint32, then the data.
- cifar10: the CIFAR-10 binary batches: records of 1 label byte and 3072 pixel bytes
  (1024 red, 1024 green, 1024 blue, each 32x32 row-major); a directory or the .tar.gz.
The source's own test split becomes the validation split; a source without one gives
--val-fraction of its training samples, chosen by a seeded draw.
"""

from __future__ import annotations

import gzip
import re
import struct
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np

from pipeline.data.shards import (
    DEFAULT_CHUNK,
    X_DTYPES,
    SplitWriter,
    parse_compression,
    prepare_out_dir,
    write_manifest,
)
from pipeline.errors import UserError

FORMATS = ("npz", "idx", "cifar10")
BLOCK = 4096  # samples read, converted and written at a time


@dataclass
class SourceSplit:
    """One split of a source: its labels (small, read whole) and a stream of its images."""
    name: str
    labels: np.ndarray
    open_images: Callable[[], Iterator[np.ndarray]]  # yields uint8 (n, H, W, C) blocks in order


@dataclass
class Source:
    shape: tuple[int, int, int]
    num_classes: int
    splits: dict[str, SourceSplit]  # "train" and, where the source has one, "test"


def _read_exact(f: BinaryIO, n: int, where: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise UserError(f"{where}: truncated (wanted {n} more bytes, got {len(data)})")
    return data


def _rows(f: BinaryIO, count: int, row_shape: tuple[int, ...], dtype, where: str) -> Iterator[np.ndarray]:
    row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    for start in range(0, count, BLOCK):
        n = min(BLOCK, count - start)
        yield np.frombuffer(_read_exact(f, n * row_bytes, where), dtype=dtype).reshape(n, *row_shape)


def _image_shape(shape: tuple[int, ...], where: str) -> tuple[int, int, int]:
    if len(shape) == 3:
        return (shape[1], shape[2], 1)
    if len(shape) == 4:
        return (shape[1], shape[2], shape[3])
    raise UserError(f"{where}: images must be (N, H, W) or (N, H, W, C), got shape {shape}")


def _as_labels(y: np.ndarray, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{where}: labels must be integers of shape (N,), got {y.dtype} {y.shape}")
    if len(y) and y.min() < 0:
        raise UserError(f"{where}: negative label {y.min()}")
    return y.astype(np.int32)


# ---- npz ------------------------------------------------------------------------------

def _npy_header(f: BinaryIO, where: str) -> tuple[tuple[int, ...], np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            raise UserError(f"{where}: .npy format version {version} is not supported")
    except ValueError as e:
        raise UserError(f"{where}: not a .npy array ({e})") from None
    if dtype.hasobject:
        raise UserError(f"{where}: holds Python objects; refusing to unpickle")
    if fortran and len(shape) > 1:
        raise UserError(f"{where}: Fortran-ordered arrays cannot be streamed by rows")
    return shape, dtype


def _npz_source(path: Path) -> Source:
    if not path.is_file():
        raise UserError(f"{path}: npz file not found")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UserError(f"{path}: not an npz (zip) file") from None
    names = set(zf.namelist())
    for need in ("x_train.npy", "y_train.npy"):
        if need not in names:
            raise UserError(f"{path}: no array {need[:-4]!r} (expected x_train, y_train[, x_test, y_test])")

    def member(name: str):
        where = f"{path}:{name}"
        f = zf.open(name)
        shape, dtype = _npy_header(f, where)
        return f, shape, dtype, where

    def labels(name: str) -> np.ndarray:
        f, shape, dtype, where = member(name)
        with f:
            data = _read_exact(f, int(np.prod(shape)) * dtype.itemsize, where)
        return _as_labels(np.frombuffer(data, dtype=dtype).reshape(shape), where)

    def split(name: str, suffix: str) -> SourceSplit:
        y = labels(f"y_{suffix}.npy")
        f, shape, dtype, where = member(f"x_{suffix}.npy")
        f.close()
        if dtype != np.uint8:
            raise UserError(f"{where}: images must be uint8, got {dtype}")
        if shape[0] != len(y):
            raise UserError(f"{path}: x_{suffix} has {shape[0]} samples but y_{suffix} has {len(y)}")
        img = _image_shape(shape, where)

        def images():
            f2, _, _, _ = member(f"x_{suffix}.npy")
            with f2:
                for block in _rows(f2, shape[0], shape[1:], np.uint8, where):
                    yield block.reshape(len(block), *img)
        return SourceSplit(name, y, images), img

    train, shape = split("train", "train")
    splits = {"train": train}
    if "x_test.npy" in names and "y_test.npy" in names:
        test, test_shape = split("test", "test")
        if test_shape != shape:
            raise UserError(f"{path}: x_test images are {test_shape}, x_train images are {shape}")
        splits["test"] = test
    return Source(shape, _num_classes(splits), splits)


# ---- idx ------------------------------------------------------------------------------

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _open_maybe_gzip(path: Path) -> BinaryIO:
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _idx_header(f: BinaryIO, where: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        head = _read_exact(f, 4, where)
    except (OSError, EOFError) as e:
        raise UserError(f"{where}: cannot be read ({e})") from None
    if head[0] != 0 or head[1] != 0 or head[2] not in _IDX_TYPES or head[3] == 0:
        raise UserError(f"{where}: not an IDX file (magic {head.hex()})")
    dims = struct.unpack(f">{head[3]}I", _read_exact(f, 4 * head[3], where))
    return dims, np.dtype(_IDX_TYPES[head[2]])


def _find(src: Path, prefix: str, kind: str) -> Path | None:
    pattern = re.compile(rf"^{prefix}[-.]{kind}[-.]ubyte(\.gz)?$")
    hits = sorted(p for p in src.iterdir() if pattern.match(p.name))
    return hits[0] if hits else None


def _idx_source(src: Path) -> Source:
    if not src.is_dir():
        raise UserError(f"{src}: expected a directory holding the IDX files (train-images-idx3-ubyte[.gz], ...)")

    def split(name: str, prefix: str) -> tuple[SourceSplit, tuple[int, int, int]] | None:
        images, labels = _find(src, f"{prefix}-images", "idx3"), _find(src, f"{prefix}-labels", "idx1")
        if images is None and labels is None:
            return None
        if images is None or labels is None:
            missing = f"{prefix}-images-idx3-ubyte" if images is None else f"{prefix}-labels-idx1-ubyte"
            raise UserError(f"{src}: {missing}[.gz] is missing")
        try:
            with _open_maybe_gzip(labels) as f:
                dims, dtype = _idx_header(f, str(labels))
                if len(dims) != 1:
                    raise UserError(f"{labels}: labels must have one dimension, got {dims}")
                raw = _read_exact(f, dims[0] * dtype.itemsize, str(labels))
        except (OSError, EOFError) as e:
            raise UserError(f"{labels}: cannot be read ({e})") from None
        y = _as_labels(np.frombuffer(raw, dtype), str(labels))
        try:
            with _open_maybe_gzip(images) as f:
                idims, idtype = _idx_header(f, str(images))
        except (OSError, EOFError) as e:
            raise UserError(f"{images}: cannot be read ({e})") from None
        if idtype != np.uint8:
            raise UserError(f"{images}: images must be unsigned bytes, got {idtype}")
        if idims[0] != len(y):
            raise UserError(f"{images}: {idims[0]} images but {labels.name} has {len(y)} labels")
        shape = _image_shape(idims, str(images))

        def stream():
            try:
                with _open_maybe_gzip(images) as f:
                    _idx_header(f, str(images))
                    for block in _rows(f, idims[0], idims[1:], np.uint8, str(images)):
                        yield block.reshape(len(block), *shape)
            except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
                raise UserError(f"{images}: cannot be read ({e})") from None
        return SourceSplit(name, y, stream), shape

    train = split("train", "train")
    if train is None:
        raise UserError(f"{src}: no train-images-idx3-ubyte[.gz] / train-labels-idx1-ubyte[.gz]")
    splits = {"train": train[0]}
    test = split("test", "t10k")
    if test is not None:
        if test[1] != train[1]:
            raise UserError(f"{src}: t10k images are {test[1]}, train images are {train[1]}")
        splits["test"] = test[0]
    return Source(train[1], _num_classes(splits), splits)


# ---- cifar10 --------------------------------------------------------------------------

CIFAR_RECORD = 1 + 3 * 32 * 32
CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST = "test_batch.bin"


def _cifar_source(src: Path) -> Source:
    """A directory with data_batch_1..5.bin and test_batch.bin, or the .tar.gz holding them."""
    if src.is_file():
        try:
            tar = tarfile.open(src, "r:*")
        except tarfile.TarError:
            raise UserError(f"{src}: not a tar archive nor a directory of CIFAR-10 .bin batches") from None
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        sizes = {n: m.size for n, m in members.items()}
        opener = lambda name: tar.extractfile(members[name])  # noqa: E731
        where = lambda name: f"{src}:{members[name].name}"  # noqa: E731
    elif src.is_dir():
        base = src / "cifar-10-batches-bin" if (src / "cifar-10-batches-bin").is_dir() else src
        sizes = {p.name: p.stat().st_size for p in base.iterdir() if p.is_file()}
        opener = lambda name: open(base / name, "rb")  # noqa: E731
        where = lambda name: str(base / name)  # noqa: E731
    else:
        raise UserError(f"{src}: not found")
    train_files = [n for n in CIFAR_TRAIN if n in sizes]
    if not train_files:
        raise UserError(f"{src}: no CIFAR-10 training batches (data_batch_1.bin ... data_batch_5.bin)")
    for name in train_files + ([CIFAR_TEST] if CIFAR_TEST in sizes else []):
        if sizes[name] % CIFAR_RECORD:
            raise UserError(f"{where(name)}: {sizes[name]} bytes is not a whole number of "
                            f"{CIFAR_RECORD}-byte records (truncated?)")

    def split(name: str, files: list[str]) -> SourceSplit:
        labels = []
        for fname in files:
            with opener(fname) as f:
                while block := f.read(CIFAR_RECORD * BLOCK):
                    # copy(): a view of the label column would keep the whole block alive.
                    labels.append(np.frombuffer(block, np.uint8).reshape(-1, CIFAR_RECORD)[:, 0].copy())
        y = np.concatenate(labels).astype(np.int32)
        if len(y) and y.max() > 9:
            raise UserError(f"{src}: label {y.max()} out of range for CIFAR-10 (0-9)")

        def images():
            for fname in files:
                with opener(fname) as f:
                    for rec in _rows(f, sizes[fname] // CIFAR_RECORD, (CIFAR_RECORD,), np.uint8, where(fname)):
                        # Stored channel-first (3, 32, 32); the shards hold (32, 32, 3).
                        yield rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return SourceSplit(name, y, images)

    splits = {"train": split("train", train_files)}
    if CIFAR_TEST in sizes:
        splits["test"] = split("test", [CIFAR_TEST])
    return Source((32, 32, 3), 10, splits)


def _num_classes(splits: dict[str, SourceSplit]) -> int:
    return int(max(int(s.labels.max()) for s in splits.values() if len(s.labels))) + 1


SOURCES = {"npz": _npz_source, "idx": _idx_source, "cifar10": _cifar_source}


def holdout_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    """True for the round(n * fraction) training samples held out for validation."""
    mask = np.zeros(n, dtype=bool)
    k = int(round(n * fraction))
    if k:
        mask[np.random.default_rng([seed, 7]).choice(n, size=k, replace=False)] = True
    return mask


def convert(fmt: str, src: str | Path, out: str | Path, shards: int = 4, val_shards: int = 1,
            val_fraction: float | None = None, seed: int = 0, chunk_samples: int = DEFAULT_CHUNK,
            compression: str = "none", x_dtype: str = "uint8", progress=print) -> Path:
    if fmt not in SOURCES:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if shards < 1 or val_shards < 1:
        raise UserError("--shards and --val-shards must be >= 1")
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if x_dtype not in X_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(X_DTYPES)}, got {x_dtype!r}")
    if chunk_samples <= 0:
        raise UserError(f"--chunk-samples must be > 0, got {chunk_samples}")
    parse_compression(compression)
    source = SOURCES[fmt](Path(src))
    out = prepare_out_dir(Path(out))
    t0 = time.perf_counter()
    train = source.splits["train"]
    test = source.splits.get("test")
    if test is not None and val_fraction:
        progress(f"{src} has its own test split; it becomes the validation split (--val-fraction ignored)")
    fraction = 0.0 if test is not None else (0.1 if val_fraction is None else val_fraction)
    held = holdout_mask(len(train.labels), fraction, seed)
    n_train = int((~held).sum())
    n_val = len(test.labels) if test is not None else int(held.sum())
    if n_train == 0:
        raise UserError(f"{src}: no training samples left after holding out the validation split")
    args = (source.shape, source.num_classes, chunk_samples, compression, x_dtype, progress)
    sinks = {"train": SplitWriter(out, "train", n_train, shards, *args)}
    if n_val:
        sinks["val"] = SplitWriter(out, "val", n_val, val_shards, *args)

    def cast(x):
        return x if x_dtype == "uint8" else (x / np.float32(255)).astype(x_dtype)

    try:
        pos = 0
        for block in train.open_images():
            m = held[pos:pos + len(block)]
            ys = train.labels[pos:pos + len(block)]
            sinks["train"].write(cast(block[~m]), ys[~m])
            if m.any():
                sinks["val"].write(cast(block[m]), ys[m])
            pos += len(block)
        if test is not None:
            pos = 0
            for block in test.open_images():
                sinks["val"].write(cast(block), test.labels[pos:pos + len(block)])
                pos += len(block)
        written = {name: sink.close() for name, sink in sinks.items()}
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    path = write_manifest(out, source.shape, source.num_classes, written, x_dtype, chunk_samples, compression,
                          source=f"convert:{fmt}", converted_from=str(Path(src).resolve()))
    mb = sum(i.bytes for infos in written.values() for i in infos) / 2**20
    progress(f"wrote {path}: train={n_train} val={n_val} ({mb:.0f} MiB) in {time.perf_counter() - t0:.1f}s")
    return path


# --- the command line (pipeline/cli.py dispatches) ---

def add_arguments(p) -> None:
    from pipeline.data.synth import writer_arguments

    p.add_argument("--format", required=True, choices=["npz", "idx", "cifar10"])
    p.add_argument("--src", required=True, help="npz file; IDX directory; CIFAR-10 directory or .tar.gz")
    p.add_argument("--out", required=True, help="dataset directory to create")
    p.add_argument("--shards", type=int, default=4, help="training shards (default 4)")
    p.add_argument("--val-shards", type=int, default=1, help="validation shards (default 1)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="hold out this fraction of training samples when the source has no test split (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hold-out draw")
    writer_arguments(p)
    p.set_defaults(func=cli)


def cli(a) -> int:
    convert(a.format, a.src, a.out, shards=a.shards, val_shards=a.val_shards, val_fraction=a.val_fraction,
            seed=a.seed, chunk_samples=a.chunk_samples, compression=a.compression, x_dtype=a.dtype)
    return 0
