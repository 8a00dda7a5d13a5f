import json

import pytest

from pipeline.runtime.dist import Dist, rank_threads


def test_threads_follow_request_then_slurm_then_binding():
    # A 16-core node as the launcher leaves it: hand-made environment, core count and affinity.
    assert rank_threads(3, local_size=2, environ={"SLURM_CPUS_PER_TASK": "4"}, cores=16, bound=16) == 3
    assert rank_threads(0, local_size=8, environ={"SLURM_CPUS_PER_TASK": "4"}, cores=16, bound=16) == 4
    assert rank_threads(0, local_size=2, environ={"SLURM_CPUS_PER_TASK": "0"}, cores=16, bound=16) == 8
    # mpirun --bind-to core with 3 cores per rank: the binding, whatever the rank count.
    assert rank_threads(0, local_size=2, environ={}, cores=16, bound=3) == 3
    # Unbound: the node's cores split between its ranks; never fewer than one.
    assert rank_threads(0, local_size=4, environ={}, cores=16, bound=16) == 4
    assert rank_threads(0, local_size=40, environ={}, cores=16, bound=16) == 1


def test_single_process_context_needs_no_mpi():
    d = Dist()
    assert d.is_root and d.size == 1
    assert list(d.allreduce_sum([1.0, 2.0])) == [1.0, 2.0]
    assert d.broadcast_object({"a": 1}, name="x") == {"a": 1}
    assert d.allgather_object(5, name="y") == [5]
    d.barrier()
    tape = object()
    assert d.gradient_tape(tape) is tape
    grads, flag = [object(), None], object()
    assert d.average_in_step(grads, flag) == (grads, flag)  # one rank: nothing to average


def test_launcher_detection():
    from pipeline.runtime.dist import under_launcher

    assert not under_launcher({"PATH": "/bin", "SLURM_JOB_ID": "5"})
    for var in ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "HOROVOD_RANK"):
        assert under_launcher({var: "0"})


def test_launcher_size():
    from pipeline.runtime.dist import launcher_size

    assert launcher_size({"PATH": "/bin"}) is None
    assert launcher_size({"OMPI_COMM_WORLD_SIZE": "1"}) == 1
    assert launcher_size({"PMIX_RANK": "0", "SLURM_STEP_NUM_TASKS": "4"}) == 4


@pytest.mark.mpi
def test_one_rank_under_mpirun_runs_without_horovod(tmp_path, small_dataset):
    # mpirun -np 1: a job of one rank trains alone (no Horovod background thread).
    from conftest import mpirun

    r = mpirun(1, "train", "--run-dir", tmp_path / "run", "--set", f"data.dir={small_dataset}",
               "--set", "train.max_steps=5")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["backend"] == "local"
