"""`pipeline doctor`: pre-flight checks under the same launcher as training.

Every rank reports what it sees: host, versions (Python, TensorFlow, Horovod, MPI, NCCL) and
Horovod's built operations, the dataset manifest's digest, whether the run directory is
writable with room for checkpoint.keep + 1 checkpoints (rank 0 writes them), the network
interfaces MPI and NCCL would use, GPUs against the ranks on its host; then all ranks time a
1 MiB and a 64 MiB allreduce together. Rank 0 prints one table; the job exits 0, or 2 with
one line per fatal mismatch naming rank and host (slurm/train.sbatch runs it first).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import struct
import sys
import time
from pathlib import Path

from pipeline.errors import EXIT_USER_ERROR, UserError
from pipeline.fsutil import atomic_write_text
from pipeline.rundir import RunDir
from pipeline.runtime import dist as dist_mod, gpus

# Interfaces that carry no traffic between hosts: loopback, and container or VM bridges.
_LOCAL_ONLY = ("lo", "docker", "virbr", "br-", "veth", "cni", "flannel", "podman", "lxcbr")


def _ipv4(name: str) -> str | None:
    """An interface's IPv4 address (SIOCGIFADDR), or None."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
        return socket.inet_ntoa(packed[20:24])
    return None


def interfaces(environ=os.environ) -> dict:
    """The interfaces up with an IPv4 address, and which of them MPI's TCP transport and NCCL's
    sockets would use: the site's setting where given, else their default choice."""
    names = [n for _, n in socket.if_nameindex()]
    up = {n: a for n in names if (a := _ipv4(n))}
    routable = [n for n in up if not n.startswith(_LOCAL_ONLY)]

    def pick(include: str | None, exclude: str | None, default: list) -> list:
        if include:
            return [n for n in up if any(n.startswith(p) for p in include.replace("^", "").split(","))]
        if exclude:
            return [n for n in up if not any(n.startswith(p) for p in exclude.split(","))]
        return default

    mpi = pick(environ.get("OMPI_MCA_btl_tcp_if_include"), environ.get("OMPI_MCA_btl_tcp_if_exclude"),
               routable or [n for n in up if n != "lo"])
    nccl_env = environ.get("NCCL_SOCKET_IFNAME", "")
    nccl = pick(nccl_env if nccl_env and not nccl_env.startswith("^") else None,
                nccl_env[1:] if nccl_env.startswith("^") else None, routable[:1] or list(up)[:1])
    return {"up": up, "mpi": mpi, "nccl": nccl}


def _manifest_digest(data_dir: str) -> str:
    try:
        return hashlib.sha256((Path(data_dir) / "manifest.json").read_bytes()).hexdigest()[:16]
    except OSError as e:
        return f"unreadable ({e.strerror})"


def _checkpoint_bytes(run_dir: Path, params: int, optimizer: str) -> int:
    """The newest checkpoint's size where one exists, else the model's variables and the
    optimizer's slots in float32 (Adam keeps two per weight, SGD with momentum one)."""
    from pipeline.train.checkpoint import latest

    with contextlib.suppress(Exception):
        ref = latest(run_dir / "checkpoints")
        if ref is not None:
            return sum(p.stat().st_size for p in Path(ref.path).rglob("*") if p.is_file())
    return params * 4 * (3 if optimizer == "adam" else 2)


