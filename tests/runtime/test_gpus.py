"""Which GPU a rank uses, for every launcher binding, on hand-made device lists and
environments (pipeline/runtime/gpus.py). Nothing else is simulated: the functions are pure.
What each binding hands a rank, per SLURM's and CUDA's documentation: per-task binding leaves a
rank one device (device cgroups renumber it 0), a per-node allocation shows every rank all of
the node's GPUs, MIG instances appear as MIG- UUIDs."""

import pytest

from pipeline.errors import UserError
from pipeline.runtime.gpus import (allocated, choose, driver_cuda, driver_too_old, identity, memory, nccl_version,
                                   node_problems, on_the_node, shared, visible_entries)


def pick(env, local_rank, local_size, tf_sees=0):
    """What a rank keeps: from CUDA_VISIBLE_DEVICES when set, else from TensorFlow's count."""
    visible = visible_entries(env)
    listed = visible if visible is not None else [str(i) for i in range(tf_sees)]
    return choose(listed, local_rank, local_size, rank=local_rank, host="gpu01", environ=env)


@pytest.mark.parametrize("case, env, local_size, tf_sees, expect", [
    # srun --gpus-per-task=1 (or --gpu-bind=single:1): each of 4 tasks sees one device, "0".
    ("gpus-per-task", {"CUDA_VISIBLE_DEVICES": "0", "SLURM_GPUS_PER_TASK": "1", "SLURM_STEP_GPUS": "2"}, 4, 1,
     ["0", "0", "0", "0"]),
    # --gpu-bind=map_gpu:3,2,1,0 without device cgroups: each task sees its own index.
    ("map_gpu", {"CUDA_VISIBLE_DEVICES": "3"}, 4, 1, ["3", "3", "3", "3"]),
    # --gpus-per-node=4, no per-task binding: every task sees 0-3 and takes its local rank.
    ("gpus-per-node", {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_GPUS_ON_NODE": "4"}, 4, 4, ["0", "1", "2", "3"]),
    # mpirun on a 4-GPU node, nothing set: TensorFlow lists 4; local rank picks.
    ("mpirun", {}, 4, 4, ["0", "1", "2", "3"]),
    # More GPUs than ranks: the first local_size.
    ("more GPUs than ranks", {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 2, 4, ["4", "5"]),
    # A100 with MIG: the UUIDs of two instances, one per rank.
    ("MIG", {"CUDA_VISIBLE_DEVICES": "MIG-4f5e8a2c-1b3d-5e6f-8a9b-0c1d2e3f4a5b,MIG-9a8b7c6d-5e4f-3a2b-1c0d-e9f8a7b6c5d4"},
     2, 2, ["MIG-4f5e8a2c-1b3d-5e6f-8a9b-0c1d2e3f4a5b", "MIG-9a8b7c6d-5e4f-3a2b-1c0d-e9f8a7b6c5d4"]),
    # A login node or CPU partition: no GPU, nothing to pin.
    ("no GPU", {}, 2, 0, [None, None]),
    ("hidden", {"CUDA_VISIBLE_DEVICES": ""}, 2, 0, [None, None]),
    ("hidden with -1", {"CUDA_VISIBLE_DEVICES": "-1,0"}, 2, 0, [None, None]),
])
def test_each_binding_pins_one_gpu_per_rank(case, env, local_size, tf_sees, expect):
    assert [pick(env, r, local_size, tf_sees) for r in range(local_size)] == expect


def test_fewer_gpus_than_ranks_but_more_than_one_is_refused_naming_what_slurm_said():
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_JOB_GPUS": "0,1"}
    with pytest.raises(UserError) as e:
        pick(env, 0, 4)
    assert str(e.value) == ("rank 0 on gpu01: 4 ranks on this host but 2 GPUs visible (CUDA_VISIBLE_DEVICES=0,1, "
                            "SLURM_JOB_GPUS=0,1); two ranks would share a GPU: give each rank its own (srun "
                            "--gpus-per-task=1, or as many GPUs per node as ranks per node)")
    with pytest.raises(UserError, match="4 ranks on this host but 3 GPUs visible"):
        pick({}, 1, 4, tf_sees=3)


def test_visible_entries_follow_cuda():
    assert visible_entries({}) is None  # unset: every GPU of the node
    assert visible_entries({"CUDA_VISIBLE_DEVICES": "1, 0"}) == ["1", "0"]
    assert visible_entries({"CUDA_VISIBLE_DEVICES": "2,,3"}) == ["2"]  # CUDA stops at an invalid entry


def test_a_shared_gpu_is_found_and_renumbered_devices_are_not_mistaken_for_one():
    uuid = "GPU-8e0b6f1d-2c3a-4b5c-9d8e-7f6a5b4c3d2e"
    # Two ranks on one host given the same GPU (a wrapper exporting the same UUID to both).
    assert shared([(0, "gpu01", identity(uuid, True)), (1, "gpu01", identity(uuid, True)),
                   (2, "gpu02", identity(uuid, True))]) == [
        f"ranks 0, 1 on gpu01 would share GPU {uuid}: give each rank its own"]
    # No CUDA_VISIBLE_DEVICES: every rank numbers the node's GPUs alike, so equal indices clash.
    assert shared([(0, "a", identity("0", False)), (1, "a", identity("0", False))]) == [
        "ranks 0, 1 on a would share GPU index 0: give each rank its own"]
    # --gpus-per-task=1 with device cgroups: both ranks see "0", two different GPUs.
    assert shared([(0, "a", identity("0", True)), (1, "a", identity("0", True))]) == []
    assert shared([(0, "a", identity(None, False)), (1, "a", identity(None, False))]) == []  # CPUs


def test_what_says_a_job_was_given_gpus():
    assert allocated({}) is None and allocated({"CUDA_VISIBLE_DEVICES": ""}) is None
    assert allocated({"SLURM_JOB_GPUS": "0,1"}) == "SLURM_JOB_GPUS=0,1"
    assert allocated({"SLURM_STEP_GPUS": "", "GPU_DEVICE_ORDINAL": "3"}) == "GPU_DEVICE_ORDINAL=3"
    assert allocated({"CUDA_VISIBLE_DEVICES": "MIG-4f5e"}) == "CUDA_VISIBLE_DEVICES=MIG-4f5e"
    assert on_the_node(["nvidiactl", "nvidia-uvm", "nvidia0", "nvidia1"], []) == "2 /dev/nvidia device(s)"
    assert on_the_node([], ["GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-8e0b)"]) == "nvidia-smi lists 1 GPU(s)"
    assert on_the_node(["nvidiactl"], ["NVIDIA-SMI has failed because it couldn't communicate with the driver."]) is None


def node(host, **kw):
    return {"host": host, "gpu_allocated": None, "tf_gpus": 0, "horovod": "0.28.1", "horovod_ops": "mpi,gloo",
            "gpu_node": None, **kw}


def test_a_cpu_build_on_a_gpu_allocation_is_fatal_once_per_host():
    fatal, warn = node_problems([node("gpu01", gpu_allocated="SLURM_JOB_GPUS=0,1"),
                                 node("gpu01", gpu_allocated="SLURM_JOB_GPUS=0,1"), node("cpu01")])
    assert fatal == ["gpu01: the job was given GPUs (SLURM_JOB_GPUS=0,1) but TensorFlow sees none: a CPU build of "
                     "TensorFlow, or CUDA libraries missing (docs/setup.md)"] and warn == []


def test_horovod_without_nccl_on_a_gpu_node_is_fatal():
    fatal, _ = node_problems([node("gpu01", gpu_allocated="SLURM_STEP_GPUS=0", tf_gpus=1)])
    assert len(fatal) == 1 and "built without NCCL (ops mpi,gloo)" in fatal[0]
    assert node_problems([node("gpu01", gpu_allocated="SLURM_STEP_GPUS=0", tf_gpus=1,
                               horovod_ops="mpi,gloo,nccl")]) == ([], [])


def test_gpus_only_on_the_node_warn():
    fatal, warn = node_problems([node("gpu01", gpu_node="nvidia-smi lists 4 GPU(s)")])
    assert fatal == [] and warn == ["gpu01: nvidia-smi lists 4 GPU(s) but this job was given none: it trains on the "
                                    "CPU (ask for them with --gpus-per-task or --gpus-per-node)"]


SMI_HEADER = """Tue Dec  1 11:50:00 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
"""


def test_a_driver_older_than_tensorflows_cuda_is_fatal():
    assert driver_cuda(SMI_HEADER) == "12.4" and driver_cuda("") is None
    assert driver_too_old("11.8", "12.2") and not driver_too_old("12.0", "12.2") and not driver_too_old(None, "12.2")
    fatal, _ = node_problems([node("gpu01", gpu_allocated="SLURM_JOB_GPUS=0", tf_gpus=1, horovod_ops="mpi,gloo,nccl",
                                   driver_cuda="11.8", cuda_built="12.2")])
    assert fatal == ["gpu01: the driver supports CUDA 11.8 but TensorFlow was built for CUDA 12.2: a newer driver, "
                     "or a TensorFlow built for this one"]


# `nvidia-smi --query-gpu=index,uuid,memory.total --format=csv,noheader,nounits` on a 4-GPU
# H100 node, and `nvidia-smi -L` on an A100 split into MIG instances (formats from NVIDIA's
# nvidia-smi documentation).
QUERY = ("0, GPU-1d3f1e22-7c55-4b2e-9d61-2f1a0b6c8e01, 81559\n1, GPU-2e4a2f33-8d66-4c3f-ae72-3a2b1c7d9f12, 81559\n"
         "2, GPU-3f5b3a44-9e77-4d4a-bf83-4b3c2d8eaf23, 81559\n3, GPU-4a6c4b55-af88-4e5b-c094-5c4d3e9fb034, 81559\n")
MIG_L = ["GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77)",
         "  MIG 3g.20gb     Device  0: (UUID: MIG-4f5e8a2c-1b3d-5e6f-8a9b-0c1d2e3f4a5b)",
         "  MIG 2g.10gb     Device  1: (UUID: MIG-9a8b7c6d-5e4f-3a2b-1c0d-e9f8a7b6c5d4)"]


def test_the_ranks_gpu_memory_is_found_by_index_uuid_or_mig_profile():
    assert memory("2", QUERY, []) == "80 GiB"
    assert memory("GPU-4a6c4b55-af88-4e5b-c094-5c4d3e9fb034", QUERY, []) == "80 GiB"
    assert memory("MIG-9a8b7c6d-5e4f-3a2b-1c0d-e9f8a7b6c5d4", "", MIG_L) == "MIG 2g.10gb"
    assert memory("7", QUERY, []) is None  # not on this node's list: unknown, not a guess
    assert memory(None, QUERY, []) is None
    assert memory("0", "", []) is None  # no nvidia-smi


def test_nccl_version_codes_read_as_releases():
    assert nccl_version(21605) == "2.16.5"  # NCCL >= 2.9 codes: major*10000 + minor*100 + patch
    assert nccl_version(2408) == "2.4.8"  # before 2.9: major*1000 + minor*100 + patch
    assert nccl_version(0) is None and nccl_version(None) is None and nccl_version(False) is None


def test_xla_is_pointed_at_pips_cuda_unless_the_site_chose():
    from pipeline.runtime.gpus import xla_flags

    pip = "/venv/lib/python3.11/site-packages/nvidia/cuda_nvcc"
    assert xla_flags("", pip) == f"--xla_gpu_cuda_data_dir={pip}"
    assert xla_flags("--xla_gpu_autotune_level=2", pip) == f"--xla_gpu_autotune_level=2 --xla_gpu_cuda_data_dir={pip}"
    assert xla_flags("--xla_gpu_cuda_data_dir=/opt/cuda-12.4", pip) is None
    assert xla_flags("", None) is None  # no pip CUDA (a site toolkit): XLA searches as it does
