"""Rank 0's writers and the one rank-0 idiom: every rank-0-only part is a do-nothing base with
the real part as its subclass. Real files in a temporary run directory."""

import inspect
import io
import json

import pytest

from pipeline import config
from pipeline.mlperf.log import MLPerfLog, MLPerfLogFile
from pipeline.rundir import RunDir
from pipeline.runtime.flight import Flight, FlightRecorder
from pipeline.train import writers
from pipeline.train.checkpoint import Checkpoints, CheckpointWriter

PAIRS = [(writers.Console, writers.StreamConsole), (writers.Progress, writers.ProgressLine),
         (writers.MetricsLog, writers.MetricsFile), (writers.TensorBoard, writers.TensorBoardFile),
         (writers.ConfigFile, writers.ConfigJSON), (writers.ModelExport, writers.KerasExport),
         (Checkpoints, CheckpointWriter), (MLPerfLog, MLPerfLogFile), (Flight, FlightRecorder)]


def public_methods(cls) -> set[str]:
    return {n for n, v in inspect.getmembers(cls) if not n.startswith("_") and callable(v)}


@pytest.mark.parametrize("base, real", PAIRS, ids=lambda c: c.__name__)
def test_every_method_of_a_rank0_part_is_on_its_do_nothing_base(base, real):
    # A method the loop calls on the real part alone would fail on every other rank only.
    assert issubclass(real, base)
    assert public_methods(real) <= public_methods(base), public_methods(real) - public_methods(base)


def build(tmp_path, is_root):
    out = io.StringIO()
    w = writers.build(is_root, RunDir(tmp_path / "run"), config.LogConfig(tensorboard_every_steps=0),
                      total_steps=10, steps_per_epoch=5, global_batch=64, stream=out)
    return w, out


def use(w):
    w.config_file.write(config.Config(), ranks=2)  # first, as in a run: it makes the run directory
    w.console.print("hello")
    w.progress.on_start(0)
    w.progress.maybe_print(3, 0.5, force=True)
    w.metrics.write({"epoch": 1, "step": 5, "time": 1.0, "val_loss": 0.3})
    w.board.on_steps([{"step": 1, "loss": 0.5, "lr": 0.1}])
    assert w.board.on_eval({"step": 5, "val_loss": 0.3}) is None
    w.close()


def test_other_ranks_write_and_print_nothing(tmp_path):
    w, out = build(tmp_path, is_root=False)
    use(w)
    assert out.getvalue() == "" and not (tmp_path / "run").exists()
    assert w.export.save(object()) is None


def test_rank_zero_writes_each_record(tmp_path):
    w, out = build(tmp_path, is_root=True)
    use(w)
    run = RunDir(tmp_path / "run")
    lines = out.getvalue().splitlines()
    assert lines[0] == "hello" and lines[1].startswith("step 3/10 epoch 1/2 loss 0.5000")
    assert [json.loads(x)["step"] for x in run.metrics.read_text().splitlines()] == [5]
    assert config.load(run.config) == config.Config()  # config.json loads back, facts skipped
    assert not run.tensorboard.exists()  # log.tensorboard_every_steps: 0 is off


def test_tensorboard_scalars_are_written_off_the_loop_thread_and_a_failure_is_raised_at_close(tmp_path):
    import tensorflow as tf

    board = writers.TensorBoardFile(tmp_path / "tb", every=2, global_batch=8)
    board.on_steps([{"step": s, "loss": float(s), "lr": 0.1} for s in (1, 2, 3, 4)])
    assert board.on_eval({"step": 4, "val_loss": 0.3, "val_accuracy": 0.9}) is False
    board.close()
    got = {}
    for f in (tmp_path / "tb").glob("events.out.tfevents.*"):
        for ev in tf.compat.v1.train.summary_iterator(str(f)):
            for v in ev.summary.value:
                got[(v.tag, ev.step)] = float(tf.make_ndarray(v.tensor))
    assert got[("train/loss", 2)] == 1.5 and got[("train/loss", 4)] == 3.5  # the mean since the last write
    assert got[("eval/val_accuracy", 4)] == pytest.approx(0.9) and ("train/samples_per_s", 4) in got
    # A directory that cannot be made: the loop is not stopped mid-run; close says what failed.
    (tmp_path / "file").write_text("x")
    board = writers.TensorBoardFile(tmp_path / "file" / "tb", every=1, global_batch=8)
    board.on_steps([{"step": 1, "loss": 1.0, "lr": 0.1}])
    with pytest.raises(tf.errors.OpError):
        board.close()
