"""Allreduce bandwidth, one rank of it: Horovod's allreduce against raw mpi4py `Allreduce` on
the same float32 buffers, sizes 4 KiB to 64 MiB, plus single-core memcpy as the limit line.

Run under a launcher: `mpirun -np 2 python -m pipeline.bench.allreduce --out FILE` (Horovod
over MPI) or `horovodrun --gloo -np 2 python -m pipeline.bench.allreduce --out FILE --no-mpi`
(Horovod over Gloo). Rank 0 writes FILE. Bandwidths as nccl-tests defines them:
algbw = bytes / time, busbw = algbw x 2(n-1)/n (what each link carries in a ring).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from pipeline.fsutil import atomic_write_text

SIZES = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]


def _iters(nbytes: int, quick: bool) -> int:
    # Enough calls for ~0.1-0.3 s per measurement at ~1 GB/s, at least 3.
    budget = (0.05 if quick else 0.2) * 1e9
    return int(max(3, min(200, budget // max(nbytes, 1))))


def memcpy_gbps(nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """One core copying a buffer larger than cache: bytes copied per second."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


class _Collectives:
    """Horovod's allreduce, compiled as inside a training step, and mpi4py's on the same world."""

    def __init__(self, use_mpi: bool):
        self.comm = None
        if use_mpi:
            from mpi4py import MPI  # MPI first, so Horovod joins the same MPI world

            self.MPI, self.comm = MPI, MPI.COMM_WORLD
        import horovod.tensorflow as hvd
        import tensorflow as tf

        self.hvd, self.tf = hvd, tf
        hvd.init()
        self.n = hvd.size()
        self.factor = 2 * (self.n - 1) / self.n  # bus bandwidth: what a ring moves per byte

        # Compiled like the gradient allreduce inside a training step, not op-by-op eager calls.
        @tf.function
        def hvd_allreduce(t):
            return hvd.allreduce(t, op=hvd.Sum, name="bench")

        self.hvd_allreduce = hvd_allreduce

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.Barrier()
        else:
            self.hvd.allreduce(self.tf.zeros([1]), op=self.hvd.Sum, name="barrier")

    def _timed(self, f, iters: int) -> float:
        self.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            y = f()
        if y is not None:
            y.numpy()
        return (time.perf_counter() - t0) / iters

    def row(self, nbytes: int, iters: int, repeats: int) -> dict:
        count = nbytes // 4
        x = self.tf.constant(np.ones(count, dtype=np.float32))
        send = np.ones(count, dtype=np.float32)
        recv = np.empty_like(send)
        hvd_t, mpi_t = [], []
        for _ in range(2):  # warm-up: tracing, fusion buffer, MPI connections
            self.hvd_allreduce(x).numpy()
            if self.comm is not None:
                self.comm.Allreduce(send, recv)
        for _ in range(repeats):
            # Interleaved, so both see the same machine state.
            hvd_t.append(self._timed(lambda: self.hvd_allreduce(x), iters))
            if self.comm is not None:
                mpi_t.append(self._timed(lambda: self.comm.Allreduce(send, recv), iters))
        # Every rank's time counts: a collective is as slow as its slowest rank.
        th = max(self.hvd.allgather_object(statistics.median(hvd_t), name=f"t{nbytes}"))
        ths = [max(self.hvd.allgather_object(t, name=f"h{nbytes}-{i}")) for i, t in enumerate(hvd_t)]
        row = {"bytes": nbytes, "iters": iters, "hvd_time_s": th,
               "hvd_busbw_gbps": nbytes / th * self.factor / 1e9,
               "hvd_busbw_min_gbps": nbytes / max(ths) * self.factor / 1e9,
               "hvd_busbw_max_gbps": nbytes / min(ths) * self.factor / 1e9}
        if self.comm is not None:
            tm = self.comm.allreduce(statistics.median(mpi_t), op=self.MPI.MAX)
            tms = [self.comm.allreduce(t, op=self.MPI.MAX) for t in mpi_t]
            row.update({"mpi_time_s": tm, "mpi_busbw_gbps": nbytes / tm * self.factor / 1e9,
                        "mpi_busbw_min_gbps": nbytes / max(tms) * self.factor / 1e9,
                        "mpi_busbw_max_gbps": nbytes / min(tms) * self.factor / 1e9})
            row["ratio"] = row["hvd_busbw_gbps"] / row["mpi_busbw_gbps"]
        return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-mpi", action="store_true", help="Gloo (horovodrun --gloo): no mpi4py baseline")
    p.add_argument("--sizes-mib", default="", help="buffer sizes in MiB, e.g. 64,256,1024 (default: 4 KiB to 64 MiB)")
    a = p.parse_args(argv)

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    c = _Collectives(use_mpi=not a.no_mpi)
    rows = []
    for nbytes in [int(float(x) * 2**20) for x in a.sizes_mib.split(",")] if a.sizes_mib else SIZES:
        row = c.row(nbytes, _iters(nbytes, a.quick), a.repeats)
        rows.append(row)
        if c.hvd.rank() == 0:
            print(f"allreduce {nbytes:>10} B: horovod {row['hvd_busbw_gbps']:.3f} GB/s"
                  + (f", mpi {row['mpi_busbw_gbps']:.3f} GB/s, ratio {row['ratio']:.2f}" if c.comm else ""),
                  flush=True)
    if c.hvd.rank() == 0:
        res = {"ranks": c.n, "rows": rows, "memcpy_gbps": memcpy_gbps(),
               "env": {k: v for k, v in os.environ.items() if k.startswith(("HOROVOD_", "OMPI_MCA_"))}}
        atomic_write_text(a.out, json.dumps(res, indent=1))
    c.hvd.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
