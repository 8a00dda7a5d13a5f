"""The shard format and its manifest (see docs/data-format.md).

A dataset directory holds HDF5 shards, each with datasets ``x`` (N, H, W, C) and ``y``
(N,) chunked along the sample axis, and ``manifest.json`` listing every shard with its
sample count, size in bytes and sha256. Shards and the manifest are written under a
temporary name and renamed when complete, so a reader never sees half a file.

An indexed dataset (`pipeline data index`, pipeline/data/index.py) has only the manifest:
it lists the user's own files where they are, relative to a root, with the layout of
their samples (pipeline/data/layout.py). Everything downstream reads both kinds alike.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import h5py
import numpy as np

from pipeline.data.layout import Layout
from pipeline.errors import UserError
from pipeline.fsutil import atomic_write_text, fsync_path, temp_name

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
X_DTYPES = ("uint8", "float16", "float32")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
DEFAULT_CHUNK = 256
INDEXED = "indexed"


@dataclass(frozen=True)
class ShardInfo:
    file: str
    num_samples: int
    sha256: str
    bytes: int | None = None  # None in manifests written before the field existed


@dataclass(frozen=True)
class Manifest:
    dir: Path
    shape: tuple[int, ...]            # one sample's x
    num_classes: int | None           # None: the targets are values, not class ids
    x_dtype: str
    y_dtype: str
    splits: dict[str, tuple[ShardInfo, ...]]
    raw: dict
    y_shape: tuple[int, ...] = ()     # one sample's y: () for a class id
    layout: Layout = Layout()
    root: Path | None = None          # where the files are (indexed datasets); None: dir

    @property
    def indexed(self) -> bool:
        return self.raw.get("kind") == INDEXED

    def shards(self, split: str) -> tuple[ShardInfo, ...]:
        return self.splits.get(split, ())

    def num_samples(self, split: str) -> int:
        return sum(s.num_samples for s in self.shards(split))

    def path(self, shard: ShardInfo) -> Path:
        return (self.root or self.dir) / shard.file

    @property
    def sample_bytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.x_dtype).itemsize

    @property
    def target_bytes(self) -> int:
        return int(np.prod(self.y_shape)) * np.dtype(self.y_dtype).itemsize

    @property
    def chunk_samples(self) -> int:
        return int(self.raw.get("chunk_samples", DEFAULT_CHUNK))


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.h5"


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def open_shard(path: Path) -> h5py.File:
    """Opens a shard read-only with HDF5 file locking off: shared file systems refuse locks."""
    return h5py.File(path, "r", locking=False)


def parse_compression(text: str) -> tuple[str | None, int | None]:
    """'none' | 'lzf' | 'gzip' | 'gzip:LEVEL' -> h5py's (compression, compression_opts)."""
    name, _, level = text.partition(":")
    if name == "none" and not level:
        return None, None
    if name == "lzf" and not level:
        return "lzf", None
    if name == "gzip":
        if not level:
            return "gzip", 4
        if level.isdigit() and 0 <= int(level) <= 9:
            return "gzip", int(level)
    raise UserError(f"--compression must be none, lzf, gzip or gzip:0-9, got {text!r}")


