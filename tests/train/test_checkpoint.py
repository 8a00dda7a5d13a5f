"""Checkpoints on a real file system with real TensorFlow state."""

import json
import os

import pytest
from conftest import flip_two_bytes

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


def _saved_at(tmp_path, state, *steps):
    """A writer with a checkpoint at each step, the variable holding the step's number."""
    v, ckpt = state
    w = CheckpointWriter(tmp_path / "ck", CheckpointConfig(keep=5))
    for step in steps:
        v.assign([float(step)] * 3)
        w.save(ckpt, step, 0)
    return w


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_restored(tmp_path, state):
    v, ckpt = state
    w = _saved_at(tmp_path, state, 10, 20)
    newest = latest(tmp_path / "ck")
    assert set(newest.meta["files"]) == {p.name for p in newest.path.glob("state*")}
    flip_two_bytes(next(newest.path.glob("state.data-*")))
    assert "does not match the sha256" in checkpoint.problem(newest)
    said = []
    v.assign([0.0] * 3)
    ref = w.restore_newest(ckpt, said.append)
    assert ref.step == 10 and v.numpy().tolist() == [10.0, 10.0, 10.0]
    assert len(said) == 1 and "step-00000020 is damaged" in said[0] and "damaged-step-00000020" in said[0]
    assert [r.step for r in list_complete(tmp_path / "ck")] == [10]  # never chosen again
    (aside, why), = checkpoint.list_damaged(tmp_path / "ck")
    assert aside.name == "damaged-step-00000020" and "sha256" in why
    assert json.loads((aside / "damaged.json").read_text())["step"] == 20


def test_tensorflows_own_checksums_catch_what_no_sha256_was_kept_for(tmp_path, state):
    """A checkpoint of an earlier version (no "files" in meta.json): TensorFlow's checksum on
    restore says it is damaged (DataLossError) and it is set aside the same way."""
    v, ckpt = state
    w = _saved_at(tmp_path, state, 10, 20)
    newest = latest(tmp_path / "ck")
    meta = {k: x for k, x in newest.meta.items() if k != "files"}
    (newest.path / "meta.json").write_text(json.dumps(meta))
    data = next(newest.path.glob("state.data-*"))
    import numpy as np

    flip_two_bytes(data, at=data.read_bytes().index(np.full(3, 20.0, np.float32).tobytes()))  # inside v's bytes
    assert "TensorFlow cannot read it" in checkpoint.problem(latest(tmp_path / "ck"))
    ref = w.restore_newest(ckpt, lambda line: None)
    assert ref.step == 10 and v.numpy().tolist() == [10.0, 10.0, 10.0]


def test_with_every_checkpoint_damaged_resuming_is_a_user_error_naming_each(tmp_path, state):
    v, ckpt = state
    w = CheckpointWriter(tmp_path / "ck", CheckpointConfig(keep=5))
    for step in (10, 20):
        w.save(ckpt, step, 0)
    for ref in list_complete(tmp_path / "ck"):
        os.truncate(next(ref.path.glob("state.data-*")), 3)
    with pytest.raises(checkpoint.UserError) as e:
        w.restore_newest(ckpt, lambda line: None)
    msg = str(e.value)
    assert "every checkpoint is damaged" in msg and "step-00000020 (state.data" in msg and "step-00000010" in msg
    assert "3 bytes where" in msg
