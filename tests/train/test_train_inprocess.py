"""The trainer's stages called directly: one rank, no launcher, a few steps on a small real
dataset in a temporary directory (in the manner of Flax's train_test.py).

TensorFlow and Keras keep process-wide state (the dtype policy, op determinism, layer name
counters), so each case runs in a freshly spawned Python process, never in pytest's own.
"""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

from conftest import read_jsonl, read_steps

from pipeline import config, rundir


def in_fresh_process(fn, *args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(fn, *args).result(timeout=300)  # a hang guard, not a speed check


def _config(data_dir, *sets):
    from pipeline import config

    return config.load(None, [f"data.dir={data_dir}", "train.batch_size=32", "log.progress_every_s=3600",
                              "log.tensorboard_every_steps=2", *sets])


def _stages(data_dir: str, run_dir: str) -> dict:
    import contextlib
    import io

    from pipeline.rundir import RunDir
    from pipeline.train import trainer as train

    cfg = _config(data_dir, "train.max_steps=6", "checkpoint.every_steps=3")
    rd = RunDir(run_dir)
    manifest = train.preflight(cfg, rd)
    dist = train.join(cfg, rd)
    train.check_data(manifest, dist)
    plan = train.make_plan(cfg, manifest, dist)
    out = io.StringIO()
    with contextlib.ExitStack() as resources:
        t = train.build(cfg, rd, dist, plan, out, resources)
        state = train.loop(t, resources)
    summary = train.summarize(t, state, t_start=0.0)
    train.finish(t, state, summary)
    return {"plan": [plan.total, plan.steps_per_epoch, plan.global_batch, plan.update_batch], "start": t.start,
            "last_step": state.step, "timed_steps": len(state.step_times), "summary": summary, "out": out.getvalue()}


def test_the_stages_run_one_rank_without_a_launcher(tmp_path, small_dataset):
    run = tmp_path / "run"
    r = in_fresh_process(_stages, str(small_dataset), str(run))
    # 8000 training samples / 32 = 250 steps per epoch; max_steps cuts the run at 6.
    assert r["plan"] == [6, 250, 32, 32] and r["start"] == 0
    assert r["last_step"] == 6 and r["timed_steps"] == 6
    assert [x["step"] for x in read_steps(run / "steps" / "rank-0.jsonl")] == list(range(1, 7))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == [6]  # the last step evaluates
    s = r["summary"]
    assert s["status"] == "finished" and (s["start_step"], s["end_step"], s["steps_run"]) == (0, 6, 6)
    assert json.loads((run / "ranks" / "rank-0.json").read_text()) == s
    assert (run / "model.keras").exists() and list((run / "tensorboard").iterdir())
    assert "done: 6 steps" in r["out"] and "checkpoint:" in r["out"]
    # Every record has exactly the fields pipeline/rundir.py (and docs/run-directory.md) lists.
    records = read_jsonl(run / "steps" / "rank-0.jsonl")
    assert tuple(records[0]) == rundir.HEADER_FIELDS and {tuple(x) for x in records[1:]} == {rundir.STEP_FIELDS}
    assert tuple(read_jsonl(run / "metrics.jsonl")[0]) == rundir.METRIC_FIELDS
    assert tuple(s) == rundir.SUMMARY_FIELDS
    assert set(json.loads((run / "config.json").read_text())) == set(config.Config().to_dict()) | set(rundir.RUN_FACTS)


def _raise_inside_the_loop(data_dir: str, run_dir: str) -> dict:
    import io
    import signal
    import threading

    from pipeline.data import feed
    from pipeline.train import trainer as train, writers

    handled = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    before = {s: signal.getsignal(s) for s in handled}
    logs, closed, shut = [], [], []

    class Spy(train.StepLog):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            logs.append(self)

    real_prepare, real_close, real_shutdown = feed.MemoryFeed.prepare, writers.TensorBoardFile.close, train.dist_mod.Dist.shutdown
    calls = []

    def prepare(self, step, n):  # the third call (one step each) fails, as a read error would
        calls.append(step)
        if len(calls) == 3:
            raise RuntimeError("injected failure at step 3")
        return real_prepare(self, step, n)

    train.StepLog, feed.MemoryFeed.prepare = Spy, prepare
    writers.TensorBoardFile.close = lambda self: (closed.append(True), real_close(self))[1]
    train.dist_mod.Dist.shutdown = lambda self: (shut.append(True), real_shutdown(self))[1]
    error = None
    try:
        train.run(_config(data_dir, "train.max_steps=20", "train.step_timeout_s=60", "train.steps_per_call=1"), run_dir, out=io.StringIO())
    except RuntimeError as e:
        error = str(e)
    return {"error": error, "handlers": {s.name: signal.getsignal(s) == before[s] for s in handled},
            "watchdogs": [t.name for t in threading.enumerate() if t.name == "step-watchdog"],
            "step_logs_closed": [log.closed for log in logs], "board_closed": closed, "horovod_shut_down": shut}


def test_an_exception_in_the_loop_closes_everything(tmp_path, small_dataset):
    run = tmp_path / "run"
    r = in_fresh_process(_raise_inside_the_loop, str(small_dataset), str(run))
    assert r["error"] == "injected failure at step 3"
    assert r["handlers"] == {"SIGTERM": True, "SIGUSR1": True, "SIGINT": True}, "signal handlers restored"
    assert r["watchdogs"] == [], "watchdog stopped"
    assert r["step_logs_closed"] == [True] and r["board_closed"] == [True] and r["horovod_shut_down"] == [True]
    # The two finished steps are on disk; the run is not marked finished.
    assert [x["step"] for x in read_steps(run / "steps" / "rank-0.jsonl")] == [1, 2]
    assert json.loads((run / "ranks" / "rank-0.json").read_text())["status"] == "running"


def _train(config_file: str | None, data_dir: str, run_dir: str) -> str:
    import io

    from pipeline import config
    from pipeline.train import checkpoint, trainer as train

    cfg = config.load(config_file) if config_file else \
        _config(data_dir, "train.deterministic=true", "train.max_steps=8", "checkpoint.every_steps=0")
    train.run(cfg, run_dir, out=io.StringIO())
    return " ".join(map(str, checkpoint.digest(run_dir)))


def test_a_run_is_reproduced_from_its_config_json(tmp_path, small_dataset):
    first = in_fresh_process(_train, None, str(small_dataset), str(tmp_path / "first"))
    again = in_fresh_process(_train, str(tmp_path / "first" / "config.json"), "", str(tmp_path / "again"))
    assert first.startswith("8 ") and again == first


def _two_inputs(data_dir: str, run_dir: str) -> dict:
    """The same deterministic run with the share in memory and streamed, 4 steps per call."""
    import io

    from pipeline.train import trainer as train

    out = {}
    for name, cache in (("memory", "4096"), ("streamed", "0")):
        cfg = _config(data_dir, "train.deterministic=true", "train.max_steps=30", "checkpoint.every_steps=10",
                      "train.steps_per_call=4", f"data.cache_mb={cache}")
        text = io.StringIO()
        train.run(cfg, f"{run_dir}/{name}", out=text)
        out[name] = text.getvalue()
    return out


def test_several_steps_per_call_log_every_step_and_both_inputs_agree(tmp_path, small_dataset):
    r = in_fresh_process(_two_inputs, str(small_dataset), str(tmp_path))
    assert "input in memory" in r["memory"] and "input streamed from the shards" in r["streamed"]
    losses = {}
    for name in ("memory", "streamed"):
        records = read_steps(tmp_path / name / "steps" / "rank-0.jsonl")
        assert [x["step"] for x in records] == list(range(1, 31)), "one record per step"
        for x in records:
            # The split is exact in whole microseconds; 1e-9 s covers the float division.
            assert 0 <= x["data_s"] and 0 < x["compute_s"] and x["data_s"] + x["compute_s"] <= x["step_s"] + 1e-9
        times = [x["time"] for x in records]
        assert times == sorted(times)
        losses[name] = [x["loss"] for x in records]
        assert sorted(int(p.name[5:]) for p in (tmp_path / name / "checkpoints").glob("step-*")) == [10, 20, 30]
    assert losses["memory"] == losses["streamed"], "the same batches in the same order"
