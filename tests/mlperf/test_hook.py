"""The MLPerf hook on hand-made loop events: the same decision on every rank, the log on rank 0
alone, events in the order MLPerf's rules ask for. A real mlperf.log in a temporary directory."""

import json

from pipeline import config
from pipeline.mlperf.hook import MLPerfHook
from pipeline.mlperf.log import logs


class Done:
    stopped_at = None
    first_signal = None


def events(hook):
    hook.ready(lambda step: (step - 1) // 10 + 1, None, None)
    hook.on_start(0)
    hook.on_phase("data", 1)
    hook.on_epoch_end(1)
    hook.on_phase("eval", 10)
    first = hook.on_eval({"epoch": 1, "step": 10, "val_mae": 0.3})
    hook.on_phase("data", 11)
    hook.on_epoch_end(2)
    hook.on_phase("eval", 20)
    second = hook.on_eval({"epoch": 2, "step": 20, "val_mae": 0.1})
    hook.run_stop(*hook.status_of(Done()))
    return first, second


def settings():
    return config.load(None, ["mlperf.enabled=true", "mlperf.benchmark=cosmoflow", "mlperf.org=lab",
                              "mlperf.target=val_mae<=0.2", "mlperf.stop_at_target=true", "train.metrics=[mae]"]).mlperf


def test_every_rank_ends_at_the_target_and_rank_zero_logs_it(tmp_path):
    for rank in (0, 1):
        run = tmp_path / f"rank{rank}"
        run.mkdir()
        hook = MLPerfHook(settings(), rank, t_start=1_700_000_000.0)
        hook.attach(run)
        first, second = events(hook)
        hook.close()
        assert first is None
        assert second == ("mlperf: val_mae<=0.2 reached at step 20 (epoch 2); the run ends here "
                          "(mlperf.stop_at_target)")
        assert hook.status == "success" and hook.reached_at == 2
        assert len(logs(run)) == (1 if rank == 0 else 0)
    lines = [json.loads(x.split(":::MLLOG ", 1)[1]) for x in logs(tmp_path / "rank0")[0].read_text().splitlines()]
    keys = [e["key"] for e in lines if not e["key"].startswith("submission_")]
    assert keys == ["init_start", "init_stop", "run_start", "epoch_start", "epoch_stop", "eval_start", "eval_error",
                    "eval_stop", "epoch_start", "epoch_stop", "eval_start", "eval_error", "eval_stop", "run_stop"]
    assert lines[-1]["metadata"]["status"] == "success"


def test_mlperf_off_logs_nothing_and_never_ends_a_run(tmp_path):
    hook = MLPerfHook(config.MLPerfConfig(), 0, t_start=0.0)
    hook.attach(tmp_path)
    assert events(hook) == (None, None)
    hook.close()
    assert logs(tmp_path) == []
