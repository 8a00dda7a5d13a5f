"""The run directory's names (pipeline/rundir.py): the paths users and analysis rely on."""

from pipeline.rundir import RUN_FACTS, STEP_FIELDS, STEP_NEEDED, RunDir


def test_paths_of_a_run_directory(tmp_path):
    run = RunDir(tmp_path / "r")
    assert not (tmp_path / "r").exists()  # naming paths creates nothing
    assert run.config.name == "config.json" and run.metrics.name == "metrics.jsonl"
    assert run.step_log(3).relative_to(run.path).as_posix() == "steps/rank-3.jsonl"
    assert run.rank_file(1).relative_to(run.path).as_posix() == "ranks/rank-1.json"
    assert run.timeline(0).name == "timeline.json" and run.timeline(40).name == "timeline-from-40.json"


def test_step_logs_are_found_by_rank_number_and_others_ignored(tmp_path):
    run = RunDir(tmp_path)
    run.steps_dir.mkdir()
    for name in ("rank-10.jsonl", "rank-2.jsonl", "rank-x.jsonl", "notes.txt"):
        (run.steps_dir / name).write_text("")
    assert sorted(run.step_logs()) == [2, 10]


def test_the_fields_that_never_change():
    assert STEP_FIELDS[:10] == ("step", "epoch", "rank", "size", "time", "step_s", "data_s", "compute_s", "samples",
                                "loss")
    assert set(STEP_NEEDED) <= set(STEP_FIELDS)
    assert {"ranks", "hosts", "global_batch", "total_steps", "versions"} <= set(RUN_FACTS)
