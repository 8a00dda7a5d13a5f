"""The one distribution context: rank, size, collectives. Nothing else initializes Horovod.

Under a launcher (mpirun, srun --mpi=pmix, horovodrun) Horovod joins the ranks. Run alone,
or where Horovod is not installed, a plain single-process context stands in with the same
methods, so every code path runs without MPI.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import stack
from pipeline.errors import UserError
from pipeline.runtime import flight, gpus


def rank_threads(requested: int, local_size: int, environ=None, cores: int | None = None,
                 bound: int | None = None) -> int:
    """CPU threads for one rank: the request; else SLURM's CPUs per task; else the CPUs this
    process is bound to when the launcher bound it; else the machine's cores split evenly
    between the ranks on this node. Oversubscribed ranks (each using every core) run slower
    in total than fewer ranks would. `environ`, `cores` and `bound` (the CPUs in this
    process's affinity) default to what this process sees."""
    if requested > 0:
        return requested
    slurm = (os.environ if environ is None else environ).get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    cores = cores or os.cpu_count() or 1
    if bound is None:
        bound = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    if bound < cores:
        return max(1, bound)
    return max(1, cores // max(1, local_size))


# Set by the launchers this pipeline supports: OpenMPI's mpirun, PMI/PMIx (srun --mpi=pmix,
# MPICH, MVAPICH) and horovodrun (Gloo).
LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "MV2_COMM_WORLD_SIZE",
                 "HOROVOD_RANK")


# The job's rank count, where the launcher says it (srun: the step's task count).
SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "HOROVOD_SIZE", "SLURM_STEP_NUM_TASKS")


# This process's rank where the launcher says it, before Horovod starts.
RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "HOROVOD_RANK", "SLURM_PROCID")


def launcher_rank(environ=os.environ) -> int | None:
    for v in RANK_VARS:
        if environ.get(v, "").isdigit():
            return int(environ[v])
    return None


def keras2(tf, environ=os.environ) -> str:
    """The Keras behind tf.keras, which must be Keras 2 (pipeline/stack.py); the error is said
    by rank 0 only, as every rank meets it."""
    return stack.require_keras2(tf, quiet_error=launcher_rank(environ) not in (None, 0))


def under_launcher(environ=os.environ) -> bool:
    """True when a launcher started this process as one rank of a job."""
    return any(v in environ for v in LAUNCHER_VARS)


def launcher_size(environ=os.environ) -> int | None:
    for v in SIZE_VARS:
        if environ.get(v, "").isdigit():
            return int(environ[v])
    return None