class ShardWriter:
    """Writes one shard from batches of samples, so memory stays bounded by one batch."""

    def __init__(self, path: Path, num_samples: int, shape: tuple[int, ...], num_classes: int,
                 split: str, chunk_samples: int = DEFAULT_CHUNK, compression: str = "none",
                 x_dtype: str = "uint8"):
        self.path = Path(path)
        self.tmp = temp_name(self.path)
        self.num_samples = num_samples
        self._pos = 0
        comp, level = parse_compression(compression)
        self._f = h5py.File(self.tmp, "w")
        chunk = max(1, min(chunk_samples, num_samples))
        self._x = self._f.create_dataset("x", shape=(num_samples, *shape), dtype=x_dtype,
                                         chunks=(chunk, *shape), compression=comp, compression_opts=level)
        self._y = self._f.create_dataset("y", shape=(num_samples,), dtype="int32",
                                         chunks=(max(1, min(65536, num_samples)),), compression=comp,
                                         compression_opts=level)
        self._f.attrs.update(schema_version=SCHEMA_VERSION, num_samples=num_samples,
                             num_classes=num_classes, split=split)

    def write(self, x: np.ndarray, y: np.ndarray) -> None:
        n = len(x)
        if self._pos + n > self.num_samples:
            raise RuntimeError(f"{self.path}: more than the {self.num_samples} samples planned")
        self._x[self._pos:self._pos + n] = x
        self._y[self._pos:self._pos + n] = y
        self._pos += n

    def close(self) -> ShardInfo:
        if self._pos != self.num_samples:
            raise RuntimeError(f"{self.path}: wrote {self._pos} of {self.num_samples} samples")
        self._f.close()
        fsync_path(self.tmp)
        digest = sha256_file(self.tmp)
        size = self.tmp.stat().st_size
        os.replace(self.tmp, self.path)
        return ShardInfo(self.path.name, self.num_samples, digest, size)

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def write_manifest(out: Path, shape: tuple[int, ...], num_classes: int | None,
                   splits: dict[str, Iterable[ShardInfo]], x_dtype: str = "uint8",
                   chunk_samples: int = DEFAULT_CHUNK, compression: str = "none", y_dtype: str = "int32",
                   **extra) -> Path:
    """manifest.json, written atomically: the shards' (or indexed files') splits and facts."""
    doc = {
        "schema_version": SCHEMA_VERSION,
        "shape": list(shape),
        "num_classes": num_classes,
        "x_dtype": x_dtype,
        "y_dtype": y_dtype,
        "chunk_samples": chunk_samples,
        "compression": compression,
        "splits": {
            name: {
                "num_samples": sum(s.num_samples for s in shards),
                "shards": [s.__dict__ for s in shards],
            }
            for name, shards in ((n, list(s)) for n, s in splits.items())
        },
        **extra,
    }
    path = Path(out) / MANIFEST
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    return path


def prepare_out_dir(out: Path) -> Path:
    """The directory a new dataset is written to; refuses to mix with an existing dataset."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if (out / MANIFEST).exists():
        raise UserError(f"{out}: already holds a dataset (manifest.json); choose another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_manifest(data_dir: str | Path, root: str | Path | None = None) -> Manifest:
    """Reads and checks the manifest's structure; names the file and the problem on error.
    `root`: where an indexed dataset's files are now (data.root), instead of where they were."""
    d = Path(data_dir)
    if not d.exists():
        raise UserError(f"{d}: data directory not found (make one with: pipeline data synth --out {d})")
    if not d.is_dir():
        raise UserError(f"{d}: not a directory")
    path = d / MANIFEST
    if not path.exists():
        hint = "directory is empty" if not any(d.iterdir()) else "no manifest.json"
        raise UserError(f"{path}: manifest missing ({hint}; make a dataset with: pipeline data synth --out {d})")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: manifest is not valid JSON ({e.__class__.__name__} at {getattr(e, 'pos', '?')})") from None
    try:
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"{path}: schema_version {raw.get('schema_version')!r} is not {SCHEMA_VERSION}")
        splits = {}
        for name, split in raw["splits"].items():
            shards = tuple(ShardInfo(str(s["file"]), int(s["num_samples"]), str(s["sha256"]),
                                     int(s["bytes"]) if s.get("bytes") is not None else None)
                           for s in split["shards"])
            if sum(s.num_samples for s in shards) != int(split["num_samples"]):
                raise UserError(f"{path}: split {name!r} num_samples does not equal the sum of its shards")
            splits[name] = shards
        indexed = raw.get("kind") == INDEXED
        if indexed:
            base = Path(root) if root else Path(raw["root"])
            if not base.is_absolute():
                base = d / base
        elif root:
            raise UserError(f"data.root={root}: {path} is not an indexed dataset; data.root applies to "
                            f"datasets made by pipeline data index")
        m = Manifest(d, tuple(int(v) for v in raw["shape"]),
                     int(raw["num_classes"]) if raw.get("num_classes") is not None else None,
                     str(raw["x_dtype"]), str(raw["y_dtype"]), splits, raw,
                     tuple(int(v) for v in raw.get("y_shape", ())), Layout.from_dict(raw.get("layout")),
                     base if indexed else None)
        if not indexed and m.x_dtype not in X_DTYPES:
            raise UserError(f"{path}: x_dtype {m.x_dtype!r} is not one of {', '.join(X_DTYPES)}")
        np.dtype(m.x_dtype), np.dtype(m.y_dtype)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: manifest is malformed (missing or bad field {e})") from None
    if "train" not in m.splits or m.num_samples("train") == 0:
        raise UserError(f"{path}: manifest lists no training samples")
    return m


