"""MLPerf HPC logging: rank 0 writes RUN/mlperf.log in MLCommons' `:::MLLOG` format through
their own `mlperf_logging.mllog`, so that `python -m mlperf_logging.compliance_checker
--usage hpc --ruleset 3.0.0 RUN/mlperf.log` can check it (docs/mlperf.md).

What a run logs, in order (times in milliseconds since the epoch, as the format requires):

    submission_* (from the config's mlperf section), init_start (the process's start),
    cache_clear (the dataset's pages dropped from the page cache before anything reads them),
    the hyperparameters (global_batch_size, opt_*, seed, train_samples, eval_samples,
    number_of_nodes, accelerators_per_node, gradient_accumulation_steps), staging_start /
    staging_stop (the share read into memory), init_stop, run_start, then per epoch
    epoch_start / epoch_stop and eval_start / eval_error (or eval_accuracy) / eval_stop,
    and run_stop with status success (the target was reached) or aborted (it was not: the
    epochs ran out, a stop signal came, the run failed).

The log is kept in memory until the run is past every check a user can fail (`attach`), so
a mistyped --set leaves no file. A resumed attempt is a new log (`mlperf-2.log`, ...): a
run stopped and resumed is not one MLPerf run, and its first log says `aborted`.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

LOG_NAME = "mlperf.log"
SUCCESS, ABORTED = "success", "aborted"


def log_path(run_dir: Path) -> Path:
    """This attempt's log: mlperf.log for the first, mlperf-N.log for the N-th."""
    path, n = Path(run_dir) / LOG_NAME, 1
    while path.exists():
        n += 1
        path = Path(run_dir) / f"mlperf-{n}.log"
    return path


def logs(run_dir: Path) -> list[Path]:
    """A run directory's MLPerf logs, attempt by attempt."""
    run_dir = Path(run_dir)
    found = [run_dir / LOG_NAME] if (run_dir / LOG_NAME).exists() else []
    numbered = [(int(p.stem.split("-", 1)[1]), p) for p in run_dir.glob("mlperf-*.log")
                if p.stem.split("-", 1)[1].isdigit()]
    return found + [p for _, p in sorted(numbered)]


class LineSink(logging.Handler):
    """The logger's only handler: lines held until the file is opened, then written and
    flushed one by one (a killed rank's log holds every event before the kill). A failed
    write (disk full) is said once and ends the log; training goes on."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.file = None
        self.broken = False

    def emit(self, record) -> None:
        if self.broken:
            return
        line = record.getMessage().lstrip("\n") + "\n"
        if self.file is None:
            self.lines.append(line)
            return
        try:
            self.file.write(line)
            self.file.flush()
        except OSError as e:
            self.broken = True
            print(f"pipeline: warning: {self.file.name}: write failed ({e.strerror}); the MLPerf log ends here",
                  file=sys.stderr, flush=True)
            self.close_file()

    def close_file(self) -> None:
        if self.file is not None:
            f, self.file = self.file, None
            try:
                f.close()
            except OSError:
                pass  # what could not be written is lost; the warning said so

    def open(self, path: Path) -> None:
        self.file = open(path, "x")
        self.file.writelines(self.lines)
        self.file.flush()
        self.lines = []

    def close(self) -> None:
        self.close_file()
        super().close()


class MLPerfLog:
    """No log (ranks other than 0, or mlperf off): every method does nothing. The real log is
    its subclass, chosen once per rank by `open_log`."""

    path: Path | None = None

    def event(self, key: str, value=None, metadata: dict | None = None, t: float | None = None) -> None:
        pass

    def events(self, make) -> None:
        """Events from `make()`, (key, value) pairs, built only where the log writes."""

    def start(self, key: str, metadata: dict | None = None, t: float | None = None) -> None:
        pass

    def end(self, key: str, metadata: dict | None = None, t: float | None = None) -> None:
        pass

    def attach(self, run_dir: Path) -> None:
        pass

    def close(self) -> None:
        pass


class MLPerfLogFile(MLPerfLog):
    """Rank 0's log of one attempt through MLCommons' mllog: held in memory until `attach()`
    (past every user check), then written line by line."""

    def __init__(self, settings, t_start: float):
        from mlperf_logging.mllog.mllog import MLLogger

        self._sink = LineSink()
        logger = logging.getLogger(f"pipeline.mlperf.{id(self)}")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logger.addHandler(self._sink)
        self._logger = logger
        # stack offset 3: the call site recorded in each line is the training code, not this
        # file or the hook.
        self._ml = MLLogger(logger=logger, default_stack_offset=3,
                            root_dir=str(Path(__file__).resolve().parents[2]))
        for key, value in (("submission_benchmark", settings.benchmark), ("submission_org", settings.org),
                           ("submission_division", settings.division), ("submission_status", settings.status)):
            self.event(key, value)
        self.start("init_start", t=t_start)

    def event(self, key: str, value=None, metadata: dict | None = None, t: float | None = None) -> None:
        self._ml.event(key=key, value=value, metadata=metadata, time_ms=_ms(t) if t is not None else None)

    def events(self, make) -> None:
        for key, value in make():
            self.event(key, value)

    def start(self, key: str, metadata: dict | None = None, t: float | None = None) -> None:
        self._ml.start(key=key, metadata=metadata, time_ms=_ms(t) if t is not None else None)

    def end(self, key: str, metadata: dict | None = None, t: float | None = None) -> None:
        self._ml.end(key=key, metadata=metadata, time_ms=_ms(t) if t is not None else None)

    def attach(self, run_dir: Path) -> None:
        """Past every user check: the log goes to its file (written so far, then line by line)."""
        if self.path is None:
            self.path = log_path(run_dir)
            self._sink.open(self.path)

    def close(self) -> None:
        self._logger.removeHandler(self._sink)
        self._sink.close()


def open_log(settings, rank: int, t_start: float) -> MLPerfLog:
    """Rank 0's log when mlperf is on, else one that writes nothing: decided here, once."""
    return MLPerfLogFile(settings, t_start) if settings.enabled and rank == 0 else MLPerfLog()


