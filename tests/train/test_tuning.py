"""The knobs people tune: models, precision, XLA, fp16 compression, gradient accumulation,
LR schedules. Real runs on real shards; 2 ranks under mpirun where ranks matter."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import mpirun, pipeline, read_jsonl, read_steps


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    from pipeline.data.synth import synth

    root = tmp_path_factory.mktemp("tuning-data")
    return {
        "tabular": synth(root / "tab", 4000, 500, shards=2, shape=(256,), progress=lambda *a: None).parent,
        "cifar": synth(root / "c32", 512, 128, shards=2, shape=(32, 32, 3), progress=lambda *a: None).parent,
    }


@pytest.mark.parametrize("model,data,batch", [
    ("mlp", "tabular", 32),
    ("resnet20", "cifar", 16),
    ("keras.applications.MobileNetV2", "cifar", 8),
])
@pytest.mark.mpi
def test_each_model_trains_on_two_ranks_with_identical_weights(tmp_path, datasets, model, data, batch):
    run = tmp_path / "run"
    r = mpirun(2, "train", "--run-dir", run, "--set", f"data.dir={datasets[data]}", "--set", f"model.name={model}",
               "--set", f"train.batch_size={batch}", "--set", "train.max_steps=3", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((run / "ranks" / f"rank-{k}.json").read_text()) for k in (0, 1)]
    # Every variable, BatchNorm statistics included (averaged before the final evaluation).
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    header = read_jsonl(run / "steps" / "rank-1.jsonl")[0]
    assert header["kind"] == "header" and header["local_rank"] == 1 and header["local_size"] == 2
    assert json.loads((run / "config.json").read_text())["model"]["name"] == model


def test_unknown_application_model_is_a_user_error(tmp_path, datasets):
    r = pipeline("train", "--run-dir", tmp_path / "run", "--set", f"data.dir={datasets['cifar']}",
                 "--set", "model.name=keras.applications.NoSuchNet")
    assert r.returncode == 2 and "NoSuchNet" in r.stderr and "Traceback" not in r.stderr


def _model_and_batch(seed=0):
    import tensorflow as tf

    from pipeline.train import models

    tf.keras.utils.set_random_seed(seed)
    model = models.build("cnn", (28, 28, 1), 10)
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.integers(0, 256, size=(32, 28, 28, 1), dtype=np.uint8))
    y = tf.constant(rng.integers(0, 10, size=32).astype(np.int32))
    return model, x, y


def test_accumulating_k_passes_equals_one_pass_at_k_times_the_batch():
    import tensorflow as tf

    from pipeline.runtime.dist import Dist
    from pipeline.train.step import make_train_step

    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    results = []
    for passes in (1, 4):
        model, x, y = _model_and_batch()
        w0 = [v.numpy() for v in model.trainable_variables]
        opt = tf.keras.optimizers.SGD(0.1)
        step = make_train_step(model, opt, loss_fn, Dist(), passes=passes)
        weights = []
        for _ in range(3):
            loss, _ = step(x, y, tf.constant(0.0))
            weights.append([v.numpy() for v in model.trainable_variables])
        results.append((weights, float(loss)))
    (w1, l1), (w4, l4) = results
    assert l1 == pytest.approx(l4, rel=1e-5)
    # One step: the same update to float32 rounding.
    for a, b in zip(w1[0], w4[0]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # Three steps (the accumulator starts from zero each step): the same to a small part of the
    # update. Rounding differences can tip a ReLU the other way and grow (one conv layer moved by
    # 0.8% of its update at step 2 on TensorFlow 2.17); an accumulator left holding the last
    # step's sum would move the weights by twice the update.
    for a, b, z in zip(w1[2], w4[2], w0):
        assert np.abs(b - a).max() <= 0.05 * np.abs(a - z).max()


def test_xla_step_matches_the_plain_step():
    import tensorflow as tf

    from pipeline.runtime.dist import Dist
    from pipeline.train.step import make_train_step

    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    out, compiled = [], []
    for jit in (False, True):
        model, x, y = _model_and_batch(1)
        step = make_train_step(model, tf.keras.optimizers.SGD(0.05), loss_fn, Dist(), jit_compile=jit)
        step(x, y, tf.constant(0.0))
        out.append([v.numpy() for v in model.trainable_variables])
        # XLA in the traced step: a function marked must-compile, there only when asked for.
        g = step.get_concrete_function(x, y, tf.constant(0.0)).graph.as_graph_def()
        compiled.append(any(n.attr["_XlaMustCompile"].b
                            for n in list(g.node) + [n for f in g.library.function for n in f.node_def]))
    assert compiled == [False, True]
    for a, b in zip(*out):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("knob", [
    ["--set", "horovod.compression=fp16"],
    ["--set", "train.precision=mixed_bfloat16"],
    ["--set", "horovod.backward_passes_per_step=2", "--set", "train.batch_size=32"],
])
@pytest.mark.mpi
def test_knob_runs_reach_the_accuracy_target(tmp_path, small_dataset, knob):
    run = tmp_path / "run"
    r = mpirun(2, "train", "--run-dir", run, "--set", f"data.dir={small_dataset}", *knob, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = read_steps(run / "steps" / "rank-0.jsonl")
    assert all(np.isfinite(s["loss"]) for s in steps)
    assert read_jsonl(run / "metrics.jsonl")[-1]["val_accuracy"] >= 0.9
    ranks = [json.loads((run / "ranks" / f"rank-{k}.json").read_text()) for k in (0, 1)]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    header = read_jsonl(run / "steps" / "rank-0.jsonl")[0]
    if "train.precision=mixed_bfloat16" in knob:
        assert header["precision"] == "mixed_bfloat16"
    if "horovod.backward_passes_per_step=2" in knob:
        assert steps[0]["samples"] == 64  # one update = 2 micro-batches of 32


def test_lr_is_in_the_step_log_and_follows_the_schedule(tmp_path, small_dataset):
    run = tmp_path / "run"
    r = pipeline("train", "--run-dir", run, "--set", f"data.dir={small_dataset}", "--set", "train.max_steps=12",
                 "--set", "train.warmup_steps=0", "--set", "train.lr_schedule=step", "--set", "train.lr_step_every=5",
                 "--set", "train.lr_step_factor=0.5", "--set", "train.lr=0.002")
    assert r.returncode == 0, r.stderr[-2000:]
    lrs = [s["lr"] for s in read_steps(run / "steps" / "rank-0.jsonl")]
    assert lrs == pytest.approx([0.002] * 5 + [0.001] * 5 + [0.0005] * 2)


def test_float16_without_a_gpu_is_a_user_error(tmp_path, small_dataset):
    # No GPU here (CI has none): the float16 path itself is exercised on the GPU machine only.
    r = pipeline("train", "--run-dir", tmp_path / "run", "--set", f"data.dir={small_dataset}",
                 "--set", "train.precision=mixed_float16")
    assert r.returncode == 2 and "needs a GPU" in r.stderr and r.stderr.strip().count("\n") == 0


def test_finished_run_exports_keras_tensorboard_and_int8_tflite(tmp_path, small_dataset):
    import tensorflow as tf

    run = tmp_path / "run"
    r = pipeline("train", "--run-dir", run, "--set", f"data.dir={small_dataset}", "--set", "train.epochs=1")
    assert r.returncode == 0, r.stderr[-2000:]
    # TensorBoard: rank 0's scalars, training every 10 steps and each evaluation.
    tags = set()
    for f in (run / "tensorboard").glob("events.out.tfevents.*"):
        for ev in tf.compat.v1.train.summary_iterator(str(f)):
            tags |= {v.tag for v in ev.summary.value}
    assert {"train/loss", "train/lr", "train/samples_per_s", "eval/val_accuracy", "eval/val_loss"} <= tags
    # The Keras model as saved classifies like the run's last evaluation said.
    e = pipeline("export", "tflite", run)
    assert e.returncode == 0, e.stderr[-2000:]
    res = json.loads((run / "export.json").read_text())
    assert res["float_accuracy"] == pytest.approx(read_jsonl(run / "metrics.jsonl")[-1]["val_accuracy"], abs=1e-6)
    assert abs(res["int8_accuracy"] - res["float_accuracy"]) <= 0.02
    assert res["tflite_bytes"] < res["keras_bytes"] and res["int8_latency_ms"] > 0
    interp = tf.lite.Interpreter(model_path=res["tflite"])
    interp.allocate_tensors()
    assert any(d["dtype"] == np.int8 for d in interp.get_tensor_details())


def test_export_without_a_finished_model_is_a_user_error(tmp_path):
    (tmp_path / "run").mkdir()
    r = pipeline("export", "tflite", tmp_path / "run")
    assert r.returncode == 2 and "model.keras" in r.stderr and "Traceback" not in r.stderr
