"""Small datasets in two public scientific layouts, to be indexed like a user's own files
(`pipeline data synth --kind cosmoflow|segmentation`, then `pipeline data index`).

- cosmoflow: one universe per file, as MLPerf HPC CosmoFlow's raw files: `full` is
  (D, D, D, 4) int16 particle counts at four "redshifts", `unitPar` the (4,) float32 target in
  [-1, 1]. Each parameter sets one statistic of the counts, so the target is determined by
  the input: p0 the mean density, p1 the contrast of the log-normal field, p2 how the
  contrast grows across the four channels, p3 how the density does.
- segmentation: one sample per file, as MLPerf HPC DeepCAM's: `climate/data` (H, W, C)
  float32 channels on very different scales (so standardizing matters) and
  `climate/labels_0` (H, W) int32 class ids 0-2: class 1 where a smooth field the first
  channel sees is high, class 2 where a second field the second channel sees is high.

Every file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import UserError
from pipeline.fsutil import temp_name

KINDS = ("cosmoflow", "segmentation")


def _smooth_field(shape: tuple[int, ...], width: float, rng: np.random.Generator) -> np.ndarray:
    """A zero-mean, unit-variance Gaussian random field with correlation length ~ width (periodic)."""
    noise = rng.standard_normal(shape)
    k = np.meshgrid(*[np.fft.fftfreq(n) for n in shape], indexing="ij")
    kernel = np.exp(-2 * (np.pi * width) ** 2 * sum(ki ** 2 for ki in k))
    field = np.real(np.fft.ifftn(np.fft.fftn(noise) * kernel))
    return (field - field.mean()) / (field.std() + 1e-12)


def universe(side: int, params: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(side, side, side, 4) int16 counts whose statistics follow `params` (4 values in [-1, 1])."""
    p0, p1, p2, p3 = params
    g = _smooth_field((side,) * 3, 1.5, rng)
    n0 = 4.0 * np.exp(0.8 * p0)
    out = np.empty((side, side, side, 4), np.int16)
    for c in range(4):
        sigma = (0.55 + 0.3 * p1) * (1 + 0.25 * c * p2)
        rate = n0 * np.exp(0.3 * c * p3) * np.exp(sigma * g - sigma ** 2 / 2)
        out[..., c] = np.minimum(rng.poisson(rate), np.iinfo(np.int16).max)
    return out


def climate(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w, c = shape
    f1, f2 = _smooth_field((h, w), 3.0, rng), _smooth_field((h, w), 3.0, rng)
    labels = np.zeros((h, w), np.int32)
    labels[f1 > 0.8] = 1
    labels[f2 > 0.8] = 2
    x = np.empty((h, w, c), np.float32)
    scales = [(250.0, 10.0), (-3.0, 0.01), (1000.0, 100.0), (0.0, 1.0)]
    for ch in range(c):
        mean, scale = scales[ch % 4]
        signal = (f1 if ch % 4 == 0 else f2 if ch % 4 == 1 else f1 * f2 if ch % 4 == 3 else 0.0)
        x[..., ch] = mean + scale * (signal + 0.3 * rng.standard_normal((h, w)))
    return x, labels


def _write(path: Path, datasets: dict[str, np.ndarray]) -> None:
    tmp = temp_name(path)
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in datasets.items():
                f.create_dataset(key, data=value)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def synth_layout(kind: str, out: str | Path, files: int | None = None, shape: tuple[int, ...] | None = None,
                 seed: int = 0, progress=print) -> Path:
    if kind not in KINDS:
        raise UserError(f"--kind must be one of images, {', '.join(KINDS)}, got {kind!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty directory; choose another --out")
    t0 = time.perf_counter()
    if kind == "cosmoflow":
        files = files or 64
        side = shape[0] if shape else 32
        if side < 8:
            raise UserError(f"--shape for cosmoflow is the volume's side D (>= 8), got {side}")
        out.mkdir(parents=True, exist_ok=True)
        for i in range(files):
            rng = np.random.default_rng([seed, i])
            params = rng.uniform(-1, 1, 4).astype(np.float32)
            _write(out / f"univ-{i:05d}.h5", {"full": universe(side, params, rng), "unitPar": params})
        what = f"{files} universes of {side}^3 x 4 int16 counts (full) with unitPar (4,) float32"
    else:
        files = files or 240
        hwc = tuple(shape) if shape and len(shape) == 3 else (64, 64, 4)
        if min(hwc[:2]) < 16:
            raise UserError(f"--shape for segmentation is H,W,C with H and W >= 16, got {hwc}")
        out.mkdir(parents=True, exist_ok=True)
        for i in range(files):
            x, labels = climate(hwc, np.random.default_rng([seed, i]))
            _write(out / f"data-{i:05d}.h5", {"climate/data": x, "climate/labels_0": labels})
        what = f"{files} samples of {hwc} float32 (climate/data) with per-pixel labels (climate/labels_0)"
    progress(f"wrote {what} to {out} in {time.perf_counter() - t0:.1f}s")
    return out