def _ms(t: float) -> int:
    return int(round(t * 1000))


def platform() -> str:
    """submission_platform when the config gives none: the host's processor (and GPUs)."""
    gpus = gpu_names()
    cpu = cpu_model()
    return f"{socket.gethostname()}: {cpu}" + (f", {len(gpus)}x {gpus[0]}" if gpus else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    try:
        import tensorflow as tf

        return [tf.config.experimental.get_device_details(g).get("device_name", "GPU")
                for g in tf.config.list_physical_devices("GPU")]
    except Exception:  # noqa: BLE001 - a description, never a reason to fail
        return []


def drop_page_cache(paths) -> tuple[int, bool]:
    """posix_fadvise(DONTNEED) on each file: its clean pages leave the page cache, so the run
    reads from storage as a cold start does. Returns (files, whether every call succeeded)."""
    n, ok = 0, True
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            ok = False
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            n += 1
        except OSError:
            ok = False
        finally:
            os.close(fd)
    return n, ok


# --- MLCommons' system description (pipeline doctor --system-json) ---

def hardware(paths: list[str]) -> dict:
    """What this host reports of itself, for the system description: processors, caches,
    memory, the file systems under `paths` (data, run directory), network interfaces, GPUs."""
    cpu: dict = {"model": cpu_model(), "vcpus": os.cpu_count() or 0}
    try:
        info = Path("/proc/cpuinfo").read_text()
        sockets = {ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("physical id")}
        cores = next((int(ln.split(":", 1)[1]) for ln in info.splitlines() if ln.startswith("cpu cores")), 0)
        mhz = next((float(ln.split(":", 1)[1]) for ln in info.splitlines() if ln.startswith("cpu MHz")), 0.0)
        cpu.update(sockets=len(sockets) or 1, cores_per_socket=cores or cpu["vcpus"], mhz=mhz)
    except (OSError, ValueError):
        cpu.update(sockets=1, cores_per_socket=cpu["vcpus"], mhz=0.0)
    caches = []
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((d / f).read_text().strip() for f in ("level", "type", "size"))
            caches.append(f"L{level}{'d' if kind == 'Data' else 'i' if kind == 'Instruction' else ''} {size}")
        except OSError:
            continue
    mem_kib = 0
    try:
        mem_kib = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                       if ln.startswith("MemTotal"))
    except (OSError, StopIteration, ValueError):
        pass
    storage = []
    for p in paths:
        where = Path(p)
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            import shutil

            total = shutil.disk_usage(where).total
        except OSError:
            continue
        storage.append({"path": p, "fs": _fs_type(where), "bytes": total})
    nets = []
    for n in sorted(os.listdir("/sys/class/net")) if Path("/sys/class/net").is_dir() else []:
        if n == "lo":
            continue
        try:
            speed = int(Path(f"/sys/class/net/{n}/speed").read_text())
        except (OSError, ValueError):
            speed = -1
        nets.append(f"{n} {speed} Mb/s" if speed > 0 else n)
    return {"host": socket.gethostname(), "cpu": cpu, "caches": caches, "memory_bytes": mem_kib * 1024,
            "storage": storage, "networks": nets, "gpus": gpu_names(), "gpu_memory": _gpu_memory(),
            "os": _os_name()}


