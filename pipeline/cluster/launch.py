"""The launcher command for a SLURM allocation, built from SLURM's variables.

slurm/train.sbatch asks for it (`pipeline slurm command -- PROGRAM...`), so the node list,
ranks per node, core binding and environment pass-through are decided here, in code that
is tested for allocations this machine cannot have (several nodes).
"""

from __future__ import annotations

import re
import subprocess

from pipeline.errors import UserError

# Variables mpirun must carry to ranks on other nodes (it copies the whole environment only
# to local ones). Prefixes: every variable starting with one of these is passed.
PASS_PREFIXES = ("HOROVOD_", "NCCL_", "TF_", "OMP_", "HDF5_", "PIPELINE_", "CUDA_")
PASS_NAMES = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", "SLURM_CPUS_PER_TASK")


def tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE ('2(x3),1') as one count per node ([2, 2, 2, 1])."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise UserError(f"SLURM_TASKS_PER_NODE: cannot parse {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def expand_hostnames(nodelist: str) -> list[str]:
    """SLURM_JOB_NODELIST expanded by `scontrol show hostnames` (SLURM's own parser)."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def first_tasks(hostnames: list[str], counts: list[int], ntasks: int) -> tuple[list[str], list[int]]:
    """The nodes and per-node counts of the first `ntasks` tasks, filling nodes in order (a
    scaling run at fewer ranks than the allocation has)."""
    hosts, used, left = [], [], ntasks
    for h, c in zip(hostnames, counts):
        if left <= 0:
            break
        hosts.append(h)
        used.append(min(c, left))
        left -= used[-1]
    return hosts, used


def hostfile(path: str) -> tuple[list[str], list[int]]:
    """Hosts and slots from an OpenMPI-style hostfile (`host slots=N` per line, # comments)."""
    hosts, counts = [], []
    try:
        lines = open(path).read().splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read the hostfile ({e.strerror})") from None
    for n, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)(?:\s+slots\s*=\s*(\d+))?(?:\s+max_slots\s*=\s*\d+)?", line)
        if not m:
            raise UserError(f"{path}:{n}: expected 'HOST slots=N', got {line!r}")
        hosts.append(m.group(1))
        counts.append(int(m.group(2) or 1))
    if not hosts:
        raise UserError(f"{path}: no hosts in the hostfile")
    return hosts, counts


def command(launcher: str, env: dict, hostnames: list[str], program: list[str], ntasks: int = 0,
            counts: list[int] | None = None) -> list[str]:
    """The command that starts one rank of `program` per SLURM task (or on the first
    `ntasks` tasks of the allocation). `counts`: ranks per host when they come from a
    hostfile rather than SLURM_TASKS_PER_NODE."""
    if not program:
        raise UserError("no program to launch (give it after --)")
    from_hostfile = counts is not None
    if not from_hostfile:
        counts = tasks_per_node(env.get("SLURM_TASKS_PER_NODE", "1"))
    elif launcher == "srun":
        raise UserError("a hostfile is for mpirun; srun takes its hosts from the SLURM allocation")
    if len(counts) != len(hostnames):
        raise UserError(f"SLURM_TASKS_PER_NODE gives {len(counts)} nodes but the node list has {len(hostnames)}")
    total = sum(counts) if from_hostfile else int(env.get("SLURM_NTASKS") or sum(counts))
    if ntasks > total:
        raise UserError(f"--ntasks {ntasks}: the allocation has only {total} tasks")
    if ntasks:
        hostnames, counts = first_tasks(hostnames, counts, ntasks)
    ntasks = ntasks or total
    cpus = int(env.get("SLURM_CPUS_PER_TASK") or 1)
    if launcher == "srun":
        # PMIx lets Horovod's MPI get its ranks from SLURM directly, no mpirun daemons.
        return ["srun", "--mpi=pmix", f"--ntasks={ntasks}", f"--nodes={len(hostnames)}", f"--cpus-per-task={cpus}",
                "--kill-on-bad-exit=1", *program]
    if launcher != "mpirun":
        raise UserError(f"LAUNCHER must be mpirun or srun, got {launcher!r}")
    cmd = ["mpirun", "-np", str(ntasks), "--host", ",".join(f"{h}:{n}" for h, n in zip(hostnames, counts))]
    if env.get("OMPI_MCA_hwloc_base_binding_policy"):
        # The site (or the simulated hosts) chose the binding: mpirun reads it from there.
        cmd += ["--map-by", "slot"]
    else:
        # One rank per task, each bound to its cpus-per-task cores, as SLURM allotted them.
        cmd += ["--map-by", f"slot:PE={cpus}", "--bind-to", "core"]
    for name in sorted(env):
        if name in PASS_NAMES or name.startswith(PASS_PREFIXES):
            cmd += ["-x", name]
    return cmd + list(program)


# --- the command line (pipeline/cli.py dispatches) ---

def add_arguments(p) -> None:
    import argparse

    p.add_argument("--launcher", default="mpirun", choices=["mpirun", "srun"])
    p.add_argument("--ntasks", type=int, default=0, help="use the first N tasks only (default: all)")
    p.add_argument("--hostfile", help="hosts and slots from this OpenMPI hostfile instead of SLURM's variables")
    p.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM ARGS...")
    p.set_defaults(func=cli)


def cli(a) -> int:
    import os
    import sys

    env = dict(os.environ)
    program = a.program[1:] if a.program[:1] == ["--"] else a.program
    if a.hostfile:
        hosts, counts = hostfile(a.hostfile)
        cmd = command(a.launcher, env, hosts, program, a.ntasks, counts=counts)
    else:
        if "SLURM_JOB_NODELIST" not in env:
            raise UserError("not inside a SLURM allocation (SLURM_JOB_NODELIST is not set); give --hostfile")
        cmd = command(a.launcher, env, expand_hostnames(env["SLURM_JOB_NODELIST"]), program, a.ntasks)
    # NUL-separated, so the batch script can run it with any arguments intact (mapfile -d '').
    sys.stdout.write("\0".join(cmd) + "\0")
    return 0