def check_exist(m: Manifest, splits: Iterable[str] = SPLITS) -> None:
    """The cheapest check, one stat per shard, run by every rank before joining the job."""
    what = "file" if m.indexed else "shard"
    for split in splits:
        for s in m.shards(split):
            p = m.path(s)
            if not p.exists():
                hint = " (moved? data.root says where the files are now)" if m.indexed else ""
                raise UserError(f"{p}: {what} listed in {m.dir / MANIFEST} is missing{hint}")
            size = p.stat().st_size
            if size == 0:
                raise UserError(f"{p}: {what} is empty (0 bytes)")
            if m.indexed and s.bytes is not None and size != s.bytes:
                raise UserError(f"{p}: size changed since indexing ({size} bytes, {s.bytes} when indexed); "
                                f"index it again: pipeline data index")


def _check_shard(m: Manifest, s: ShardInfo, checksums: bool) -> str | None:
    """The first problem of one shard (or indexed file), as a line naming the file; None if it
    matches the manifest."""
    p = m.path(s)
    if not p.exists():
        return f"{p}: {'file' if m.indexed else 'shard'} listed in the manifest is missing"
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(len(HDF5_SIGNATURE))
    if head != HDF5_SIGNATURE:
        return f"{p}: not an HDF5 file (no HDF5 signature)"
    if s.bytes is not None and size != s.bytes:
        if m.indexed:
            return f"{p}: size changed since indexing ({size} bytes, {s.bytes} when indexed)"
        kind = "truncated" if size < s.bytes else "longer than written"
        return f"{p}: {kind}: {size} bytes, manifest says {s.bytes}"
    try:
        with open_shard(p) as f:
            problem = _check_content(m, s, f, p, deep=checksums)
            if problem:
                return problem
    except OSError as e:
        first = str(e).splitlines()[0]
        if "truncated" in first:
            return f"{p}: truncated ({first})"
        return f"{p}: cannot be read as HDF5 ({first})"
    if checksums and s.sha256 and sha256_file(p) != s.sha256:
        return f"{p}: sha256 does not match the manifest"
    return None


def _check_content(m: Manifest, s: ShardInfo, f, p: Path, deep: bool = True) -> str | None:
    """Keys, shapes, dtypes and counts; class ids in range too, except in the fast checks of an
    indexed dataset, where that would read every label of files the user already has (a
    per-pixel label set is as large as its images): `pipeline data verify` does it."""
    lay = m.layout
    for key in (lay.x_key, lay.y_key):
        if key not in f or not isinstance(f[key], h5py.Dataset):
            return f"{p}: missing dataset {key!r}"
    x, y = f[lay.x_key], f[lay.y_key]
    if lay.subvolume and tuple(x.shape) != lay.file_shape:
        return f"{p}: {lay.x_key} has shape {tuple(x.shape)}, manifest says {lay.file_shape}"
    if lay.sample_shape(x.shape) != m.shape:
        return f"{p}: {lay.x_key} has sample shape {lay.sample_shape(x.shape)}, manifest says {m.shape}"
    if x.dtype.name != np.dtype(m.x_dtype).name:
        return f"{p}: {lay.x_key} has dtype {x.dtype}, manifest says {m.x_dtype}"
    if y.dtype.name != np.dtype(m.y_dtype).name:
        return f"{p}: {lay.y_key} has dtype {y.dtype}, manifest says {m.y_dtype}"
    if lay.target_shape(y.shape) != m.y_shape or (lay.per_file == "many" and not lay.subvolume
                                                  and len(x) != len(y)):
        return f"{p}: x has {len(x)} samples but y has shape {y.shape}"
    n = lay.samples_in_file(x.shape)
    if n != s.num_samples:
        return f"{p}: has {n} samples, manifest says {s.num_samples}"
    if m.num_classes is not None and (deep or not m.indexed):
        step = 1 << 20
        flat = y if y.ndim else y[()].reshape(1)
        for start in range(0, max(1, len(flat)), step):
            labels = np.asarray(flat[start:start + step])
            if labels.size == 0:
                continue
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= m.num_classes:
                bad = lo if lo < 0 else hi
                return f"{p}: label {bad} out of range [0, {m.num_classes})"
    return None


