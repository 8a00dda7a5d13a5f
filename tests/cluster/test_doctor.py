"""`pipeline doctor` under mpirun with 2 real ranks: a clean set-up passes; a rank that sees
another manifest, a read-only run directory and a file system too small for the checkpoints
each fail with exit 2 and one line naming the rank and host. The read-only and the small
file system are real tmpfs mounts in a private mount namespace (root)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, env, mpirun, require_root, require_tool

HOST = os.uname().nodename


def _doctor(data, run_dir):
    return [sys.executable, "-m", "pipeline", "doctor", "--set", f"data.dir={data}", "--run-dir", str(run_dir)]


def _fatal(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.startswith("doctor: rank")]


@pytest.mark.mpi
def test_a_clean_setup_passes_with_one_row_per_rank(tmp_path, small_dataset):
    r = mpirun(2, "doctor", "--set", f"data.dir={small_dataset}", "--run-dir", tmp_path / "run", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert len(rows) == 2 and all(HOST in row and "writable" in row for row in rows)
    assert "allreduce over 2 rank(s): 1 MiB" in r.stdout and "doctor: ok" in r.stdout
    assert not (tmp_path / "run").exists()  # it probes where the run would go, and leaves nothing


@pytest.mark.mpi
def test_a_rank_that_sees_another_manifest_fails(tmp_path, small_dataset):
    other = tmp_path / "other"
    other.mkdir()
    m = json.loads((small_dataset / "manifest.json").read_text())
    del m["splits"]["val"]  # another dataset under its own path on that rank
    (other / "manifest.json").write_text(json.dumps(m))
    mpi = require_tool("mpirun")
    r = subprocess.run([mpi, "-np", "1", *_doctor(small_dataset, tmp_path / "run"), ":",
                        "-np", "1", *_doctor(other, tmp_path / "run")], capture_output=True, text=True, env=env(),
                       cwd=ROOT, stdin=subprocess.DEVNULL, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(_fatal(r)) == 1 and _fatal(r)[0].startswith(f"doctor: rank 1 on {HOST}: {other}/manifest.json")


@pytest.mark.mpi
@pytest.mark.root
@pytest.mark.parametrize("mount,expect", [
    ("ro,size=1m", [f"doctor: rank 0 on {HOST}: run directory", f"doctor: rank 1 on {HOST}: run directory"]),
    ("size=64k", [f"doctor: rank 0 on {HOST}: 0.1 MiB free"]),
], ids=["read-only", "too-small"])
def test_an_unusable_run_directory_fails(tmp_path, small_dataset, mount, expect):
    require_root("mounting a tmpfs in a private mount namespace", "root")
    unshare, mpi = require_tool("unshare"), require_tool("mpirun")
    fs = tmp_path / "fs"
    fs.mkdir()
    argv = " ".join(map(str, [mpi, "-np", "2", *_doctor(small_dataset, fs / "run")]))
    r = subprocess.run([unshare, "-m", "sh", "-c", f"mount -t tmpfs -o {mount} tmpfs {fs} && exec {argv}"],
                       capture_output=True, text=True, env=env(), cwd=ROOT, stdin=subprocess.DEVNULL, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert [line[:len(e)] for line, e in zip(_fatal(r), expect)] == expect and len(_fatal(r)) == len(expect)


def _report(rank, host, **kw):
    r = {"rank": rank, "host": host, "local_rank": rank, "local_size": 2, "python": "3.11.7", "tensorflow": "2.15.1",
         "horovod": "0.28.1", "data_dir": "d", "manifest": "abc", "gpus": 0,
         "net": {"up": {"eth0": "10.0.0.1"}, "mpi": ["eth0"], "nccl": ["eth0"]},
         "run_dir_writable": True, "run_dir_error": "", "free_bytes": 1 << 30, "need_bytes": 1 << 20}
    r.update(kw)
    return r


def test_verdict_rules_on_reports():
    """The rules rank 0 applies to every rank's report: what is fatal (exit 2) and what only warns."""
    from pipeline import config
    from pipeline.cluster.doctor import verdict

    cfg = config.load(None)
    fatal, warn = verdict([_report(0, "a"), _report(1, "b")], cfg, None)
    assert fatal == [] and warn == []
    fatal, warn = verdict([_report(0, "a"), _report(1, "b", tensorflow="2.16.1", gpus=2, local_size=4,
                                                     net={"up": {}, "mpi": ["docker0"], "nccl": ["docker0"]})], cfg, None)
    assert [f.split(":")[0] for f in fatal] == ["rank 1 on b", "rank 1 on b"]
    assert "tensorflow 2.16.1 but rank 0 runs 2.15.1" in fatal[0] and "4 ranks on this host but 2 GPUs" in fatal[1]
    # Same TensorFlow, but one host's tf.keras is Keras 3 (tf-keras missing there)
    fatal, _ = verdict([_report(0, "a", keras="2.17.0"), _report(1, "b", keras="3.6.0")], cfg, None)
    assert fatal == ["rank 1 on b: keras 3.6.0 but rank 0 runs 2.17.0 (different environments across hosts)"]
    # srun --gpus-per-task=1: each rank sees the one GPU bound to it; not a problem.
    assert verdict([_report(0, "a", gpus=1), _report(1, "a", gpus=1)], cfg, None) == ([], [])
    assert len(warn) == 1 and "docker0" in warn[0] and "NCCL_SOCKET_IFNAME" in warn[0]
    fatal, warn = verdict([_report(0, "a", net={"up": {"lo": "127.0.0.1"}, "mpi": ["lo"], "nccl": ["lo"]}),
                            _report(1, "b")], cfg, None)
    assert fatal == [] and warn == ["rank 0 on a: no interface but loopback for MPI, and the job spans hosts"]


