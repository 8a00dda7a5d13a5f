"""pipeline sweep's parts that need no cluster: the grid, the points' names and states, the
leaderboard's ranking, and --local runs (the SLURM path: tests/cluster/test_slurm.py)."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, pipeline

from pipeline.cluster import leaderboard, sweep, sweepstate
from pipeline.errors import UserError


def test_grid_values_are_yaml_and_a_grid_file_carries_commas(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text("debug.fault: ['', 'rank=0,step=5,phase=data,kind=exit']\n")
    g = sweep.parse_grid(["train.batch_size=32,64", "train.metrics=[mae],[mse]"], str(f))
    assert g == {"debug.fault": ["", "rank=0,step=5,phase=data,kind=exit"], "train.batch_size": [32, 64],
                 "train.metrics": [["mae"], ["mse"]]}
    pts = sweep.points(g, [1, 2], 2)
    assert len(pts) == 2 * 2 * 2 * 2 * 2
    names = [p.name for p in pts]
    assert names[0] == "debug.fault=empty,train.batch_size=32,train.metrics=mae,ranks=1,rep=0"
    assert "debug.fault=rank_0_step_5_phase_data_kind_exit,train.batch_size=64,train.metrics=mse,ranks=2,rep=1" \
        in names
    assert pts[0].sets() == ["debug.fault=", "train.batch_size=32", "train.metrics=[mae]"]
    for bad, msg in ((["train.lr"], "expected KEY=V1,V2"), (["a=1,1"], "given twice"),
                     (["a=1", "a=2"], "the key is given twice"), ([], "at least one --grid")):
        with pytest.raises(UserError, match=msg):
            sweep.parse_grid(bad, None)
    with pytest.raises(UserError, match="give the same directory name"):
        sweep.points({"model.name": ["a/b", "a_b"]}, [1], 1)


def _rank_files(d, *statuses):
    (d / "ranks").mkdir(parents=True)
    for i, s in enumerate(statuses):
        (d / "ranks" / f"rank-{i}.json").write_text(json.dumps({"status": s}))
    (d / "config.json").write_text(json.dumps({"ranks": len(statuses)}))


def test_point_states_from_the_run_directory(tmp_path):
    assert sweepstate.point_state(tmp_path / "new") == ("pending", "")
    _rank_files(tmp_path / "done", "finished", "finished")
    assert sweepstate.point_state(tmp_path / "done")[0] == "finished"
    _rank_files(tmp_path / "pre", "stopped", "stopped")
    assert sweepstate.point_state(tmp_path / "pre")[0] == "stopped"
    _rank_files(tmp_path / "dead", "finished", "running")
    (tmp_path / "dead" / sweepstate.EXIT_FILE).write_text(json.dumps({"exit_code": 137}))
    (tmp_path / "dead" / sweepstate.LOG_FILE).write_text("...\npipeline: error: something broke\n")
    state, why = sweepstate.point_state(tmp_path / "dead")
    assert state == "failed" and why == "exit 137: pipeline: error: something broke"
    assert sweepstate.point_state(tmp_path / "dead", {"dead": "queued"}) == ("queued", "")


def test_leaderboard_groups_repeats_scales_against_one_rank_and_marks_the_front():
    def row(bs, ranks, thr, ttt, nodes=1, rep=0):
        return {"point": f"bs={bs},ranks={ranks},rep={rep}", "knobs": {"bs": bs}, "ranks": ranks, "repeat": rep,
                "state": "finished", "why": "", "throughput_samples_per_s": thr, "step_p50_s": 0.01,
                "data_wait_fraction": 0.01, "final_metric": 0.9, "time_to_target_s": ttt,
                "node_hours_to_target": None if ttt is None else ttt * nodes / 3600, "nodes": nodes, "sacct": None}
    rows = leaderboard.group_repeats([row(32, 1, 100, 10), row(32, 1, 120, 14, rep=1), row(32, 2, 160, 8, nodes=2),
                               row(64, 1, 90, 9), row(64, 2, 150, None, nodes=2)])
    leaderboard.mark_efficiency(rows)
    leaderboard.mark_front(rows)
    by = {(r["knobs"]["bs"], r["ranks"]): r for r in rows}
    rep = by[(32, 1)]
    assert rep["repeats"] == 2 and rep["throughput_samples_per_s"] == {"value": 110, "min": 100, "max": 120, "of": 2}
    assert by[(32, 2)]["scaling_efficiency"] == pytest.approx(160 / (2 * 110))
    # Front: 64x1 (9 s, 9 node-s) and 32x2 (8 s, 16 node-s); 32x1 (12 s, 12 node-s) is beaten by 64x1.
    assert {k for k, r in by.items() if r["pareto"]} == {(64, 1), (32, 2)}
    assert by[(64, 2)]["pareto"] is False and by[(64, 2)]["time_to_target_s"] is None
    assert leaderboard.slurm_seconds("1-00:00:02") == 86402 and leaderboard.slurm_seconds("01:02.500") == 62.5
    assert leaderboard.slurm_rss_mb("2048K") == 2 and leaderboard.slurm_rss_mb("") is None


@pytest.mark.mpi
def test_local_sweep_runs_each_point_once_and_writes_the_leaderboard(tmp_path, small_dataset):
    out = tmp_path / "sw"
    args = ["sweep", "--config", ROOT / "configs" / "default.yaml", "--out", out, "--grid", "train.batch_size=32,64",
            "--ranks", "1", "--set", f"data.dir={small_dataset}", "--set", "train.max_steps=40",
            "--set", "log.progress_every_s=3600", "--target", "val_accuracy>=0.3", "--local"]
    r = pipeline(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 pending); 2 to run" in r.stdout and r.stdout.count(": finished in") == 2
    board = json.loads((out / "leaderboard.json").read_text())
    assert [row["state"] for row in board["rows"]] == ["finished", "finished"]
    assert board["accounting"].startswith("none: the points ran here")
    assert board["knobs_that_differ"] == ["train.batch_size"]
    for name in ("train.batch_size=32,ranks=1", "train.batch_size=64,ranks=1"):
        cfg = json.loads((out / name / "config.json").read_text())
        assert cfg["train"]["batch_size"] == int(name.split("=")[1].split(",")[0]) and cfg["train"]["max_steps"] == 40
    again = pipeline(*args)
    assert "2 finished); 0 to run" in again.stdout and ": finished in" not in again.stdout
    j = pipeline("analyze", "--leaderboard", out, "--json")
    assert j.returncode == 0 and [row["ranks"] for row in json.loads(j.stdout)["rows"]] == [1, 1]
    bad = pipeline("sweep", "--config", ROOT / "configs" / "default.yaml", "--out", tmp_path / "x", "--grid",
                   "train.batch_size=32,-1", "--local")
    assert bad.returncode == 2 and "point train.batch_size=-1,ranks=1: train.batch_size must be > 0" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_the_analysis_job_gets_the_arrays_partition_account_and_qos():
    assert sweep.where_to_run(["-p", "gpu", "--time=02:00:00", "--account=x", "-Aproj", "--qos", "high",
                                "--mem=4G"]) == ["-p", "gpu", "--account=x", "-Aproj", "--qos", "high"]


def test_a_point_that_ran_keeps_its_config_when_the_settings_change(tmp_path, monkeypatch):
    """Only the files are checked: no training runs (a point is made to look finished), and
    SLURM is made to look absent so that nothing is submitted."""
    import io

    monkeypatch.setattr(sweep.shutil, "which", lambda name: None)
    out = tmp_path / "sw"
    args = dict(config=str(ROOT / "configs" / "default.yaml"), out=str(out), grid_specs=["train.batch_size=32,64"],
                grid_file=None, ranks=[1], local=False)
    first = io.StringIO()
    with pytest.raises(UserError, match="sbatch not found"):
        sweep.run(sets=["train.max_steps=10"], log=first, **args)  # writes the points, then wants SLURM
    done = out / "train.batch_size=32,ranks=1"
    _rank_files(done, "finished")
    before = (done / sweepstate.POINT_CONFIG).read_text()
    second = io.StringIO()
    with pytest.raises(UserError, match="sbatch not found"):
        sweep.run(sets=["train.max_steps=20"], log=second, **args)
    assert (done / sweepstate.POINT_CONFIG).read_text() == before  # ran with max_steps 10: kept
    pending = json.loads((out / "train.batch_size=64,ranks=1" / sweepstate.POINT_CONFIG).read_text())
    assert pending["train"]["max_steps"] == 20  # not run yet: the new settings
    assert "train.batch_size=32,ranks=1 already ran with another config" in second.getvalue()


def test_the_arrays_run_the_projects_train_sbatch():
    assert sweep.sbatch_script() == ROOT / "slurm" / "train.sbatch" and sweep.sbatch_script().is_file()
