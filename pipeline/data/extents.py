"""The extents sidecar (`extents.npz` beside an index's manifest): where each file's sample
bytes lie, so the reader reads with `pread` from the first epoch without opening any file
with h5py.

`pipeline data index` opens every file anyway to check it; while it is open it records, for
x and y, the map pipeline/data/direct.py would build (the data's offset, or its chunk table),
with the file's size and modification time. The reader uses a file's record only while the
file still has that size and mtime (checked once per file, when it is first read); a file
that changed, or a dataset only h5py can read, goes through h5py as without a sidecar. A
staged copy keeps the source's size and mtime (pipeline/data/stage.py), so the sidecar holds
for it too. An index without a sidecar reads as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data import direct

NAME = "extents.npz"
ROLES = ("x", "y")


@dataclass
class FileExtents:
    size: int
    mtime_ns: int
    records: tuple  # per role: (kind, a, arr, sizes) as direct.record_of gives


def write(out: Path, files: list[str], entries: list[FileExtents]) -> Path:
    """The sidecar for `files` (paths relative to the index's root), written under a temporary
    name and renamed: a reader never sees half of one."""
    arrays: dict[str, np.ndarray] = {"files": np.array(files, dtype=np.str_),
                                     "size": np.array([e.size for e in entries], np.int64),
                                     "mtime_ns": np.array([e.mtime_ns for e in entries], np.int64)}
    for i, role in enumerate(ROLES):
        kinds, heads, bounds, values, sizes = [], [], [0], [], []
        for e in entries:
            kind, a, arr, sz = e.records[i]
            kinds.append(kind)
            heads.append(a)
            values.append(np.asarray(arr, np.int64))
            sizes.append(np.asarray(sz, np.int64) if len(sz) else np.zeros(len(arr), np.int64))
            bounds.append(bounds[-1] + len(arr))
        arrays[f"{role}_kind"] = np.array(kinds, np.int8)
        arrays[f"{role}_a"] = np.array(heads, np.int64)
        arrays[f"{role}_bounds"] = np.array(bounds, np.int64)
        arrays[f"{role}_values"] = np.concatenate(values) if values else np.zeros(0, np.int64)
        arrays[f"{role}_sizes"] = np.concatenate(sizes) if sizes else np.zeros(0, np.int64)
    path = Path(out) / NAME
    tmp = path.with_name(f".{NAME}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


class Sidecar:
    """An index's sidecar, read once; `maps(file, path, ...)` gives a file's (x, y) maps when
    the file at `path` still has the recorded size and mtime, else None."""

    def __init__(self, path: Path):
        with np.load(path, allow_pickle=False) as z:
            self._a = {k: z[k] for k in z.files}
        self._row = {str(f): i for i, f in enumerate(self._a["files"])}

    def __contains__(self, file: str) -> bool:
        return file in self._row

    def current(self, file: str, path: Path) -> bool:
        """The file at `path` still has the size and mtime recorded for `file`."""
        i = self._row.get(file)
        if i is None:
            return False
        try:
            st = os.stat(path)
        except OSError:
            return False
        return st.st_size == int(self._a["size"][i]) and st.st_mtime_ns == int(self._a["mtime_ns"][i])

    def maps(self, file: str, m) -> tuple:
        """(x map, y map) from the record of `file` (None for a dataset only h5py can read)."""
        i = self._row[file]
        out = []
        for role, sample_bytes, dtype, shape in (("x", m.sample_bytes, np.dtype(m.x_dtype), m.shape),
                                                 ("y", m.target_bytes, np.dtype(m.y_dtype), m.y_shape)):
            lo, hi = self._a[f"{role}_bounds"][i:i + 2]
            out.append(direct.from_record(int(self._a[f"{role}_kind"][i]), int(self._a[f"{role}_a"][i]),
                                          self._a[f"{role}_values"][lo:hi], self._a[f"{role}_sizes"][lo:hi],
                                          sample_bytes, dtype, m.layout, shape))
        return tuple(out)


def load(m) -> Sidecar | None:
    """The sidecar of manifest `m`, or None (none written, or unreadable: read as without)."""
    path = Path(m.dir) / NAME
    if not m.indexed or not path.exists():
        return None
    try:
        return Sidecar(path)
    except (OSError, ValueError, KeyError):
        return None


def entry(path: Path, maps: tuple) -> FileExtents:
    st = os.stat(path)
    return FileExtents(st.st_size, st.st_mtime_ns, tuple(direct.record_of(cmap) for cmap in maps))