def test_verdict_on_gpu_nodes():
    """Hand-made reports of GPU hosts: what the doctor stops a job for, once per host."""
    from pipeline import config
    from pipeline.cluster.doctor import verdict

    cfg = config.load(None)
    cpu_build = dict(gpu_allocated="SLURM_JOB_GPUS=0,1", tf_gpus=0)
    fatal, warn = verdict([_report(0, "gpu01", **cpu_build), _report(1, "gpu01", **cpu_build)], cfg, None)
    assert len(fatal) == 1 and fatal[0].startswith("gpu01: the job was given GPUs (SLURM_JOB_GPUS=0,1) but TensorFlow "
                                                   "sees none") and warn == []
    no_nccl = dict(gpu_allocated="SLURM_STEP_GPUS=0", tf_gpus=1, gpus=1, horovod_ops="mpi,gloo")
    fatal, _ = verdict([_report(0, "gpu01", **no_nccl)], cfg, None)
    assert len(fatal) == 1 and "Horovod was built without NCCL" in fatal[0]
    fatal, warn = verdict([_report(0, "gpu01", gpu_node="nvidia-smi lists 4 GPU(s)")], cfg, None)
    assert fatal == [] and len(warn) == 1 and warn[0].startswith("gpu01: nvidia-smi lists 4 GPU(s) but this job")



def test_the_table_shows_each_ranks_gpu_its_memory_and_nccl():
    """A hand-made report of a GPU rank (no GPU here): its row names the device, memory, the
    CUDA TensorFlow was built for, the driver's, and Horovod's NCCL as a release."""
    from pipeline.cluster.doctor import _table

    gpu = _report(0, "gpu01", gpus=1, gpu="GPU-1d3f1e22", gpu_name="NVIDIA H100 80GB HBM3", gpu_memory="80 GiB",
                  cuda_built="12.2", driver_cuda="12.4", horovod_ops="mpi,gloo,nccl,cuda", nccl="2.16.5",
                  mpi="Open MPI v4.1.4")
    cpu = _report(1, "cpu01", horovod_ops="mpi,gloo", nccl="-", mpi="Open MPI v4.1.4")
    rows = _table([gpu, cpu], None, None, 2, None).splitlines()
    assert rows[1].endswith("GPU-1d3f1e22 NVIDIA H100 80GB HBM3 80 GiB CUDA 12.2 driver CUDA 12.4")
    assert rows[1].split()[6] == "2.16.5" and rows[2].endswith("  -")


def test_damaged_checkpoints_set_aside_are_listed(tmp_path):
    from pipeline import config
    from pipeline.cluster.doctor import verdict

    aside = tmp_path / "checkpoints" / "damaged-step-00000020"
    aside.mkdir(parents=True)
    (aside / "damaged.json").write_text(json.dumps({"step": 20, "reason": "state.index is missing"}))
    fatal, warn = verdict([_report(0, "a")], config.load(None), tmp_path)
    assert fatal == [] and warn == [f"{aside}: a damaged checkpoint, set aside (state.index is missing); never "
                                    f"resumed from, never pruned"]
