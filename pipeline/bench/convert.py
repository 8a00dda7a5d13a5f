"""`pipeline bench convert`: converts a generated CIFAR-10-format source of several GiB and
reports the converter's peak resident memory, to show conversion streams (bounded memory
whatever the dataset's size)."""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.data.convert import CIFAR_RECORD, CIFAR_TEST, CIFAR_TRAIN
from pipeline.errors import UserError

LIMIT_MIB = 1024


def write_source(src: Path, gib: float, seed: int = 0) -> int:
    """CIFAR-10 binary batches totalling about `gib` GiB; returns the number of records."""
    src.mkdir(parents=True, exist_ok=True)
    total = int(gib * 2**30) // CIFAR_RECORD
    test = min(10000, total // 50)
    per_file = (total - test) // len(CIFAR_TRAIN)
    rng = np.random.default_rng(seed)
    for name, n in [(f, per_file) for f in CIFAR_TRAIN] + [(CIFAR_TEST, test)]:
        with open(src / name, "wb") as f:
            for start in range(0, n, 65536):
                k = min(65536, n - start)
                rec = rng.integers(0, 256, size=(k, CIFAR_RECORD), dtype=np.uint8)
                rec[:, 0] %= 10
                f.write(rec.tobytes())
    return per_file * len(CIFAR_TRAIN) + test


def run(gib: float = 4.0, work: str | None = None, keep: bool = False, out=sys.stdout) -> dict:
    if gib <= 0:
        raise UserError(f"--gib must be > 0, got {gib}")
    base = Path(work) if work else Path(tempfile.mkdtemp(prefix="bench-convert-"))
    base.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(base).free / 2**30
    if free < 2.2 * gib:
        raise UserError(f"{base}: {free:.1f} GiB free, need about {2.2 * gib:.1f} GiB (source and shards)")
    src, dst = base / "cifar-src", base / "shards"
    try:
        t0 = time.perf_counter()
        records = write_source(src, gib)
        size = sum(p.stat().st_size for p in src.iterdir())
        print(f"source: {records} CIFAR-10 records, {size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f}s", file=out)
        t0 = time.perf_counter()
        # A child process, so its peak RSS is the converter's alone (RUSAGE_CHILDREN).
        proc = subprocess.run([sys.executable, "-m", "pipeline", "data", "convert", "--format", "cifar10",
                               "--src", str(src), "--out", str(dst), "--shards", "16"],
                              capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise UserError(f"conversion failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        written = sum(p.stat().st_size for p in dst.glob("*.h5"))
        result = {"source_gib": size / 2**30, "records": records, "shards_gib": written / 2**30,
                  "seconds": elapsed, "mb_per_s": size / 1e6 / elapsed, "peak_rss_mib": peak_mib,
                  "limit_mib": LIMIT_MIB, "bounded": peak_mib < LIMIT_MIB}
        print(f"convert: {size / 2**30:.2f} GiB -> {written / 2**30:.2f} GiB of shards in {elapsed:.0f}s "
              f"({result['mb_per_s']:.0f} MB/s, sha256 included); peak RSS {peak_mib:.0f} MiB "
              f"({peak_mib / (size / 2**20):.3f} of the source size; limit {LIMIT_MIB} MiB: "
              f"{'bounded' if result['bounded'] else 'EXCEEDED'})", file=out)
        return result
    finally:
        if not keep:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(dst, ignore_errors=True)
            if not work:
                shutil.rmtree(base, ignore_errors=True)


# --- the command line (pipeline/cli.py dispatches) ---

def add_arguments(p) -> None:
    p.add_argument("--gib", type=float, default=4.0, help="source size in GiB (default 4)")
    p.add_argument("--work", help="directory for the source and shards (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.set_defaults(func=cli)


def cli(a) -> int:
    return 0 if run(a.gib, a.work, a.keep)["bounded"] else 1
