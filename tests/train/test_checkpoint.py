"""Checkpoints on a real file system with real TensorFlow state."""

import json
import os

import pytest

from pipeline.config import CheckpointConfig
from pipeline.train import checkpoint
from pipeline.train.checkpoint import Checkpoints, CheckpointWriter, latest, list_complete, should_save


@pytest.mark.parametrize("step, every, last, expected", [
    (200, 200, 1000, True), (199, 200, 1000, False), (1000, 300, 1000, True), (5, 0, 10, False), (10, 0, 10, True)])
def test_should_save(step, every, last, expected):
    assert should_save(step, every, last) is expected


@pytest.fixture
def state():
    import tensorflow as tf

    v = tf.Variable([1.0, 2.0, 3.0])
    return v, tf.train.Checkpoint(model=tf.train.Checkpoint(v=v))


def test_save_keeps_last_k_and_only_complete_ones_count(tmp_path, state):
    v, ckpt = state
    w = CheckpointWriter(tmp_path / "ck", CheckpointConfig(keep=2))
    for step in (10, 20, 30):
        v.assign_add([1.0, 1.0, 1.0])
        w.save(ckpt, step, epoch=1)
    assert [r.step for r in list_complete(tmp_path / "ck")] == [20, 30]
    # A newer directory without its completion mark (a crash mid-write) is never chosen.
    (tmp_path / "ck" / "step-00000040").mkdir()
    (tmp_path / "ck" / "step-00000040" / "state.index").write_bytes(b"partial")
    # A mark that does not say complete, or names another step, is not trusted either.
    (tmp_path / "ck" / "step-00000050").mkdir()
    (tmp_path / "ck" / "step-00000050" / "meta.json").write_text(json.dumps({"complete": True, "step": 7}))
    assert latest(tmp_path / "ck").step == 30


def test_leftover_temporaries_are_removed_on_start(tmp_path, state):
    _, ckpt = state
    w = CheckpointWriter(tmp_path / "ck", CheckpointConfig(keep=2))
    w.save(ckpt, 10, epoch=1)
    (tmp_path / "ck" / ".tmp-step-00000020-123").mkdir()
    (tmp_path / "ck" / ".tmp-step-00000020-123" / "state.index").write_bytes(b"x")
    CheckpointWriter(tmp_path / "ck", CheckpointConfig(keep=2))
    assert sorted(os.listdir(tmp_path / "ck")) == ["step-00000010"]


def test_failed_write_leaves_previous_checkpoint_selected(tmp_path, state):
    _, ckpt = state
    w = CheckpointWriter(tmp_path / "ck", CheckpointConfig(keep=3))
    w.save(ckpt, 10, epoch=1)

    class Exploding:
        def write(self, prefix):
            open(prefix + ".index", "wb").write(b"half")
            raise OSError(28, "No space left on device")

    with pytest.raises(checkpoint.CheckpointWriteError, match="No space left on device.*still .*step-00000010"):
        w.save(Exploding(), 20, epoch=1)
    assert latest(tmp_path / "ck").step == 10
    assert sorted(os.listdir(tmp_path / "ck")) == ["step-00000010"]


def test_disabled_writer_does_nothing(tmp_path, state):
    _, ckpt = state
    w = Checkpoints(CheckpointConfig(keep=1))
    assert w.save(ckpt, 10, epoch=1) is None and w.latest() is None
    assert not (tmp_path / "ck").exists()


def test_digest_tracks_variable_values(tmp_path, state):
    import tensorflow as tf

    v, _ = state
    opt_var = tf.Variable([0.5])
    ckpt = tf.train.Checkpoint(model=tf.train.Checkpoint(v=v), optimizer=tf.train.Checkpoint(m=opt_var))
    run = tmp_path / "run"
    w = CheckpointWriter(run / "checkpoints", CheckpointConfig(keep=5))
    w.save(ckpt, 1, epoch=1)
    step1, d1 = checkpoint.digest(run)
    w.save(ckpt, 2, epoch=1)
    step2, d2 = checkpoint.digest(run)
    assert (step1, step2) == (1, 2) and d1 == d2, "same values, same digest"
    opt_var.assign([0.25])
    w.save(ckpt, 3, epoch=1)
    assert checkpoint.digest(run)[1] != d1, "optimizer state is part of the digest"


def ref(step, **meta):
    return checkpoint.CheckpointRef(None, step, {"complete": True, "step": step, **meta})


def test_retention_keeps_the_last_k_and_the_best():
    refs = [ref(10, val_accuracy=0.5, val_loss=1.0), ref(20, val_accuracy=0.9, val_loss=0.2),
            ref(30, val_accuracy=0.7, val_loss=0.1), ref(40), ref(50)]
    assert [r.step for r in checkpoint.to_prune(refs, keep=2)] == [10, 20, 30]
    assert [r.step for r in checkpoint.to_prune(refs, keep=2, keep_best="val_accuracy")] == [10, 30]
    assert [r.step for r in checkpoint.to_prune(refs, keep=2, keep_best="val_loss")] == [10, 20]
    assert checkpoint.best([ref(1), ref(2)], "val_accuracy") is None


@pytest.mark.parametrize("every, keep_best, step, evaluated, expected", [
    (10, "", 20, False, True),            # every_steps
    (10, "", 25, True, False),            # an evaluation alone is no reason without keep_best
    (10, "val_loss", 25, True, True),     # ... but is with it
    (0, "", 99, False, False),
    (0, "", 100, False, True),            # the last step, always
])
def test_the_writer_owns_the_save_rule(tmp_path, every, keep_best, step, evaluated, expected):
    w = Checkpoints(CheckpointConfig(every_steps=every, keep_best=keep_best))
    assert w.due(step, last_step=100, evaluated=evaluated) is expected