def check_one(m: Manifest, s: ShardInfo) -> str | None:
    """The fast checks (no checksum) of one shard or indexed file: None when it matches."""
    return _check_shard(m, s, checksums=False)


def verify(m: Manifest, checksums: bool = True, splits: Iterable[str] | None = None) -> Iterator[str]:
    """Checks every shard against the manifest; yields one line per bad shard."""
    for split in (m.splits if splits is None else splits):
        for s in m.shards(split):
            problem = _check_shard(m, s, checksums)
            if problem:
                yield problem


class SplitWriter:
    """Streams one split's samples into its K shards in order, a shard at a time."""

    def __init__(self, out: Path, split: str, total: int, shards: int, shape: tuple[int, ...],
                 num_classes: int, chunk_samples: int = DEFAULT_CHUNK, compression: str = "none",
                 x_dtype: str = "uint8", progress=print):
        self.out, self.split, self.total = Path(out), split, total
        self.count = max(1, min(shards, total))
        self.sizes = split_counts(total, self.count)
        self._args = (shape, num_classes, split, chunk_samples, compression, x_dtype)
        self._progress = progress
        self._index = -1
        self._writer: ShardWriter | None = None
        self._left = 0
        self.infos: list[ShardInfo] = []

    def _next(self) -> None:
        if self._writer is not None:
            self.infos.append(self._writer.close())
            self._progress(f"wrote {self.out / self.infos[-1].file} ({self.infos[-1].num_samples} samples)")
        self._index += 1
        self._writer = None
        if self._index < self.count:
            name = shard_name(self.split, self._index, self.count)
            self._writer = ShardWriter(self.out / name, self.sizes[self._index], *self._args)
            self._left = self.sizes[self._index]

    def write(self, x: np.ndarray, y: np.ndarray) -> None:
        pos = 0
        while pos < len(x):
            if self._writer is None or self._left == 0:
                self._next()
                if self._writer is None:
                    raise RuntimeError(f"{self.split}: more than the {self.total} samples planned")
            n = min(self._left, len(x) - pos)
            self._writer.write(x[pos:pos + n], y[pos:pos + n])
            self._left -= n
            pos += n

    def close(self) -> list[ShardInfo]:
        while self._index < self.count:
            if self._writer is not None and self._left:
                raise RuntimeError(f"{self.split}: {self._left} samples short of the planned {self.total}")
            self._next()
        return self.infos

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        for info in self.infos:
            (self.out / info.file).unlink(missing_ok=True)


def split_counts(total: int, shards: int) -> list[int]:
    """Sample counts per shard, as equal as possible (the first ones take the remainder)."""
    base, extra = divmod(total, shards)
    return [base + (i < extra) for i in range(shards)]


# --- the command line (pipeline/cli.py dispatches) ---

def verify_arguments(p) -> None:
    from pipeline import config

    p.add_argument("dir")
    p.add_argument("--fast", action="store_true", help="skip the sha256 checksums")
    config.flag(p, "--root", "data.root")
    p.set_defaults(func=verify_cli)


def verify_cli(a) -> int:
    """pipeline data verify: one line per problem and exit 2, or one line saying all match."""
    import sys

    from pipeline.errors import EXIT_USER_ERROR

    m = load_manifest(a.dir, a.root or None)
    problems = list(verify(m, checksums=not a.fast))
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        return EXIT_USER_ERROR
    n = sum(len(m.shards(s)) for s in m.splits)
    counts = ", ".join(f"{s}={m.num_samples(s)}" for s in m.splits)
    print(f"{m.dir}: {n} {'files' if m.indexed else 'shards'} match the manifest ({counts})")
    return 0
