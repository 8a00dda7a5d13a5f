"""`pipeline data index`: a manifest over the user's own HDF5 files, where they are.

Nothing is copied and the sources are only ever opened read-only. The manifest lists each
file relative to a root (the deepest directory holding all of them), with its size and
sample count; `data.root` at train time says where a staged copy is. Every file is checked
before anything is written, so a problem leaves nothing under --out: one line naming the
file and the key.
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path

import h5py
import numpy as np

from pipeline.data import direct, extents
from pipeline.data.layout import PER_FILE, Layout
from pipeline.data.shards import (
    HDF5_SIGNATURE,
    INDEXED,
    ShardInfo,
    open_shard,
    prepare_out_dir,
    sha256_file,
    write_manifest,
)
from pipeline.errors import UserError

SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5", ".nc")


def expand(sources: list[str], what: str = "SRC") -> list[Path]:
    """Files, directories (every HDF5 file below, by suffix) and globs, sorted, without repeats."""
    found: list[Path] = []
    for src in sources:
        p = Path(src)
        if any(c in src for c in "*?["):
            hits = [Path(h) for h in sorted(glob.glob(src, recursive=True)) if Path(h).is_file()]
            if not hits:
                raise UserError(f"{src}: the pattern matches no file")
            found += hits
        elif p.is_dir():
            hits = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in SUFFIXES)
            if not hits:
                raise UserError(f"{p}: no HDF5 files ({', '.join(SUFFIXES)}) in this directory")
            found += hits
        elif p.is_file():
            found.append(p)
        else:
            raise UserError(f"{p}: no such file or directory ({what})")
    seen, out = set(), []
    for f in found:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def _probe(path: Path, lay: Layout) -> dict:
    """One file's shapes, dtypes and sample count; a problem is one line naming file and key."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(HDF5_SIGNATURE))
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})") from None
    if head != HDF5_SIGNATURE:
        raise UserError(f"{path}: not an HDF5 file (no HDF5 signature)")
    try:
        with open_shard(path) as f:
            info = {}
            for role, key in (("x", lay.x_key), ("y", lay.y_key)):
                if key not in f or not isinstance(f[key], h5py.Dataset):
                    raise UserError(f"{path}: no dataset {key!r} (--{role} {key})")
                d = f[key]
                if not np.issubdtype(d.dtype, np.number):
                    raise UserError(f"{path}: dataset {key!r} has dtype {d.dtype}, not numbers")
                info[role] = tuple(d.shape)
                info[role + "_dtype"] = d.dtype.name  # the reader asks HDF5 for native byte order
                info[role + "_chunk"] = d.chunks[0] if d.chunks and d.ndim else 1
                info[role + "_compression"] = d.compression or "none"
            info["maps"] = _maps(f, lay, info)
    except OSError as e:
        raise UserError(f"{path}: cannot be read as HDF5 ({str(e).splitlines()[0]})") from None
    xs, ys = info["x"], info["y"]
    if lay.subvolume:
        if len(xs) not in (3, 4):
            raise UserError(f"{path}: --subvolume needs {lay.x_key!r} of (D, H, W, C) or (H, W, C), it has shape {xs}")
        if min(xs[:-1]) < lay.subvolume:
            raise UserError(f"{path}: --subvolume {lay.subvolume} is larger than {lay.x_key!r} {xs}")
    elif lay.per_file == "many":
        if len(xs) < 1 or len(ys) < 1:
            raise UserError(f"{path}: with --per-file many, axis 0 of {lay.x_key!r} and {lay.y_key!r} is the sample "
                            f"axis; shapes are {xs} and {ys} (one sample per file? --per-file one)")
        if xs[0] != ys[0]:
            raise UserError(f"{path}: {lay.x_key!r} has {xs[0]} samples but {lay.y_key!r} has {ys[0]}")
    return {"x_shape": xs, "y_shape": ys, "x_dtype": info["x_dtype"], "y_dtype": info["y_dtype"],
            "samples": lay.samples_in_file(xs), "bytes": path.stat().st_size, "chunk": info["x_chunk"],
            "compression": info["x_compression"], "extents": extents.entry(path, info["maps"])}


