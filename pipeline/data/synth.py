"""A learnable synthetic image-classification (or tabular, shape F,) dataset, as HDF5 shards.

Each class has a prototype made of a few random strokes and blobs. A sample is its class
prototype shifted by a few pixels, with random contrast, a distractor blob and pixel noise,
stored as uint8. A small CNN separates the classes well above 90% in one epoch, while a
model that ignores the image stays at chance; it is a stand-in with MNIST's shape.
"""

from __future__ import annotations

import time
from pathlib import Path

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

MAX_SHIFT = 3


def _blob(h: int, w: int, cy: float, cx: float, sigma: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))


def _stroke(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    img = np.zeros((h, w))
    (y0, x0), (y1, x1) = rng.uniform(4, [h - 4, w - 4], size=(2, 2))
    for t in np.linspace(0, 1, 24):
        img = np.maximum(img, _blob(h, w, y0 + t * (y1 - y0), x0 + t * (x1 - x0), 1.2))
    return img


def prototypes(num_classes: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """One float image in [0, 1] per class, fixed by the seed."""
    h, w, c = shape
    rng = np.random.default_rng([seed, 0])
    protos = np.zeros((num_classes, h, w, c))
    for k in range(num_classes):
        for ch in range(c):
            img = sum(_stroke(h, w, rng) for _ in range(2))
            img = img + _blob(h, w, *rng.uniform(5, [h - 5, w - 5]), rng.uniform(1.5, 3.0))
            protos[k, :, :, ch] = img / img.max()
    return protos


def tabular_prototypes(num_classes: int, features: int, seed: int) -> np.ndarray:
    """Tabular data (shape F,): each class a random profile of F features in [0, 1]."""
    # Profiles close together under heavy noise: no single feature separates the classes.
    return 0.5 + 0.07 * np.random.default_rng([seed, 0]).standard_normal((num_classes, features))


def samples(protos: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n noisy, shifted copies of random prototypes as (uint8 images, int32 labels); for
    tabular prototypes, the class profile plus heavy per-feature noise."""
    if protos.ndim == 2:
        labels = rng.integers(0, len(protos), size=n).astype(np.int32)
        x = protos[labels] + rng.normal(0, 0.3, size=(n, protos.shape[1]))
        return (np.clip(x, 0, 1) * 255).round().astype(np.uint8), labels
    k, h, w, c = protos.shape
    labels = rng.integers(0, k, size=n).astype(np.int32)
    padded = np.pad(protos, ((0, 0), (MAX_SHIFT, MAX_SHIFT), (MAX_SHIFT, MAX_SHIFT), (0, 0)))
    dy, dx = rng.integers(0, 2 * MAX_SHIFT + 1, size=(2, n))
    x = np.empty((n, h, w, c))
    for i in range(n):
        x[i] = padded[labels[i], dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    x *= rng.uniform(0.6, 1.0, size=(n, 1, 1, 1))
    distractor = np.stack([_blob(h, w, *rng.uniform(0, [h, w]), 2.0) for _ in range(min(n, 64))])
    x += 0.5 * distractor[rng.integers(0, len(distractor), size=n)][..., None] * rng.uniform(0, 1, (n, 1, 1, 1))
    x += rng.normal(0, 0.12, size=x.shape)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8), labels


def synth(out: str | Path, samples_train: int = 20000, samples_val: int = 2000, shards: int = 4,
          val_shards: int = 1, shape: tuple[int, int, int] = (28, 28, 1), num_classes: int = 10,
          seed: int = 0, chunk_samples: int = DEFAULT_CHUNK, compression: str = "none", x_dtype: str = "uint8",
          progress=print) -> Path:
    if samples_train <= 0:
        raise UserError(f"--samples must be > 0, got {samples_train}")
    if samples_val < 0:
        raise UserError(f"--val-samples must be >= 0, got {samples_val}")
    if shards <= 0 or shards > samples_train:
        raise UserError(f"--shards must be between 1 and --samples ({samples_train}), got {shards}")
    if num_classes < 2:
        raise UserError(f"--classes must be >= 2, got {num_classes}")
    if not (len(shape) == 1 and shape[0] >= 2) and \
            (len(shape) != 3 or min(shape) <= 0 or shape[0] < 12 or shape[1] < 12):
        raise UserError(f"--shape must be H,W,C with H and W >= 12 (images) or F >= 2 (tabular), got {shape}")
    if chunk_samples <= 0:
        raise UserError(f"--chunk-samples must be > 0, got {chunk_samples}")
    if x_dtype not in X_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(X_DTYPES)}, got {x_dtype!r}")
    parse_compression(compression)
    out = prepare_out_dir(out)
    protos = tabular_prototypes(num_classes, shape[0], seed) if len(shape) == 1 else prototypes(num_classes, shape, seed)
    t0 = time.perf_counter()
    written = {}
    plan = [("train", samples_train, shards)]
    if samples_val > 0:
        plan.append(("val", samples_val, val_shards))
    for split, total, count in plan:
        sink = SplitWriter(out, split, total, count, shape, num_classes, chunk_samples, compression, x_dtype,
                           progress)
        try:
            for i, n in enumerate(sink.sizes):
                # One generator per shard: a shard's content depends only on (seed, split, index).
                rng = np.random.default_rng([seed, 1 + (split == "val"), i])
                for start in range(0, n, 4096):
                    x, y = samples(protos, min(4096, n - start), rng)
                    sink.write(x if x_dtype == "uint8" else (x / 255.0).astype(x_dtype), y)
            written[split] = sink.close()
        except BaseException:
            sink.abort()
            raise
    path = write_manifest(out, shape, num_classes, written, x_dtype, chunk_samples, compression, source="synth",
                          synth={"seed": seed, "max_shift": MAX_SHIFT})
    progress(f"wrote {path} in {time.perf_counter() - t0:.1f}s")
    return path


# --- the command line (pipeline/cli.py dispatches) ---

def _shape(text: str) -> tuple[int, ...]:
    import argparse

    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W,C or F integers, got {text!r}") from None


def writer_arguments(p) -> None:
    """The shard writer's options, shared by data synth and data convert."""
    p.add_argument("--chunk-samples", type=int, default=DEFAULT_CHUNK,
                   help=f"HDF5 chunk length in samples (default {DEFAULT_CHUNK})")
    p.add_argument("--compression", default="none", help="none | lzf | gzip | gzip:LEVEL (default none)")
    p.add_argument("--dtype", default="uint8", help="stored pixel type: uint8 | float16 | float32 (default uint8)")


def add_arguments(p) -> None:
    p.add_argument("--kind", choices=["images", "cosmoflow", "segmentation"], default="images",
                   help="images (default): shards ready to train on; cosmoflow | segmentation: raw files in "
                        "those layouts, to be indexed with pipeline data index (docs/your-data.md)")
    p.add_argument("--out", required=True, help="dataset directory to create")
    p.add_argument("--samples", type=int, default=None,
                   help="training samples (default 20000); with --kind: files (cosmoflow 64, segmentation 240)")
    p.add_argument("--val-samples", type=int, default=2000, help="validation samples (default 2000)")
    p.add_argument("--shards", type=int, default=4, help="training shards (default 4)")
    p.add_argument("--val-shards", type=int, default=1, help="validation shards (default 1)")
    p.add_argument("--shape", type=_shape, default=None,
                   help="H,W,C images (default 28,28,1), or F for tabular rows of F features; cosmoflow: the "
                        "volume's side D (default 32); segmentation: H,W,C (default 64,64,4)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    p.add_argument("--seed", type=int, default=0)
    writer_arguments(p)
    p.set_defaults(func=cli)


def cli(a) -> int:
    if a.kind != "images":
        from pipeline.data.synth_layouts import synth_layout

        synth_layout(a.kind, a.out, files=a.samples, shape=a.shape, seed=a.seed)
        return 0
    synth(a.out, samples_train=a.samples or 20000, samples_val=a.val_samples, shards=a.shards,
          val_shards=a.val_shards, shape=a.shape or (28, 28, 1), num_classes=a.classes, seed=a.seed,
          chunk_samples=a.chunk_samples, compression=a.compression, x_dtype=a.dtype)
    return 0
