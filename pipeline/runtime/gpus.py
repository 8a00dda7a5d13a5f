"""Which GPU a rank uses: small pure functions of what the process sees (CUDA_VISIBLE_DEVICES,
how many GPUs TensorFlow lists, the local rank), so every launcher binding is tested on a
machine without GPUs (tests/runtime/test_gpus.py).

The bindings a rank meets, and what it does (docs/slurm.md):

- `srun --gpus-per-task=1`, `--gpu-bind=single:1`, `--gpu-bind=map_gpu:...`, a site's mpirun
  wrapper exporting one device per rank: the rank sees exactly one GPU, the one chosen for it,
  and uses it whatever its local rank.
- `--gpus-per-node=N` (or `--gres=gpu:N`) without a per-task binding, plain `mpirun` on a
  node: every rank sees the node's GPUs and takes entry `local_rank`.
- More than one GPU but fewer than the ranks on the host: two ranks would share one; refused.
- MIG: CUDA_VISIBLE_DEVICES lists MIG UUIDs; a process uses one MIG instance at most, so the
  list is narrowed the same way, to the rank's one entry.
"""

from __future__ import annotations

from pipeline.errors import UserError

# What SLURM sets about a job's or step's GPUs, named in the errors.
SLURM_GPU_VARS = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "GPU_DEVICE_ORDINAL", "SLURM_GPUS_ON_NODE",
                  "SLURM_GPUS_PER_TASK", "SLURM_GPUS_PER_NODE")


def visible_entries(environ) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as its entries (indices, GPU- or MIG- UUIDs); None when unset
    (every GPU of the node is visible). CUDA stops at the first invalid entry, so `-1` or an
    empty entry hides everything after it."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    entries = []
    for e in (x.strip() for x in value.split(",")):
        if not e or e.startswith("-"):
            break
        entries.append(e)
    return entries


def choose(visible: list[str], local_rank: int, local_size: int, *, rank: int, host: str,
           environ) -> str | None:
    """The entry of `visible` (the GPUs this process sees, in order) that this rank keeps, or
    None without GPUs: exactly one -> that one (the launcher pinned it); at least local_size
    -> entry local_rank; otherwise a UserError naming the rank, the host and what SLURM said."""
    if not visible:
        return None
    if len(visible) == 1:
        return visible[0]
    if len(visible) >= local_size:
        return visible[local_rank]
    said = ", ".join(f"{k}={environ[k]}" for k in ("CUDA_VISIBLE_DEVICES", *SLURM_GPU_VARS) if k in environ)
    raise UserError(f"rank {rank} on {host}: {local_size} ranks on this host but {len(visible)} GPUs visible"
                    + (f" ({said})" if said else "") + "; two ranks would share a GPU: give each rank its own "
                    "(srun --gpus-per-task=1, or as many GPUs per node as ranks per node)")


def identity(entry: str | None, visible_from_env: bool) -> str | None:
    """What names the chosen GPU across the ranks of a host, where the process can tell: a
    UUID always; an index only when every rank numbers the node's GPUs alike (no
    CUDA_VISIBLE_DEVICES: each sees all of them). A per-rank CUDA_VISIBLE_DEVICES of indices
    (device cgroups renumber from 0) names no GPU across ranks: None."""
    if entry is None:
        return None
    if entry.startswith(("GPU-", "MIG-")):
        return entry
    return None if visible_from_env else f"index {entry}"


def shared(chosen: list[tuple[int, str, str | None]]) -> list[str]:
    """One line per GPU that two or more ranks of a host chose: (rank, host, identity) per
    rank; identities of None are not compared."""
    users: dict[tuple[str, str], list[int]] = {}
    for rank, host, ident in chosen:
        if ident is not None:
            users.setdefault((host, ident), []).append(rank)
    return [f"ranks {', '.join(map(str, ranks))} on {host} would share GPU {ident}: give each rank its own"
            for (host, ident), ranks in sorted(users.items()) if len(ranks) > 1]


def allocated(environ) -> str | None:
    """What says this job or step was given GPUs, or None: SLURM's GPU variables, else a
    CUDA_VISIBLE_DEVICES that names a device (read before pinning narrows it)."""
    for k in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "GPU_DEVICE_ORDINAL"):
        if environ.get(k, "").strip():
            return f"{k}={environ[k]}"
    if visible_entries(environ):
        return f"CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']}"
    return None


def on_the_node(devices: list[str], smi_lines: list[str]) -> str | None:
    """What shows GPUs on this node whatever the job was given: /dev/nvidiaN device files, or
    `nvidia-smi -L` lines (GPU 0: ...); None when neither does."""
    listed = [x for x in smi_lines if x.startswith("GPU ")]
    if listed:
        return f"nvidia-smi lists {len(listed)} GPU(s)"
    numbered = [d for d in devices if d.removeprefix("nvidia").isdigit()]
    return f"{len(numbered)} /dev/nvidia device(s)" if numbered else None


