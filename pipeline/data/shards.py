"""The shard format and its manifest (see docs/data-format.md).

A dataset directory holds HDF5 shards, each with datasets ``x`` (N, H, W, C) and ``y``
(N,) chunked along the sample axis, and ``manifest.json`` listing every shard with its
sample count and sha256. Shards and the manifest are written under a temporary name and
renamed when complete, so a reader never sees half a file.
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

from ..errors import UserError
from ..fsutil import atomic_write_text, fsync_path, temp_name

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ShardInfo:
    file: str
    num_samples: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    dir: Path
    shape: tuple[int, ...]
    num_classes: int
    x_dtype: str
    y_dtype: str
    splits: dict[str, tuple[ShardInfo, ...]]
    raw: dict

    def shards(self, split: str) -> tuple[ShardInfo, ...]:
        return self.splits.get(split, ())

    def num_samples(self, split: str) -> int:
        return sum(s.num_samples for s in self.shards(split))

    def path(self, shard: ShardInfo) -> Path:
        return self.dir / shard.file


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


class ShardWriter:
    """Writes one shard from batches of samples, so memory stays bounded by one batch."""

    def __init__(self, path: Path, num_samples: int, shape: tuple[int, ...], num_classes: int,
                 split: str, chunk_samples: int = 256, compression: str | None = None):
        self.path = Path(path)
        self.tmp = temp_name(self.path)
        self.num_samples = num_samples
        self._pos = 0
        self._f = h5py.File(self.tmp, "w")
        chunk = max(1, min(chunk_samples, num_samples))
        self._x = self._f.create_dataset("x", shape=(num_samples, *shape), dtype="uint8",
                                         chunks=(chunk, *shape), compression=compression)
        self._y = self._f.create_dataset("y", shape=(num_samples,), dtype="int32",
                                         chunks=(max(1, min(4096, num_samples)),), compression=compression)
        self._f.attrs.update(schema_version=SCHEMA_VERSION, num_samples=num_samples,
                             num_classes=num_classes, split=split)

    def write(self, x: np.ndarray, y: np.ndarray) -> None:
        n = len(x)
        self._x[self._pos:self._pos + n] = x
        self._y[self._pos:self._pos + n] = y
        self._pos += n

    def close(self) -> ShardInfo:
        if self._pos != self.num_samples:
            raise RuntimeError(f"{self.path}: wrote {self._pos} of {self.num_samples} samples")
        self._f.close()
        fsync_path(self.tmp)
        digest = sha256_file(self.tmp)
        os.replace(self.tmp, self.path)
        return ShardInfo(self.path.name, self.num_samples, digest)

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def write_manifest(out: Path, shape: tuple[int, ...], num_classes: int,
                   splits: dict[str, Iterable[ShardInfo]], **extra) -> Path:
    doc = {
        "schema_version": SCHEMA_VERSION,
        "shape": list(shape),
        "num_classes": num_classes,
        "x_dtype": "uint8",
        "y_dtype": "int32",
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


def load_manifest(data_dir: str | Path) -> Manifest:
    """Reads and checks the manifest's structure; names the file and the problem on error."""
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
            shards = tuple(ShardInfo(str(s["file"]), int(s["num_samples"]), str(s["sha256"])) for s in split["shards"])
            if sum(s.num_samples for s in shards) != int(split["num_samples"]):
                raise UserError(f"{path}: split {name!r} num_samples does not equal the sum of its shards")
            splits[name] = shards
        m = Manifest(d, tuple(int(v) for v in raw["shape"]), int(raw["num_classes"]),
                     str(raw["x_dtype"]), str(raw["y_dtype"]), splits, raw)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: manifest is malformed (missing or bad field {e})") from None
    if "train" not in m.splits or m.num_samples("train") == 0:
        raise UserError(f"{path}: manifest lists no training samples")
    return m


def check_fast(m: Manifest, splits: Iterable[str] = SPLITS) -> None:
    """Cheap checks before any rank reads: every listed shard exists and is not empty."""
    for split in splits:
        for s in m.shards(split):
            p = m.path(s)
            if not p.exists():
                raise UserError(f"{p}: shard listed in {m.dir / MANIFEST} is missing")
            if p.stat().st_size == 0:
                raise UserError(f"{p}: shard is empty (0 bytes)")


def verify(m: Manifest, checksums: bool = True) -> Iterator[str]:
    """Full check of every shard against the manifest; yields one line per problem found."""
    for split in m.splits:
        for s in m.shards(split):
            p = m.path(s)
            if not p.exists():
                yield f"{p}: shard listed in the manifest is missing"
                continue
            try:
                with open_shard(p) as f:
                    if "x" not in f or "y" not in f:
                        yield f"{p}: missing dataset {'x' if 'x' not in f else 'y'}"
                        continue
                    x, y = f["x"], f["y"]
                    if tuple(x.shape[1:]) != m.shape:
                        yield f"{p}: x has sample shape {tuple(x.shape[1:])}, manifest says {m.shape}"
                    if x.dtype != np.dtype(m.x_dtype) or y.dtype != np.dtype(m.y_dtype):
                        yield f"{p}: dtypes x={x.dtype} y={y.dtype}, manifest says x={m.x_dtype} y={m.y_dtype}"
                    if len(x) != len(y):
                        yield f"{p}: x has {len(x)} samples but y has {len(y)}"
                    if len(x) != s.num_samples:
                        yield f"{p}: has {len(x)} samples, manifest says {s.num_samples}"
                    labels = y[:]
                    if len(labels) and (labels.min() < 0 or labels.max() >= m.num_classes):
                        yield f"{p}: label out of range [0, {m.num_classes}): min {labels.min()} max {labels.max()}"
            except OSError as e:
                yield f"{p}: cannot be read as HDF5 ({str(e).splitlines()[0]})"
                continue
            if checksums and sha256_file(p) != s.sha256:
                yield f"{p}: sha256 does not match the manifest"
