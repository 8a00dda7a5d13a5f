"""slurm/train.sbatch against real SLURM daemons (munged, slurmctld, slurmd) started for
this session by slurm/local/up.sh: sbatch -> mpirun or srun -> 2 Horovod ranks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, mpirun, read_jsonl, read_steps, require_root

pytestmark = pytest.mark.slurm

PIPELINE = str(Path(sys.executable).parent / "pipeline")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    require_root("the SLURM tests start munged and slurmd, which", "slurm")
    state = tmp_path_factory.mktemp("slurm") / "cluster"
    up = subprocess.run(["bash", str(ROOT / "slurm/local/up.sh"), str(state)], capture_output=True, text=True)
    assert up.returncode == 0, up.stdout + up.stderr
    env = dict(os.environ, SLURM_CONF=str(state / "slurm.conf"), PIPELINE=PIPELINE, TF_CPP_MIN_LOG_LEVEL="2",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    yield env
    subprocess.run(["bash", str(ROOT / "slurm/local/down.sh"), str(state)], capture_output=True)


def sbatch(env, args, *, wait=True, cwd=ROOT, launcher="mpirun", output=None):
    cmd = ["sbatch", "--parsable", f"--output={output}"] + (["--wait"] if wait else []) + \
          [str(ROOT / "slurm/train.sbatch"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(env, LAUNCHER=launcher), cwd=cwd,
                          timeout=900)


def job(env, jid: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, env=env).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


@pytest.mark.parametrize("launcher", ["mpirun", "srun"])
def test_sbatch_trains_with_two_ranks(slurm, tmp_path, small_dataset, launcher):
    # Submitted from a directory with a site hook, as a cluster user's checkout would have.
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "site.sh").write_text('echo "site hook: module load would go here"\n')
    run, log = tmp_path / "run", tmp_path / "job.out"
    r = sbatch(slurm, ["--run-dir", run, "--set", f"data.dir={small_dataset}", "--set", "train.max_steps=30"],
               cwd=tmp_path, launcher=launcher, output=log)
    text = log.read_text()
    assert r.returncode == 0, r.stderr + text
    assert "site hook: module load would go here" in text
    assert "doctor: ok" in text and text.index("doctor: ok") < text.index("pipeline: 2 rank(s)")
    assert ("srun --mpi=pmix" if launcher == "srun" else "mpirun -np 2") in text
    for rank in (0, 1):
        assert [x["step"] for x in read_steps(run / "steps" / f"rank-{rank}.jsonl")] == list(range(1, 31))
    assert json.loads((run / "config.json").read_text())["ranks"] == 2
    a = subprocess.run([PIPELINE, "analyze", str(run), "--json"], capture_output=True, text=True)
    assert a.returncode == 0, a.stderr
    s = json.loads(a.stdout)["runs"][0]
    assert (s["ranks"], s["steps"], s["missing_ranks"], s["skipped_lines"]) == (2, 30, [], 0)


def test_preempted_job_checkpoints_requeues_and_finishes(slurm, tmp_path, small_dataset):
    run, log = tmp_path / "run", tmp_path / "job.out"
    args = ["--run-dir", run, "--set", f"data.dir={small_dataset}", "--set", "train.batch_size=32",
            "--set", "train.max_steps=250", "--set", "checkpoint.every_steps=1000"]
    r = sbatch(slurm, args, wait=False, output=log)
    assert r.returncode == 0, r.stderr
    jid = r.stdout.strip().split(";")[0]
    steps = run / "steps" / "rank-0.jsonl"
    deadline = time.monotonic() + 300  # hang guards: step 40 comes within seconds here
    while not (steps.exists() and steps.read_text().count("\n") >= 40):
        assert time.monotonic() < deadline, "the job never reached step 40"
        time.sleep(0.1)  # polling the step log, an observable condition
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], env=slurm, check=True)
    while job(slurm, jid).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.monotonic() < deadline + 300, f"job {jid} did not finish: {job(slurm, jid)}"
        time.sleep(0.2)
    info, text = job(slurm, jid), log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text)
    assert "USR1 received" in text and "requeuing job" in text and "restart 1" in text
    stop = int(re.search(r"stopped at step (\d+)", text).group(1))
    assert f"resuming after step {stop}" in text
    for rank in (0, 1):
        records = read_jsonl(run / "steps" / f"rank-{rank}.jsonl")
        log_steps = [x for x in records if x.get("kind") != "header"]
        assert [x["step"] for x in log_steps] == list(range(1, 251)), "no repeated or missing step"
        # The requeue shows in the log as a second process's header between steps stop and stop + 1.
        headers = [i for i, x in enumerate(records) if x.get("kind") == "header"]
        assert len(headers) == 2, records[:2]
        first, second = records[headers[0]], records[headers[1]]
        assert (first["start_step"], second["start_step"]) == (0, stop) and first["pid"] != second["pid"]
        assert records[headers[1] - 1]["step"] == stop and records[headers[1] + 1]["step"] == stop + 1
        assert log_steps[stop - 1]["time"] <= second["time"] <= log_steps[stop]["time"]


def test_invalid_config_fails_once_and_is_not_requeued(slurm, tmp_path, small_dataset):
    log = tmp_path / "job.out"
    r = sbatch(slurm, ["--run-dir", tmp_path / "run", "--set", f"data.dir={small_dataset}",
                       "--set", "train.bogus=1"], output=log)
    jid = r.stdout.strip().split(";")[0]
    text = log.read_text()
    assert r.returncode == 2, r.stderr + text
    assert "pipeline: error: --set train.bogus: unknown key" in text and "Traceback" not in text
    info = job(slurm, jid)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0"


def test_a_hung_job_fails_with_its_postmortem_in_the_job_log(slurm, tmp_path, small_dataset):
    """A rank hung in its data (debug.fault) stops the job on the step timeout, exit 76, not
    requeued, and the job log says which rank, host, phase and step (pipeline postmortem)."""
    log = tmp_path / "job.out"
    r = sbatch(slurm, ["--run-dir", tmp_path / "run", "--set", f"data.dir={small_dataset}",
                       "--set", "train.step_timeout_s=10", "--set", "debug.fault=rank=1,step=20,phase=data,kind=hang"],
               output=log)
    jid = r.stdout.strip().split(";")[0]
    text = log.read_text()
    assert r.returncode == 76, r.stderr + text
    assert f"first: rank 1 on {os.uname().nodename}, in data at step 20" in text
    info = job(slurm, jid)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0"


def test_bench_sbatch_scales_and_collects_for_analyze(slurm, tmp_path, small_dataset):
    out, log = tmp_path / "bench", tmp_path / "bench.out"
    r = subprocess.run(["sbatch", "--parsable", "--wait", f"--output={log}", str(ROOT / "slurm/bench.sbatch"),
                        "--set", f"data.dir={small_dataset}"], capture_output=True, text=True, cwd=ROOT,
                       env=dict(slurm, OUT=str(out), STEPS="30"), timeout=900)
    assert r.returncode == 0, r.stderr + log.read_text()
    assert sorted(p.name for p in out.glob("ranks-*")) == ["ranks-1", "ranks-2"]
    result = json.loads((out / "analyze.json").read_text())
    assert [row["ranks"] for row in result["scaling"]] == [1, 2]
    assert all(run["steps"] == 30 for run in result["runs"])
    assert (out / "report.html").stat().st_size > 10_000
    assert "== scaling" in log.read_text()


def _wait_for_jobs(env, job_ids: list[str], timeout: float = 600.0) -> None:
    """Polls squeue until none of the jobs (arrays included) is queued or running. The deadline
    is a hang guard, not a speed check: these jobs take seconds here."""
    deadline = time.monotonic() + timeout
    while True:
        q = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i"], capture_output=True,
                           text=True, env=env)
        if q.returncode == 0 and not q.stdout.strip():
            return
        assert time.monotonic() < deadline, f"jobs {job_ids} still queued or running: {q.stdout}"
        time.sleep(0.5)  # polling SLURM's queue, an observable condition


def test_sweep_submits_one_array_per_rank_count_and_ranks_the_points(slurm, tmp_path, small_dataset):
    """pipeline sweep on the real cluster: one knob x two values x ranks 1,2 -> two job arrays
    through train.sbatch, then the leaderboard job after them, with sacct's figures; the same
    command again submits nothing; a point made to fail (debug.fault) shows as failed with its
    reason while the others are ranked."""
    out = tmp_path / "sweep"
    env = dict(slurm, DOCTOR="0")  # the pre-flight check has its own test above
    base = [PIPELINE, "sweep", "--config", str(ROOT / "configs/default.yaml"), "--out", str(out),
            "--set", f"data.dir={small_dataset}", "--set", "train.max_steps=60", "--set", "log.progress_every_s=3600",
            "--target", "val_accuracy>=0.3"]
    cmd = base + ["--grid", "train.batch_size=32,64", "--ranks", "1,2"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    manifest = json.loads((out / "sweep.json").read_text())
    arrays = manifest["submissions"]
    assert sorted(s["ranks"] for s in arrays) == [1, 2] and all(len(s["points"]) == 2 for s in arrays)
    assert r.stdout.count("--array=0-1 ") == 2 and "leaderboard job" in r.stdout
    _wait_for_jobs(env, [s["job_id"] for s in arrays] + [manifest["leaderboard_job"]])

    board = json.loads((out / "leaderboard.json").read_text())  # written by the analysis job
    assert len(board["rows"]) == 4 and {row["state"] for row in board["rows"]} == {"finished"}
    assert board["accounting"].startswith("sacct")
    for row in board["rows"]:
        a = row["sacct"]
        assert a["state"] == "COMPLETED" and a["exit_code"] == "0:0" and a["elapsed_s"] > 0 and a["nodes"]
        assert row["throughput_samples_per_s"] > 0 and row["time_to_target_s"] is not None
    times = [row["time_to_target_s"] for row in board["rows"]]
    assert times == sorted(times) and any(row["pareto"] for row in board["rows"])
    assert {row["ranks"] for row in board["rows"] if row["scaling_efficiency"] == 1.0} == {1}
    assert "Pareto front" in (out / "leaderboard.txt").read_text() and (out / "leaderboard.html").exists()
    steps_before = {p: p.stat().st_mtime_ns for p in out.glob("*/steps/rank-*.jsonl")}

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert again.returncode == 0 and "4 finished); 0 to run" in again.stdout and "nothing to submit" in again.stdout
    assert len(json.loads((out / "sweep.json").read_text())["submissions"]) == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/steps/rank-*.jsonl")} == steps_before

    # A value with commas comes from a grid file; this point exits on purpose at step 5.
    grid = tmp_path / "grid.yaml"
    grid.write_text("train.batch_size: [32]\ndebug.fault: ['rank=0,step=5,phase=data,kind=exit']\n")
    f = subprocess.run(base + ["--grid-file", str(grid), "--ranks", "1"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)
    assert f.returncode == 0, f.stdout + f.stderr
    manifest = json.loads((out / "sweep.json").read_text())
    _wait_for_jobs(env, [manifest["submissions"][-1]["job_id"], manifest["leaderboard_job"]])
    board = json.loads((out / "leaderboard.json").read_text())
    failed = [row for row in board["rows"] if row["state"] == "failed"]
    assert len(board["rows"]) == 5 and len(failed) == 1 and "debug.fault" in board["knobs_that_differ"]
    assert failed[0]["knobs"]["debug.fault"] == "rank=0,step=5,phase=data,kind=exit"
    assert "exit 70:0" in failed[0]["why"] and "in data at step 5" in failed[0]["why"], failed[0]
    assert failed[0]["time_to_target_s"] is None and board["rows"][-1] is failed[0]
    st = subprocess.run([PIPELINE, "sweep", "--status", str(out)], capture_output=True, text=True, env=env)
    assert "4 finished, 1 failed" in st.stdout and "failed    train.batch_size=32,debug.fault=" in st.stdout


def test_a_suspended_job_resumes_and_finishes_as_if_never_stopped(slurm, tmp_path, small_dataset):
    """`scontrol suspend` stops every task of the job (SIGSTOP) for three step timeouts, then
    `scontrol resume` continues them: the job completes, every step logged once, no
    post-mortem, the suspension on one step of each rank's log and left out of analyze's
    figures, and the final checkpoint equals an uninterrupted run's (train.deterministic)."""
    steps, timeout_s, suspend_s = 1500, 10, 30
    common = ["--set", f"data.dir={small_dataset}", "--set", "train.batch_size=32", "--set", "train.deterministic=true",
              "--set", f"train.max_steps={steps}", "--set", f"train.step_timeout_s={timeout_s}",
              "--set", "train.epochs=20", "--set", "checkpoint.every_steps=500"]
    run, log = tmp_path / "run", tmp_path / "job.out"
    r = sbatch(slurm, ["--run-dir", run, *common], wait=False, output=log)
    assert r.returncode == 0, r.stderr
    jid = r.stdout.strip().split(";")[0]
    step_log = run / "steps" / "rank-1.jsonl"
    deadline = time.monotonic() + 300  # hang guards: step 100 comes within seconds here
    while not (step_log.exists() and step_log.read_text().count("\n") >= 100):
        assert time.monotonic() < deadline, f"the job never reached step 100: {job(slurm, jid)}"
        time.sleep(0.1)  # polling the step log, an observable condition
    t_suspend = time.time()
    subprocess.run(["scontrol", "suspend", jid], env=slurm, check=True)
    assert job(slurm, jid)["JobState"] == "SUSPENDED"
    time.sleep(suspend_s)  # the length of the suspension itself
    subprocess.run(["scontrol", "resume", jid], env=slurm, check=True)
    while job(slurm, jid).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.monotonic() < deadline + 600, f"job {jid} did not finish: {job(slurm, jid)}"
        time.sleep(0.2)
    t_end = time.time()
    info, text = job(slurm, jid), log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", (info, text)
    assert not (run / "postmortem").exists(), text
    for rank in (0, 1):
        logged = read_steps(run / "steps" / f"rank-{rank}.jsonl")
        assert [x["step"] for x in logged] == list(range(1, steps + 1)), "no repeated or missing step"
        marked = [x for x in logged if "suspended_s" in x]
        # The rank's own count of the time it did not run, within the test's own clock.
        assert len(marked) == 1 and 0 < marked[0]["suspended_s"] <= t_end - t_suspend, marked
    a = json.loads(subprocess.run([PIPELINE, "analyze", str(run), "--json"], capture_output=True, text=True).stdout)
    s = a["runs"][0]
    # The time the job stood still is in no figure (it may fall inside a step, or in an
    # evaluation or save, which no step's time includes): every step analyze counts is far
    # shorter than the stop the ranks measured.
    assert s["suspended_steps"] == 1 and s["step_s"]["max"] < marked[0]["suspended_s"] / 2, (s["step_s"], marked)
    straight = tmp_path / "straight"
    ref = mpirun(2, "train", "--run-dir", straight, *common, timeout=900)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    d = [subprocess.run([PIPELINE, "checkpoint", "digest", str(x)], capture_output=True, text=True).stdout
         for x in (run, straight)]
    assert d[0] == d[1] and d[0].strip(), d
