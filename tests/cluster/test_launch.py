"""The launcher command for allocations this machine cannot have: built from a fake SLURM
environment (a second node cannot be started here)."""

import pytest

from pipeline.cluster.launch import command, tasks_per_node
from pipeline.errors import UserError

TWO_NODES = {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_NTASKS": "4",
             "SLURM_CPUS_PER_TASK": "8", "PATH": "/opt/venv/bin:/usr/bin", "NCCL_IB_DISABLE": "0",
             "HOROVOD_FUSION_THRESHOLD": "67108864", "HOME": "/home/u", "SECRET_TOKEN": "x"}


def test_tasks_per_node():
    assert tasks_per_node("2(x2)") == [2, 2]
    assert tasks_per_node("3,2(x2),1") == [3, 2, 2, 1]
    with pytest.raises(UserError):
        tasks_per_node("two")


def test_mpirun_for_two_nodes_four_tasks():
    cmd = command("mpirun", TWO_NODES, ["gpu01", "gpu02"], ["pipeline", "train", "--run-dir", "runs/x"])
    assert cmd[:9] == ["mpirun", "-np", "4", "--host", "gpu01:2,gpu02:2", "--map-by", "slot:PE=8",
                       "--bind-to", "core"]
    passed = {cmd[i + 1] for i, a in enumerate(cmd) if a == "-x"}
    assert passed == {"PATH", "NCCL_IB_DISABLE", "HOROVOD_FUSION_THRESHOLD", "SLURM_CPUS_PER_TASK"}
    assert cmd[-4:] == ["pipeline", "train", "--run-dir", "runs/x"]


def test_site_binding_policy_replaces_core_binding():
    # A site (or the simulated hosts) that sets OpenMPI's binding policy keeps it: mpirun reads
    # it from the environment, and no --bind-to on the command line overrides it.
    cmd = command("mpirun", dict(TWO_NODES, OMPI_MCA_hwloc_base_binding_policy="none"), ["gpu01", "gpu02"], ["p"])
    assert cmd[:7] == ["mpirun", "-np", "4", "--host", "gpu01:2,gpu02:2", "--map-by", "slot"]
    assert "--bind-to" not in cmd


def test_srun_uses_pmix():
    cmd = command("srun", TWO_NODES, ["gpu01", "gpu02"], ["pipeline", "train"])
    assert cmd == ["srun", "--mpi=pmix", "--ntasks=4", "--nodes=2", "--cpus-per-task=8", "--kill-on-bad-exit=1",
                   "pipeline", "train"]


def test_fewer_tasks_fill_nodes_in_order():
    # bench.sbatch's scaling runs: 1, 2 and 3 of a 2-node x 2-task allocation.
    hosts = ["gpu01", "gpu02"]
    assert command("mpirun", TWO_NODES, hosts, ["p"], ntasks=1)[:5] == ["mpirun", "-np", "1", "--host", "gpu01:1"]
    assert command("mpirun", TWO_NODES, hosts, ["p"], ntasks=3)[:5] == ["mpirun", "-np", "3", "--host",
                                                                          "gpu01:2,gpu02:1"]
    assert command("srun", TWO_NODES, hosts, ["p"], ntasks=2)[2:4] == ["--ntasks=2", "--nodes=1"]
    with pytest.raises(UserError, match="only 4 tasks"):
        command("mpirun", TWO_NODES, hosts, ["p"], ntasks=5)


def test_inconsistent_allocation_and_unknown_launcher():
    with pytest.raises(UserError, match="2 nodes but the node list has 1"):
        command("mpirun", TWO_NODES, ["gpu01"], ["p"])
    with pytest.raises(UserError, match="LAUNCHER must be"):
        command("aprun", TWO_NODES, ["gpu01", "gpu02"], ["p"])


def test_hostfile_two_hosts_two_slots(tmp_path):
    from pipeline.cluster.launch import hostfile

    hf = tmp_path / "hostfile"
    hf.write_text("# two hosts\nnode-a slots=2\nnode-b slots=2 max_slots=4\n")
    hosts, counts = hostfile(str(hf))
    assert (hosts, counts) == (["node-a", "node-b"], [2, 2])
    cmd = command("mpirun", {"HOROVOD_CYCLE_TIME": "1"}, hosts, ["p"], counts=counts)
    assert cmd[:5] == ["mpirun", "-np", "4", "--host", "node-a:2,node-b:2"] and cmd[-3:] == ["-x", "HOROVOD_CYCLE_TIME", "p"]
    hf.write_text("node-a slots=two\n")
    with pytest.raises(UserError, match="hostfile:1: expected"):
        hostfile(str(hf))