def driver_cuda(smi_output: str) -> str | None:
    """The newest CUDA the driver supports, from `nvidia-smi`'s header (`CUDA Version: 12.4`)."""
    for line in smi_output.splitlines():
        if "CUDA Version:" in line:
            return line.split("CUDA Version:", 1)[1].split()[0].strip("|") or None
    return None


def driver_too_old(driver: str | None, built: str | None) -> bool:
    """True when the driver cannot run what TensorFlow was built for: an older CUDA major
    (within one major, CUDA's minor version compatibility covers it). Unknown: False."""
    try:
        return int(str(driver).split(".")[0]) < int(str(built).split(".")[0])
    except ValueError:
        return False


def memory(entry: str | None, query_csv: str, smi_lines: list[str]) -> str | None:
    """The rank's device memory, from `nvidia-smi --query-gpu=index,uuid,memory.total
    --format=csv,noheader,nounits` (MiB per GPU, matched by the rank's CUDA_VISIBLE_DEVICES
    entry: an index or a GPU UUID) or, for a MIG instance, its profile in `nvidia-smi -L`
    (`MIG 3g.40gb Device 0: (UUID: MIG-...)`). None when it cannot be told."""
    if not entry:
        return None
    if entry.startswith("MIG-"):
        for line in smi_lines:
            if entry in line and line.strip().startswith("MIG "):
                profile = line.split()[1]  # 3g.40gb
                return f"MIG {profile}"
        return None
    for row in query_csv.splitlines():
        cells = [c.strip() for c in row.split(",")]
        if len(cells) >= 3 and entry in (cells[0], cells[1]) and cells[2].isdigit():
            return f"{int(cells[2]) / 1024:.0f} GiB"
    return None


def nccl_version(code) -> str | None:
    """NCCL's version code as Horovod's nccl_built() gives it (NCCL_VERSION_CODE: 21605 for
    2.16.5 since NCCL 2.9, 2408 for 2.4.8 before) as dotted text; None without NCCL."""
    try:
        code = int(code)
    except (TypeError, ValueError):
        return None
    if code <= 0:
        return None
    if code >= 10000:
        return f"{code // 10000}.{code % 10000 // 100}.{code % 100}"
    return f"{code // 1000}.{code % 1000 // 100}.{code % 100}"


def node_problems(reports: list[dict]) -> tuple[list[str], list[str]]:
    """(fatal, warnings), one line per host, from each rank's report of `gpu_allocated`
    (allocated()), `tf_gpus` (the GPUs TensorFlow lists), `driver_cuda` and `cuda_built`,
    `horovod_ops` and `gpu_node` (on_the_node()): a CPU build on a GPU allocation, a driver
    older than TensorFlow's CUDA, Horovod without NCCL there, and GPUs the job left unused (a
    CPU job on a shared GPU node is legitimate: a warning)."""
    fatal: dict[str, str] = {}
    warn: dict[str, str] = {}
    for r in reports:
        host, given = r["host"], r.get("gpu_allocated")
        if given and not r.get("tf_gpus"):
            fatal.setdefault(host, f"{host}: the job was given GPUs ({given}) but TensorFlow sees none: a CPU build of "
                                   f"TensorFlow, or CUDA libraries missing (docs/setup.md)")
        elif r.get("tf_gpus") and driver_too_old(r.get("driver_cuda"), r.get("cuda_built")):
            fatal.setdefault(host, f"{host}: the driver supports CUDA {r['driver_cuda']} but TensorFlow was built for "
                                   f"CUDA {r['cuda_built']}: a newer driver, or a TensorFlow built for this one")
        elif (given or r.get("tf_gpus")) and r.get("horovod", "-") != "-" and \
                "nccl" not in r.get("horovod_ops", "").split(","):
            fatal.setdefault(host, f"{host}: GPUs, but Horovod was built without NCCL (ops {r.get('horovod_ops')}): "
                                   f"its allreduce would run on the CPU; rebuild it with HOROVOD_GPU_OPERATIONS=NCCL")
        elif not given and not r.get("tf_gpus") and r.get("gpu_node"):
            warn.setdefault(host, f"{host}: {r['gpu_node']} but this job was given none: it trains on the CPU "
                                  f"(ask for them with --gpus-per-task or --gpus-per-node)")
    return list(fatal.values()), list(warn.values())


def xla_flags(current: str, pip_cuda: str | None) -> str | None:
    """XLA_FLAGS pointing XLA at pip's CUDA compiler files (`nvidia/cuda_nvcc`: ptxas and
    libdevice, of the CUDA TensorFlow was built with), or None to leave XLA_FLAGS alone: none
    there, or the site chose its own directory. Without it TensorFlow 2.15 searches
    /usr/local/cuda first, whose ptxas may be older than the GPU needs (docs/gpu.md, XLA)."""
    if not pip_cuda or "--xla_gpu_cuda_data_dir" in current:
        return None
    return f"{current} --xla_gpu_cuda_data_dir={pip_cuda}".strip()