def _maps(f, lay: Layout, info: dict) -> tuple:
    """Where the file's sample bytes lie (for the extents sidecar); (None, None) where the
    shapes do not fit the layout (the checks after this name the problem)."""
    xs, ys = info["x"], info["y"]
    if lay.subvolume:
        if len(xs) not in (3, 4) or min(xs[:-1]) < lay.subvolume:
            return None, None
        lay = Layout(lay.x_key, lay.y_key, "one", lay.subvolume, xs)
    elif lay.per_file == "many" and (len(xs) < 1 or len(ys) < 1):
        return None, None
    sample = int(np.prod(lay.sample_shape(xs))) * np.dtype(info["x_dtype"]).itemsize
    target = int(np.prod(lay.target_shape(ys))) * np.dtype(info["y_dtype"]).itemsize
    return direct.maps_for_file(f, lay, sample, target, np.dtype(info["x_dtype"]), np.dtype(info["y_dtype"]))


def _consistent(files: list[Path], probes: list[dict], lay: Layout) -> None:
    """Every file has the same sample shape and dtypes as the first."""
    x_shape = (lambda p: p["x_shape"]) if lay.subvolume else (lambda p: lay.sample_shape(p["x_shape"]))
    checks = [("x shape" if lay.subvolume else "sample shape", lay.x_key, x_shape),
              ("dtype", lay.x_key, lambda p: p["x_dtype"]),
              ("target shape", lay.y_key, lambda p: lay.target_shape(p["y_shape"])),
              ("dtype", lay.y_key, lambda p: p["y_dtype"])]
    for f, p in zip(files[1:], probes[1:]):
        for what, key, get in checks:
            if get(p) != get(probes[0]):
                raise UserError(f"{f}: {key!r} {what} {get(p)} differs from {get(probes[0])} in {files[0]} "
                                f"(mixed shapes or dtypes cannot be indexed together)")


def _split(files: list[Path], val: list[Path] | None, val_fraction: float | None, seed: int) -> list[bool]:
    """Which files are validation files: the ones --val names, or a fraction of the files drawn
    with the seed. By file, so sub-volumes of one universe never sit on both sides."""
    if val is not None:
        vs = set(val)
        return [f in vs for f in files]
    frac = 0.1 if val_fraction is None else val_fraction
    if not 0 <= frac < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {frac}")
    n_val = int(round(frac * len(files))) if len(files) > 1 else 0
    n_val = min(n_val, len(files) - 1)
    chosen = set(np.random.default_rng(seed).permutation(len(files))[:n_val].tolist())
    return [i in chosen for i in range(len(files))]