def _writable(run_dir: Path) -> tuple[bool, str, Path]:
    """Creates and removes a file where the run directory is (or would be made)."""
    where = run_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    probe = where / f".doctor-{socket.gethostname()}-{os.getpid()}"
    try:
        with open(probe, "w") as f:
            f.write("x" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
        return True, "", where
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink()
        return False, e.strerror or str(e), where


def _versions() -> dict:
    """The run's versions (as config.json records them), Horovod's built operations, NCCL, MPI."""
    from pipeline.train.trainer import versions

    v = {"horovod": "-", "horovod_ops": "-", "nccl": "-", **versions()}
    try:
        import horovod.tensorflow as hvd

        v["horovod_ops"] = ",".join(n for n in ("mpi", "gloo", "nccl", "ccl", "ddl", "cuda", "rocm")
                                    if getattr(hvd, f"{n}_built")()) or "none"
        v["nccl"] = gpus.nccl_version(hvd.nccl_built()) or "-"
    except ImportError:
        pass
    try:
        from mpi4py import MPI

        v["mpi"] = MPI.Get_library_version().splitlines()[0].strip()[:40]
    except Exception:  # noqa: BLE001 - no mpi4py or no MPI library: say so in the table
        v["mpi"] = "-"
    return v


def _timed_allreduce(d, nbytes: int, repeats: int = 3) -> float | None:
    """Seconds for one allreduce of nbytes (the best of a few, after a warm-up); None alone."""
    if d._hvd is None or d.size == 1:
        return None
    import tensorflow as tf

    x = tf.ones([nbytes // 4], tf.float32)
    best = None
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        d._hvd.allreduce(x, op=d._hvd.Sum, name=f"doctor_{nbytes}").numpy()
        if i:
            best = min(best or 1e9, time.perf_counter() - t0)
    return best


def run(cfg, run_dir: str | None, out=sys.stdout, err=sys.stderr, system_json: str | None = None) -> int:
    d = dist_mod.init(cfg.train.threads)
    try:
        return _run(cfg, d, Path(run_dir) if run_dir else None, out, err, system_json)
    finally:
        d.shutdown()


def _run(cfg, d, run_dir: Path | None, out, err, system_json: str | None = None) -> int:
    import tensorflow as tf

    from pipeline.mlperf import log as mlperf

    me = {"rank": d.rank, "host": socket.gethostname(), "local_rank": d.local_rank, "local_size": d.local_size,
          **_versions(), "data_dir": cfg.data.dir, "manifest": _manifest_digest(cfg.data.dir),
          **_gpu_report(d, tf), "net": interfaces()}
    # The model's size for the free-space check, from rank 0 (building it on every rank
    # costs every rank the time).
    params = 0
    if d.is_root:
        with contextlib.suppress(Exception):
            from pipeline.data import shards
            from pipeline.train import models

            m = shards.load_manifest(cfg.data.dir, cfg.data.root or None)
            params = models.build(cfg.model.name, m.shape, m.num_classes, target_shape=m.y_shape,
                                  args=cfg.model.args).count_params()
    params = d.broadcast_object(params, name="doctor_params")
    if run_dir is not None:
        ok, why, where = _writable(run_dir)
        need = (cfg.checkpoint.keep + 1) * _checkpoint_bytes(run_dir, params, cfg.train.optimizer)
        free = shutil.disk_usage(where).free if where.exists() else 0
        me.update(run_dir_writable=ok, run_dir_error=why, free_bytes=free, need_bytes=need)
    if system_json:
        me["hw"] = mlperf.hardware([cfg.data.dir] + ([str(run_dir)] if run_dir else []))
    reports = d.allgather_object(me, name="doctor_reports")
    t1 = _timed_allreduce(d, 1 << 20)
    t64 = _timed_allreduce(d, 64 << 20)
    fatal, warn = verdict(reports, cfg, run_dir)
    if d.is_root:
        out.write(_table(reports, t1, t64, d.size, run_dir) + "\n")
        out.write(stack_line(reports[0]) + "\n")
        for w in warn:
            out.write(f"doctor: warning: {w}\n")
        for f in fatal:
            err.write(f"doctor: {f}\n")
        if system_json:
            hosts = list({r["host"]: r["hw"] for r in reports}.values())  # one per host
            desc = mlperf.system_description(cfg.mlperf, hosts, reports[0], d.size)
            atomic_write_text(Path(system_json), json.dumps(desc, indent=2) + "\n")
            out.write(f"doctor: system description of {len(hosts)} host(s) in {system_json} (check it: python -m "
                      f"mlperf_logging.system_desc_checker {system_json} hpc 3.0.0)\n")
        out.write(f"doctor: {'FAILED: ' + str(len(fatal)) + ' fatal problem(s)' if fatal else 'ok'}\n")
        out.flush()
        err.flush()
    return EXIT_USER_ERROR if fatal else 0


def _nvidia_smi(*args: str) -> str:
    import subprocess

    if not shutil.which("nvidia-smi"):
        return ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=20).stdout
    return ""


def _gpu_report(d, tf) -> dict:
    """What this rank sees of GPUs: the binding (from dist), TensorFlow's list and the CUDA it
    was built for, the driver's CUDA and what the node shows whatever the job was given."""
    devices = [p for p in os.listdir("/dev") if p.startswith("nvidia")] if os.path.isdir("/dev") else []
    listed = tf.config.list_physical_devices("GPU")
    name = None
    if listed:
        with contextlib.suppress(Exception):
            name = tf.config.experimental.get_device_details(listed[0]).get("device_name")
    smi_list = _nvidia_smi("-L").splitlines()
    query = _nvidia_smi("--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits") if d.gpu else ""
    return {"gpus": d.gpus_visible, "gpu": d.gpu, "tf_gpus": len(listed), "gpu_name": name,
            "gpu_memory": gpus.memory(d.gpu, query, smi_list) if d.gpu else None,
            "cuda_built": tf.sysconfig.get_build_info().get("cuda_version") or None,
            "driver_cuda": gpus.driver_cuda(_nvidia_smi()), "gpu_allocated": d.gpu_allocated,
            "gpu_node": gpus.on_the_node(devices, smi_list)}


def verdict(reports: list[dict], cfg, run_dir: Path | None) -> tuple[list[str], list[str]]:
    fatal, warn = gpus.node_problems(reports)
    if run_dir is not None:
        from pipeline.train.checkpoint import list_damaged

        warn += [f"{p}: a damaged checkpoint, set aside ({why}); never resumed from, never pruned"
                 for p, why in list_damaged(RunDir(run_dir).checkpoints)]
    r0 = reports[0]
    for r in reports:
        who = f"rank {r['rank']} on {r['host']}"
        if r["manifest"] != r0["manifest"]:
            fatal.append(f"{who}: {r['data_dir']}/manifest.json digest {r['manifest']} differs from rank 0's "
                         f"{r0['manifest']} ({r0['data_dir']}): another dataset, or another copy of it")
        elif r["manifest"].startswith("unreadable"):
            fatal.append(f"{who}: {r['data_dir']}/manifest.json {r['manifest']}")
        for k in ("python", "tensorflow", "keras", "horovod"):
            if r.get(k) != r0.get(k):
                fatal.append(f"{who}: {k} {r.get(k)} but rank 0 runs {r0.get(k)} (different environments across hosts)")
        if run_dir is not None:
            if not r["run_dir_writable"]:
                fatal.append(f"{who}: run directory {run_dir} is not writable ({r['run_dir_error']})")
            elif r["rank"] == 0 and r["free_bytes"] < r["need_bytes"]:
                fatal.append(f"{who}: {_mib(r['free_bytes'])} free where {run_dir} is, but checkpoint.keep + 1 = "
                             f"{cfg.checkpoint.keep + 1} checkpoints need {_mib(r['need_bytes'])}")
        try:  # the binding rule training applies (pipeline/runtime/gpus.py)
            gpus.choose([str(i) for i in range(r["gpus"])], r["local_rank"], r["local_size"], rank=r["rank"],
                        host=r["host"], environ={})
        except UserError as e:
            fatal.append(str(e))
        net = r["net"]
        bridges = [n for n in net["mpi"] + net["nccl"] if n.startswith(_LOCAL_ONLY[1:])]
        if bridges:
            warn.append(f"{who}: MPI/NCCL would use {', '.join(sorted(set(bridges)))}, a container or VM bridge; "
                        f"set OMPI_MCA_btl_tcp_if_include and NCCL_SOCKET_IFNAME to the cluster network")
        if len({x['host'] for x in reports}) > 1 and (not net["mpi"] or set(net["mpi"]) <= {"lo"}):
            warn.append(f"{who}: no interface but loopback for MPI, and the job spans hosts")
    return fatal, warn


def stack_line(r: dict) -> str:
    """The TensorFlow stack rank 0 runs, and how `make env` chooses it (docs/setup.md)."""
    request = r.get("tf_stack", "-")
    how = f"make env TF={request}" if request != "-" else "not a venv of make env (make env TF=2.15|2.17|2.18|system)"
    return f"stack (rank 0): TensorFlow {r.get('tensorflow', '?')} with Keras {r.get('keras', '?')} as tf.keras; {how}"


def _gpu_cell(r: dict) -> str:
    """The rank's GPU: its CUDA_VISIBLE_DEVICES entry, name, memory, TensorFlow's CUDA and the driver's."""
    if not r.get("gpu"):
        return "-"
    return " ".join(x for x in (r["gpu"], r.get("gpu_name"), r.get("gpu_memory"),
                                r.get("cuda_built") and f"CUDA {r['cuda_built']}",
                                r.get("driver_cuda") and f"driver CUDA {r['driver_cuda']}") if x)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _table(reports: list[dict], t1, t64, size: int, run_dir: Path | None) -> str:
    lines = ["rank  host              python   tensorflow  horovod  ops            nccl     mpi"
             "                                       manifest          gpus/local  mpi if      nccl if"
             + ("  run dir" if run_dir else "") + "  gpu"]
    for r in reports:
        net = r["net"]
        line = (f"{r['rank']:>4}  {r['host'][:16]:<16}  {r['python']:<7}  {r['tensorflow']:<10}  {r['horovod']:<7}  "
                f"{r['horovod_ops'][:13]:<13}  {r['nccl']:<7}  {r['mpi'][:40]:<40}  {r['manifest'][:16]:<16}  "
                f"{r['gpus']}/{r['local_size']:<9}  {','.join(net['mpi'])[:10] or '-':<10}  "
                f"{','.join(net['nccl'])[:10] or '-':<10}")
        if run_dir is not None:
            line += ("  writable, " + _mib(r["free_bytes"]) + " free" if r["run_dir_writable"]
                     else "  NOT writable")
        lines.append(line + "  " + _gpu_cell(r))

    def rate(t, n):
        if t is None:
            return "- (one rank)"
        bus = 2 * (size - 1) / size * n / t / 1e9  # bytes each rank sends and receives in a ring
        return f"{t * 1e3:.2f} ms ({bus:.2f} GB/s bus)"

    lines.append(f"allreduce over {size} rank(s): 1 MiB {rate(t1, 1 << 20)}; 64 MiB {rate(t64, 64 << 20)}")
    return "\n".join(lines)


# --- the command line (pipeline/cli.py dispatches) ---

def add_arguments(p) -> None:
    from pipeline.train.trainer import run_arguments

    run_arguments(p, what="doctor")
    p.add_argument("--system-json", metavar="FILE", help="also write MLCommons' system description of these "
                                                         "machines here (python -m mlperf_logging.system_desc_checker)")
    p.set_defaults(func=cli)


def cli(a) -> int:
    from pipeline import config

    return run(config.load(a.config, a.set or []), a.run_dir, system_json=a.system_json)
