"""Where a dataset's samples sit inside its HDF5 files.

- `many` (the pipeline's own shards, and the common case of users' files): axis 0 of the x
  and y datasets is the sample axis; sample j is x[j], y[j].
- `one`: each file is one sample: x and y are the whole datasets (DeepCAM's layout).
- `subvolume S`: each S-cube (3 spatial axes) or S-square (2) of a file's x is one sample,
  all with the file's y (CosmoFlow's preparation), read as a hyperslab: nothing is copied.

Dataset keys may be nested paths (`climate/data`). Files are only ever opened read-only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PER_FILE = ("many", "one")


@dataclass(frozen=True)
class Layout:
    x_key: str = "x"
    y_key: str = "y"
    per_file: str = "many"
    subvolume: int | None = None
    file_shape: tuple[int, ...] | None = None  # x's shape in every file (subvolume layouts)

    @property
    def grid(self) -> tuple[int, ...]:
        """Sub-volumes along each spatial axis (the remainder of an axis is left out)."""
        return tuple(d // self.subvolume for d in self.file_shape[:-1])

    def samples_in_file(self, x_shape: tuple[int, ...]) -> int:
        if self.subvolume:
            return math.prod(d // self.subvolume for d in x_shape[:-1])
        return 1 if self.per_file == "one" else int(x_shape[0])

    def sample_shape(self, x_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.subvolume:
            return (self.subvolume,) * (len(x_shape) - 1) + (x_shape[-1],)
        return tuple(x_shape) if self.per_file == "one" else tuple(x_shape[1:])

    def target_shape(self, y_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(y_shape) if self.per_file == "one" or self.subvolume else tuple(y_shape[1:])

    def cube(self, j: int) -> tuple:
        """The hyperslab of sub-volume j (C order over the grid), all channels."""
        s = self.subvolume
        corner = np.unravel_index(j, self.grid)
        return tuple(slice(int(c) * s, (int(c) + 1) * s) for c in corner) + (slice(None),)

    def read_x(self, f, start: int, stop: int, out: np.ndarray) -> None:
        """Samples [start, stop) of this file's x into `out` (C-contiguous, one sample per row)."""
        x = f[self.x_key]
        if self.subvolume:
            for k, j in enumerate(range(start, stop)):
                x.read_direct(out[k], source_sel=self.cube(j))
        elif self.per_file == "one":
            x.read_direct(out[0])
        else:
            x.read_direct(out, np.s_[start:stop], np.s_[0:stop - start])

    def read_y(self, f, start: int, stop: int, out: np.ndarray) -> None:
        y = f[self.y_key]
        if self.subvolume or self.per_file == "one":
            out[:stop - start] = y[()]
        else:
            y.read_direct(out, np.s_[start:stop], np.s_[0:stop - start])

    def as_dict(self) -> dict:
        return {"x_key": self.x_key, "y_key": self.y_key, "per_file": self.per_file, "subvolume": self.subvolume,
                "file_shape": list(self.file_shape) if self.file_shape else None}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Layout":
        if not d:
            return cls()
        return cls(str(d.get("x_key", "x")), str(d.get("y_key", "y")), str(d.get("per_file", "many")),
                   int(d["subvolume"]) if d.get("subvolume") else None,
                   tuple(int(v) for v in d["file_shape"]) if d.get("file_shape") else None)