@dataclass
class Dist:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str = "local"
    threads: int = 1
    gpu: str | None = None           # the CUDA_VISIBLE_DEVICES entry this rank uses (None: CPU)
    gpus_visible: int = 0            # the GPUs it saw before pinning
    gpu_allocated: str | None = None  # what said the job was given GPUs (gpus.allocated)
    on_gpu: bool = False             # TensorFlow has the chosen GPU: the step runs there
    _hvd: Any = None

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_sum(self, values) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if self._hvd is None or self.size == 1:
            return values
        import tensorflow as tf

        # float64 so sums of per-rank counts and losses stay exact.
        with flight.waiting("allreduce"):
            return self._hvd.allreduce(tf.constant(values), op=self._hvd.Sum, name=None).numpy()

    def broadcast_object(self, obj: Any, name: str) -> Any:
        if self._hvd is None or self.size == 1:
            return obj
        with flight.waiting(f"broadcast {name}"):
            return self._hvd.broadcast_object(obj, root_rank=0, name=name)

    def allgather_object(self, obj: Any, name: str) -> list:
        if self._hvd is None or self.size == 1:
            return [obj]
        with flight.waiting(f"allgather {name}"):
            return self._hvd.allgather_object(obj, name=name)

    def broadcast_variables(self, variables) -> None:
        # Every rank starts from rank 0's weights and optimizer state, whether fresh or
        # restored from a checkpoint, so the replicas are identical from step 1.
        if self._hvd is not None and self.size > 1:
            with flight.waiting("broadcast variables"):
                self._hvd.broadcast_variables(variables, root_rank=0)

    def average_variables(self, variables) -> None:
        """Sets each variable to its mean over ranks. For BatchNorm's moving statistics, which
        every rank updates from its own batches (Horovod averages gradients, not these):
        averaged before evaluating and checkpointing, so every replica holds the same model."""
        variables = list(variables)
        if self._hvd is None or self.size == 1 or not variables:
            return
        with flight.waiting("allreduce non_trainable"):
            means = self._hvd.grouped_allreduce([v.read_value() for v in variables], op=self._hvd.Average,
                                                name="non_trainable")
        for v, m in zip(variables, means):
            v.assign(m)

    def barrier(self) -> None:
        if self._hvd is not None and self.size > 1:
            self.allreduce_sum([0.0])

    def _compression(self, name: str):
        # fp16: gradients cast to float16 for the wire and back (half the bytes, some precision).
        return self._hvd.Compression.fp16 if name == "fp16" else self._hvd.Compression.none

    def gradient_tape(self, tape, compression: str = "none"):
        # Averages gradients over ranks with ring-allreduce before the optimizer applies them.
        if self._hvd is None or self.size == 1:
            return tape
        return self._hvd.DistributedGradientTape(tape, compression=self._compression(compression))

    def average_in_step(self, grads, stop, compression: str = "none", grouped: bool = False):
        """Inside a compiled step: the gradients averaged over ranks, and the stop flag's mean
        over ranks (> 0 exactly when some rank's flag is). Returns (grads, stops).

        grouped=False: one allreduce per gradient, each starting as soon as backprop produces
        it, as hvd.DistributedGradientTape does; grouped=True: gradients already computed
        (accumulated or XLA-compiled) in one grouped allreduce, one negotiation.

        The stop flag rides with the gradients. Horovod fuses only tensors of the same dtype
        and scale factors (Controller::FuseResponses), hence an Average like theirs; and it is
        held back until the first gradient out of backprop (the last variable's, the output
        layer's) exists, so that it is negotiated in the same cycle as gradients. Ready at the
        step's start, it was negotiated alone: one collective of its own every step, which
        the Horovod Keras loop does not have (docs/bench.md, "The stop flag")."""
        if self._hvd is None or self.size == 1:
            return grads, stop
        import tensorflow as tf

        hvd, comp = self._hvd, self._compression(compression)
        present = [g for g in grads if g is not None]
        with tf.control_dependencies(present if grouped else present[-1:]):
            flag = tf.identity(stop)
        stops = hvd.allreduce(flag, op=hvd.Average, name="stop_flag")
        if grouped:
            return hvd.grouped_allreduce(grads, op=hvd.Average, compression=comp, name="grads"), stops
        with tf.name_scope("gradient_allreduce"):
            return [None if g is None else hvd.allreduce(g, op=hvd.Average, compression=comp) for g in grads], stops

    def start_timeline(self, path) -> bool:
        """Records a Horovod timeline (rank 0 writes it, with every rank's negotiation ticks)."""
        if self._hvd is None or os.environ.get("HOROVOD_TIMELINE") != "DYNAMIC":
            return False
        self._hvd.start_timeline(str(path))
        return True

    def stop_timeline(self) -> None:
        if self._hvd is not None and os.environ.get("HOROVOD_TIMELINE") == "DYNAMIC":
            self._hvd.stop_timeline()

    def shutdown(self) -> None:
        if self._hvd is not None:
            self._hvd.shutdown()


def init(threads: int = 0, use_horovod: bool = True, timeline: bool = False, horovod_env: dict | None = None) -> Dist:
    """Joins the job and pins TensorFlow's thread pools; call before TensorFlow runs any op.
    timeline: let start_timeline() record a Horovod timeline once the run directory exists."""
    # Horovod's background thread shares a core with this rank's compute; OpenMPI's default
    # busy-polling in that thread steals the core. Yielding instead measured 3,300 vs 2,000
    # samples/s per rank with 2 ranks on 2 cores (docs/training.md). Read at MPI_Init; a
    # value already in the environment wins.
    os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    for k, v in (horovod_env or {}).items():
        os.environ.setdefault(k, v)  # read by hvd.init; a site's own setting wins
    if timeline:
        os.environ["HOROVOD_TIMELINE"] = "DYNAMIC"  # read by hvd.init; the file comes later
        # With the response cache on, negotiations after the first step record no per-rank
        # ticks, so the timeline could not say who arrived last. Off costs ~6% (docs/analysis.md).
        os.environ.setdefault("HOROVOD_CACHE_CAPACITY", "0")
    import tensorflow as tf

    keras2(tf)  # before Horovod, whose Keras wrappers fail obscurely on Keras 3
    hvd = None
    # Alone, without a launcher, there is nobody to talk to: skip MPI's singleton start-up,
    # which spawns a daemon and fails on some login nodes and under file-size limits.
    # A job of one rank has nobody to talk to either: Horovod's background thread would only
    # take cycles from the step (measured in make bench's 1-rank runs).
    if use_horovod and under_launcher() and launcher_size() != 1:
        try:
            import horovod.tensorflow as hvd
        except ImportError:
            hvd = None
    if hvd is not None:
        with flight.waiting("hvd.init"):
            hvd.init()
        d = Dist(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size(), "horovod", _hvd=hvd)
    else:
        d = Dist()
    d.threads = rank_threads(threads, d.local_size)
    tf.config.threading.set_intra_op_parallelism_threads(d.threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, d.threads)))
    pin_gpu(d, tf)
    return d