def index(sources: list[str], out: str | Path, x_key: str, y_key: str, per_file: str = "many",
          subvolume: int | None = None, val_fraction: float | None = None, val: list[str] | None = None,
          num_classes: int | None = None, checksums: bool = False, seed: int = 0, progress=print) -> Path:
    if per_file not in PER_FILE:
        raise UserError(f"--per-file must be one of {', '.join(PER_FILE)}, got {per_file!r}")
    if subvolume is not None and subvolume < 1:
        raise UserError(f"--subvolume must be >= 1, got {subvolume}")
    if num_classes is not None and num_classes < 2:
        raise UserError(f"--num-classes must be >= 2, got {num_classes}")
    if val is not None and val_fraction is not None:
        raise UserError("give --val-fraction or --val, not both")
    out = Path(out)
    if (out / "manifest.json").exists():
        raise UserError(f"{out}: already holds a dataset (manifest.json); choose another --out or remove it")
    t0 = time.perf_counter()
    train_files = expand(sources)
    val_files = expand(val, "--val") if val else None
    files = train_files + [f for f in (val_files or []) if f not in set(train_files)]
    lay = Layout(x_key, y_key, "one" if subvolume else per_file, subvolume)
    probes = []
    for i, f in enumerate(files):
        probes.append(_probe(f, lay))
        if (i + 1) % 1000 == 0:
            progress(f"checked {i + 1} of {len(files)} files")
    _consistent(files, probes, lay)
    first = probes[0]
    if subvolume:
        lay = Layout(x_key, y_key, "one", subvolume, first["x_shape"])
    y_shape = lay.target_shape(first["y_shape"])
    if num_classes is not None and not np.issubdtype(np.dtype(first["y_dtype"]), np.integer):
        raise UserError(f"{files[0]}: --num-classes needs integer class ids in {y_key!r}, it holds {first['y_dtype']}")
    is_val = _split(files, val_files, val_fraction, seed)
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    splits: dict[str, list[ShardInfo]] = {"train": [], "val": []}
    for f, p, v in zip(files, probes, is_val):
        digest = sha256_file(f) if checksums else ""
        splits["val" if v else "train"].append(ShardInfo(str(f.relative_to(root)), p["samples"], digest, p["bytes"]))
    if not splits["train"]:
        raise UserError("no training files left: every file is a validation file")
    shape = lay.sample_shape(first["x_shape"])
    # The sidecar before the manifest: a manifest on disk always has its sidecar beside it.
    out = prepare_out_dir(out)
    extents.write(out, [str(f.relative_to(root)) for f in files], [p["extents"] for p in probes])
    path = write_manifest(
        out, shape, num_classes, {k: v for k, v in splits.items() if v}, first["x_dtype"],
        # Reads are cut at multiples of x's chunk length along the sample axis (many per file).
        first["chunk"] if lay.per_file == "many" and not subvolume else 1, first["compression"],
        y_dtype=first["y_dtype"], kind=INDEXED, root=str(root), layout=lay.as_dict(), y_shape=list(y_shape),
        checksums=checksums)
    n = {k: sum(s.num_samples for s in v) for k, v in splits.items()}
    progress(f"indexed {len(files)} files under {root}: {n['train']} training and {n['val']} validation samples "
             f"of shape {shape} {first['x_dtype']}, targets {tuple(y_shape)} {first['y_dtype']}; "
             f"wrote {path} and {extents.NAME} in {time.perf_counter() - t0:.1f}s")
    return path


# --- the command line (pipeline/cli.py dispatches) ---

def add_arguments(p) -> None:
    p.add_argument("src", nargs="+", metavar="SRC", help="files, directories (every .h5/.hdf5 below) or globs")
    p.add_argument("--out", required=True, help="directory for manifest.json (the files stay where they are)")
    p.add_argument("--x", required=True, metavar="KEY", help="the input dataset, e.g. full or climate/data")
    p.add_argument("--y", required=True, metavar="KEY", help="the target dataset, e.g. unitPar or climate/labels_0")
    p.add_argument("--per-file", choices=["many", "one"], default="many",
                   help="many (default): axis 0 is the sample axis of both keys; one: each file is one sample")
    p.add_argument("--subvolume", type=int, metavar="S",
                   help="each S-cube (or S-square) of a file's x is one sample with the file's y")
    vs = p.add_mutually_exclusive_group()
    vs.add_argument("--val-fraction", type=float, help="validation files, drawn by file (default 0.1)")
    vs.add_argument("--val", nargs="+", metavar="SRC", help="the validation files instead")
    p.add_argument("--num-classes", type=int, help="the targets are class ids 0..C-1 (else values: regression)")
    p.add_argument("--checksums", action="store_true", help="record each file's sha256 (reads every byte)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation draw")
    p.set_defaults(func=cli)


def cli(a) -> int:
    index(a.src, a.out, a.x, a.y, per_file=a.per_file, subvolume=a.subvolume, val_fraction=a.val_fraction,
          val=a.val, num_classes=a.num_classes, checksums=a.checksums, seed=a.seed)
    return 0