def _fs_type(path: Path) -> str:
    """The file system type of the mount holding `path` (/proc/mounts, longest prefix)."""
    best, kind = "", "unknown"
    try:
        real = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")) \
                    and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def _gpu_memory() -> str:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.split("\n")[0].strip()
        return out
    except (OSError, subprocess.SubprocessError):
        return ""


def _os_name() -> str:
    import platform

    name = platform.system()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                name = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return f"{name}, kernel {platform.release()}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.0f} GB"


def system_description(settings, hosts: list[dict], versions: dict, ranks: int) -> dict:
    """MLCommons' system description (the fields mlperf_logging.system_desc_checker requires),
    filled from what the hosts reported (`hardware()` per host) and the run's versions. Fields
    no machine can report (cooling, interconnect topology) say so instead of guessing."""
    h = hosts[0]
    cpu = h["cpu"]
    mixed = len({(x["cpu"]["model"], x["memory_bytes"], tuple(x["gpus"])) for x in hosts}) > 1
    gpus = h["gpus"]
    unknown = "not reported by the machine; fill in"
    storage = "; ".join(f"{s['fs']} ({s['path']})" for s in h["storage"]) or unknown
    return {
        "submitter": settings.org or unknown,
        "division": settings.division,
        "status": settings.status,
        "system_name": settings.platform or f"{len(hosts)}x {cpu['model']}" + (f" + {len(gpus)}x {gpus[0]}" if gpus else ""),
        "number_of_nodes": str(len(hosts)),
        "host_processors_per_node": str(cpu["sockets"]),
        "host_processor_model_name": cpu["model"],
        "host_processor_core_count": str(cpu["cores_per_socket"]),
        "host_processor_vcpu_count": str(cpu["vcpus"]),
        "host_processor_frequency": f"{cpu['mhz']:.0f} MHz" if cpu.get("mhz") else unknown,
        "host_processor_caches": ", ".join(h["caches"]) or unknown,
        "host_processor_interconnect": unknown,
        "host_memory_capacity": _gib(h["memory_bytes"]) if h["memory_bytes"] else unknown,
        "host_storage_type": storage,
        "host_storage_capacity": "; ".join(_gib(s["bytes"]) for s in h["storage"]) or unknown,
        "host_networking": ", ".join(h["networks"]) or unknown,
        "host_networking_topology": unknown if len(hosts) > 1 else "single node",
        "host_memory_configuration": unknown,
        "accelerators_per_node": str(len(gpus)),
        "accelerator_model_name": gpus[0] if gpus else "N/A",
        "accelerator_host_interconnect": unknown if gpus else "N/A",
        "accelerator_frequency": unknown if gpus else "N/A",
        "accelerator_on-chip_memories": unknown if gpus else "N/A",
        "accelerator_memory_configuration": unknown if gpus else "N/A",
        "accelerator_memory_capacity": h["gpu_memory"] or (unknown if gpus else "N/A"),
        "accelerator_interconnect": unknown if gpus else "N/A",
        "accelerator_interconnect_topology": unknown if gpus else "N/A",
        "cooling": unknown,
        "hw_notes": (f"{ranks} rank(s) over {len(hosts)} host(s): " + ", ".join(sorted({x['host'] for x in hosts}))
                     + ("; the hosts differ: this describes the first" if mixed else "")),
        "framework": f"TensorFlow {versions.get('tensorflow', '?')}, Horovod {versions.get('horovod', '-')}",
        "other_software_stack": ", ".join(f"{k} {versions[k]}" for k in ("python", "mpi", "nccl", "horovod_ops",
                                                                         "numpy", "h5py", "hdf5") if versions.get(k) not in (None, "", "-")),
        "operating_system": h["os"],
        "sw_notes": "written by pipeline doctor --system-json",
    }