def pin_gpu(d: Dist, tf, environ=os.environ) -> None:
    """One GPU per rank, as the launcher bound them (pipeline/runtime/gpus.py), before
    TensorFlow initialises CUDA. A CUDA_VISIBLE_DEVICES list is narrowed to the rank's entry
    (the only way to hide a MIG instance or a GPU from CUDA itself); without one, TensorFlow's
    list is narrowed with set_visible_devices. Then the ranks of each host compare the GPUs they
    chose: two on one GPU run out of memory or serialize, so they stop with one line."""
    host = socket.gethostname()
    # Indices agree with nvidia-smi, NVML and SLURM, not CUDA's fastest-first order.
    environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    d.gpu_allocated = gpus.allocated(environ)
    from_env = gpus.visible_entries(environ)
    if from_env is not None:
        d.gpus_visible = len(from_env)
        d.gpu = _choose(d, from_env, host, environ)
        if d.gpu is not None:
            environ["CUDA_VISIBLE_DEVICES"] = d.gpu
        with _quiet_cuinit(d.gpu_allocated):
            found = tf.config.list_physical_devices("GPU")
        device = found[0] if found else None
    else:
        with _quiet_cuinit(d.gpu_allocated):
            found = tf.config.list_physical_devices("GPU")
        d.gpus_visible = len(found)
        d.gpu = _choose(d, [str(i) for i in range(len(found))], host, environ)
        device = found[int(d.gpu)] if d.gpu is not None else None
        if device is not None:
            tf.config.set_visible_devices(device, "GPU")
    d.on_gpu = device is not None
    if device is not None:
        tf.config.experimental.set_memory_growth(device, True)
        flags = gpus.xla_flags(environ.get("XLA_FLAGS", ""), _pip_cuda(tf))
        if flags:  # read at XLA's first compile, after this
            environ["XLA_FLAGS"] = flags
    chosen = d.allgather_object((d.rank, host, gpus.identity(d.gpu, from_env is not None)), name="gpus")
    problems = gpus.shared(chosen)
    if problems:
        raise UserError(problems[0], quiet=d.rank != 0)


def _quiet_cuinit(allocated: str | None, dev: str = "/dev"):
    """TensorFlow 2.18's CPU wheel logs `failed call to cuInit` at the first device listing
    where there is no GPU; dropped there, kept wherever the job or the node shows one."""
    try:
        devices = os.listdir(dev)
    except OSError:
        devices = []
    if allocated is None and gpus.on_the_node(devices, []) is None:
        return stack.quiet_stderr(stack.CUINIT_NOISE)
    return contextlib.nullcontext()


def _pip_cuda(tf) -> str | None:
    """site-packages/nvidia/cuda_nvcc where tensorflow[and-cuda] installed it with libdevice."""
    d = Path(tf.__file__).resolve().parent.parent / "nvidia" / "cuda_nvcc"
    return str(d) if (d / "nvvm" / "libdevice" / "libdevice.10.bc").exists() else None


def _choose(d: Dist, visible: list[str], host: str, environ) -> str | None:
    """gpus.choose, said once per host (every rank of a host meets the same binding)."""
    try:
        return gpus.choose(visible, d.local_rank, d.local_size, rank=d.rank, host=host, environ=environ)
    except UserError as e:
        raise UserError(str(e), quiet=d.local_rank != 0) from None
