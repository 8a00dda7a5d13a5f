"""`pipeline bench comm`: the network figures of the communication model (pipeline/analysis/commmodel.py),
measured on the ranks' own network. Run it under the launcher of the job it should describe:

    mpirun ... pipeline bench comm --bytes 373288 --link-gbps 1 --out comm.json

- alpha: one small Horovod allreduce (4 KiB), compiled as in a training step: Horovod's cycle,
  negotiation and MPI's start, the fixed cost of a step's communication.
- latency: one 8-byte MPI allreduce divided by its ceil(log2 N) message rounds.
- bandwidth: a Horovod allreduce of the gradient's size; the time above alpha gives the ring's
  bytes per link per second (busbw), and with --link-gbps the efficiency against that rate.
Every figure is the slowest rank's median of --repeats timed loops. Rank 0 writes the JSON.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time

import numpy as np

SMALL = 4 << 10


class _Timer:
    """Median time of a collective over `repeats` runs of about `seconds` each, the slowest
    rank's (a collective is as slow as its slowest rank)."""

    def __init__(self, comm, MPI, repeats: int, seconds: float):
        self.comm, self.MPI, self.repeats, self.seconds = comm, MPI, repeats, seconds
        self.allreduce = None  # Horovod's, compiled, once Horovod is up

    def timed(self, fn, est_s: float) -> float:
        iters = int(max(3, min(500, self.seconds / max(est_s, 1e-6))))
        runs = []
        for _ in range(self.repeats):
            self.comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                out = fn()
            if hasattr(out, "numpy"):
                out.numpy()
            runs.append((time.perf_counter() - t0) / iters)
        return self.comm.allreduce(statistics.median(runs), op=self.MPI.MAX)

    def hvd_time(self, nbytes: int) -> float:
        import tensorflow as tf

        x = tf.constant(np.ones(max(nbytes // 4, 1), dtype=np.float32))
        t0 = time.perf_counter()
        for _ in range(3):  # tracing, fusion buffer, connections
            self.allreduce(x).numpy()
        est = self.comm.allreduce((time.perf_counter() - t0) / 3, op=self.MPI.MAX)
        return self.timed(lambda: self.allreduce(x), est)


def run(nbytes: int, link_gbps: float | None = None, repeats: int = 5, seconds: float = 0.3,
        out: str | None = None) -> int:
    """One rank of the measurement (every rank calls it); rank 0 prints and writes `out`."""
    from pipeline.analysis.commmodel import ring_bytes
    from pipeline.fsutil import atomic_write_text

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")  # as in training (pipeline/runtime/dist.py)
    from mpi4py import MPI  # MPI first, so Horovod joins the same world

    comm, n = MPI.COMM_WORLD, MPI.COMM_WORLD.Get_size()
    if n < 2:
        print("pipeline: error: bench comm needs >= 2 ranks (run it under mpirun)", flush=True)
        return 2
    timer = _Timer(comm, MPI, repeats, seconds)
    # MPI's own latency before Horovod starts its background thread, which would share the core.
    send, recv = np.ones(2, dtype=np.float32), np.empty(2, dtype=np.float32)
    comm.Allreduce(send, recv)
    mpi_small = timer.timed(lambda: comm.Allreduce(send, recv), 1e-4)

    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()
    timer.allreduce = tf.function(lambda t: hvd.allreduce(t, op=hvd.Sum, name="comm"))
    alpha = timer.hvd_time(SMALL)
    big = timer.hvd_time(nbytes)
    rounds = math.ceil(math.log2(n))
    moved = ring_bytes(nbytes, n)
    bw_s = max(big - alpha, 1e-9)
    res = {"ranks": n, "hosts": hvd.cross_size(), "ranks_per_host": hvd.local_size(), "bytes": nbytes,
           "alpha_s": alpha, "latency_s": mpi_small / rounds, "allreduce_s": big, "ring_bytes": moved,
           "busbw_gbps": moved * 8 / bw_s / 1e9, "link_gbps": link_gbps,
           "efficiency": moved * 8 / (link_gbps * 1e9) / bw_s if link_gbps else None,
           "env": {k: v for k, v in os.environ.items() if k.startswith(("HOROVOD_", "OMPI_MCA_btl", "OMPI_MCA_mpi"))}}
    if hvd.rank() == 0:
        print(f"bench comm: {n} ranks on {res['hosts']} hosts: alpha {alpha * 1e3:.3f} ms, latency "
              f"{res['latency_s'] * 1e6:.1f} us, allreduce of {nbytes:,} B {big * 1e3:.3f} ms, busbw "
              f"{res['busbw_gbps']:.3f} Gbit/s"
              + (f", efficiency {res['efficiency']:.3f} of {link_gbps:g} Gbit/s" if link_gbps else ""), flush=True)
        if out:
            atomic_write_text(out, json.dumps(res, indent=1))
    hvd.shutdown()
    return 0


# --- the command line (pipeline/cli.py dispatches) ---

def add_arguments(p) -> None:
    p.add_argument("--bytes", type=int, default=1 << 20, help="gradient bytes per step (config.json: gradient_bytes)")
    p.add_argument("--link-gbps", type=float, help="the link's nominal rate, for the efficiency")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="write the figures here (JSON, for pipeline analyze/predict --comm)")
    p.set_defaults(func=cli)


def cli(a) -> int:
    return run(a.bytes, a.link_gbps, a.repeats, out=a.out)
