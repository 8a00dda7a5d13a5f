"""End to end: real HDF5 shards, real Horovod ranks under mpirun, real checkpoints on disk."""

import json

import pytest
from conftest import ROOT, mpirun, pipeline, read_jsonl, read_steps

from pipeline import stack


def summaries(run):
    return [json.loads(p.read_text()) for p in sorted((run / "ranks").glob("rank-*.json"))]


@pytest.mark.mpi
@pytest.mark.stack2
def test_two_ranks_train_resume_and_agree(tmp_path, small_dataset):
    run = tmp_path / "run"
    common = ["train", "--config", ROOT / "configs" / "default.yaml", "--run-dir", run,
              "--set", f"data.dir={small_dataset}", "--set", "train.batch_size=32",
              "--set", "checkpoint.every_steps=50", "--set", "train.deterministic=true"]
    # 8000 samples / 2 ranks / 32 = 125 steps per epoch; stop part-way, then finish 2 epochs.
    first = mpirun(2, *common, "--set", "train.max_steps=150")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 rank(s)" in first.stdout
    assert first.stdout.count("pipeline: 2 rank(s)") == 1, "only rank 0 prints progress"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["ranks"] == 2 and cfg["steps_per_epoch"] == 125 and cfg["train"]["batch_size"] == 32
    # the stack this venv runs (make env TF=..., docs/setup.md), with Keras 2 as tf.keras
    assert cfg["versions"]["horovod"] == "0.28.1" and cfg["versions"]["tensorflow"] == stack.tf_version_of({})
    tf = cfg["versions"]["tensorflow"]
    assert cfg["versions"]["keras"] == stack.installed_version("tf-keras" if stack.needs_legacy_keras(tf) else "keras")
    assert cfg["versions"]["tf_stack"] == stack.request_of(stack.record_of())

    second = mpirun(2, *common)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming after step 150" in second.stdout

    logs = [read_steps(run / "steps" / f"rank-{r}.jsonl") for r in (0, 1)]
    for r, log in enumerate(logs):
        assert [rec["step"] for rec in log] == list(range(1, 251)), f"rank {r} steps"
        assert {rec["rank"] for rec in log} == {r} and {rec["size"] for rec in log} == {2}
        for rec in log:
            for key in ("epoch", "time", "step_s", "data_s", "compute_s", "samples", "loss", "rss_mb"):
                assert key in rec
            assert rec["data_s"] + rec["compute_s"] <= rec["step_s"] + 1e-6
        assert log[-1]["epoch"] == 2
    # Same weights and optimizer state on both ranks, bit for bit.
    s = summaries(run)
    assert len(s) == 2 and s[0]["weights_sha256"] == s[1]["weights_sha256"]
    assert s[0]["start_step"] == 150 and s[0]["end_step"] == 250

    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [2, 1, 2][:len(metrics)] or metrics[-1]["step"] == 250
    assert metrics[-1]["step"] == 250 and metrics[-1]["val_accuracy"] >= 0.9, metrics

    digest = pipeline("checkpoint", "digest", run)
    assert digest.returncode == 0 and digest.stdout.startswith("step 250 sha256 ")
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-00000150", "step-00000200", "step-00000250"]

    # A third start finds the run finished and changes nothing.
    third = mpirun(2, *common)
    assert third.returncode == 0 and "nothing to do" in third.stdout
    assert len(read_steps(run / "steps" / "rank-0.jsonl")) == 250


def test_single_process_without_launcher(tmp_path, small_dataset):
    """One process, no launcher, with a profiler window; then the run's MFU, offline."""
    run = tmp_path / "solo"
    r = pipeline("train", "--run-dir", run, "--set", f"data.dir={small_dataset}", "--set", "train.max_steps=40",
                 "--set", "checkpoint.every_steps=20", "--set", "log.profile_steps=5-8")
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["ranks"] == 1
    log = read_steps(run / "steps" / "rank-0.jsonl")
    assert [rec["step"] for rec in log] == list(range(1, 41)) and log[0]["size"] == 1
    assert not any(k.startswith("gpu_") for rec in log for k in rec), "a CPU rank's records carry no GPU fields"
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == [40]
    assert pipeline("checkpoint", "digest", run).stdout.startswith("step 40 ")

    # The trace holds steps 5..8 and no other: one read of the step's clock per step run.
    assert "profile: steps 5-8 traced" in r.stdout
    assert clock_reads_in_trace(run / "profile" / "rank-0") == 4

    # Model FLOPs against a hand count of the default CNN's layers (2 FLOPs per multiply-add,
    # forward; backward twice that), and MFU from them, the throughput and the recorded peak.
    assert cfg["model_flops_per_sample"] == pytest.approx(3 * cnn_forward_flops(cfg["train"]["batch_size"]),
                                                          rel=0.03)
    a = pipeline("analyze", run, "--json")
    s = json.loads(a.stdout)["runs"][0]
    m = s["mfu"]
    assert m["peak_flops_per_s"] == cfg["peak_flops_per_s"] and "FLOP/cycle" in m["peak_source"]
    assert m["value"] == pytest.approx(cfg["model_flops_per_sample"] * s["throughput_samples_per_s"]
                                       / cfg["peak_flops_per_s"]) and m["value"] > 0
    assert s["gpu"] is None
    text = pipeline("analyze", run).stdout
    assert "MFU: " in text and "peak" in text


def cnn_forward_flops(batch: int) -> float:
    """2 x multiply-adds of the default CNN's convolutions and dense layers, from their shapes."""
    import tensorflow as tf

    from pipeline.train import models

    model = models.build("cnn", (28, 28, 1), 10)
    total = 0
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.Conv2D):
            h, w, cout = layer.output_shape[1:]
            kh, kw = layer.kernel_size
            total += 2 * h * w * kh * kw * layer.input_shape[-1] * cout
        elif isinstance(layer, tf.keras.layers.Dense):
            total += 2 * layer.input_shape[-1] * layer.units
    return total


def clock_reads_in_trace(logdir) -> int:
    """Events of the first clock read in the step loop's body (pipeline/train/step.py
    compile_calls), in the xplane trace TensorFlow's profiler wrote."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    traces = list(logdir.glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1, traces
    space = xplane_pb2.XSpace()
    space.ParseFromString(traces[0].read_bytes())
    n = 0
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        n += sum(names[e.metadata_id].endswith("while/Timestamp:Timestamp") for line in plane.lines for e in line.events)
    return n


@pytest.mark.mpi
def test_more_ranks_than_shards_uneven_total_streaming(tmp_path):
    """One shard of 1001 samples, 2 ranks, nothing cached: both ranks run the same steps."""
    from pipeline.data.synth import synth

    data = tmp_path / "one-shard"
    synth(data, samples_train=1001, samples_val=101, shards=1, seed=2, progress=lambda *_: None)
    run = tmp_path / "run"
    r = mpirun(2, "train", "--run-dir", run, "--set", f"data.dir={data}", "--set", "train.batch_size=16",
               "--set", "data.cache_mb=0", "--set", "data.read_block=128", "--set", "data.shuffle_buffer=256",
               "--set", "train.epochs=2", "--set", "model.name=mlp")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "streamed from the shards" in r.stdout
    # 1001 // 2 = 500 per rank, cut to 31 batches of 16: 496 each, 9 left out, said once.
    assert r.stdout.count("9 of 1001 training samples are left out") == 1
    logs = [read_steps(run / "steps" / f"rank-{k}.jsonl") for k in (0, 1)]
    assert [x["step"] for x in logs[0]] == [x["step"] for x in logs[1]] == list(range(1, 63))
    s = summaries(run)
    assert s[0]["weights_sha256"] == s[1]["weights_sha256"]
    # Every one of the 101 validation samples counted once (51 + 50, not 50 + 50): the metrics
    # equal one process's over the whole split with the final model.
    last = read_jsonl(run / "metrics.jsonl")[-1]
    assert last["step"] == 62 and last["val_samples"] == 101
    ref = _whole_split_figures(data, run / "model.keras")
    assert last["val_accuracy"] == pytest.approx(ref["accuracy"], abs=1e-6)
    assert last["val_loss"] == pytest.approx(ref["loss"], rel=1e-5)


def _whole_split_figures(data, model_path) -> dict:
    """Accuracy and mean cross-entropy of a saved classifier over the whole validation split,
    in this one process, with the reader's own scaling."""
    import numpy as np
    import tensorflow as tf

    from pipeline.data import reader, shards
    from pipeline.data.sharding import assign

    m = shards.load_manifest(data)
    x, y = reader.read_share(m, "val", assign([s.num_samples for s in m.shards("val")], 0, 1, drop_last=False))
    logits = tf.keras.models.load_model(model_path)(reader.to_float(x), training=False).numpy()
    y = y.ravel()
    return {"accuracy": float(np.mean(np.argmax(logits, -1) == y)),
            "loss": float(np.mean(tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)))}


@pytest.mark.mpi
def test_corrupt_shard_stops_every_rank_with_one_line(tmp_path, small_dataset):
    import shutil

    import h5py

    data = tmp_path / "d"
    shutil.copytree(small_dataset, data)
    victim = sorted(data.glob("train-*.h5"))[2]
    with h5py.File(victim, "r+") as f:
        f["y"][5] = 99  # a label out of range: found by rank 0's fast check
    r = mpirun(2, "train", "--run-dir", tmp_path / "run", "--set", f"data.dir={data}")
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("pipeline: error:")]
    assert len(errors) == 1 and str(victim) in errors[0] and "label 99 out of range" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "steps").exists()


def test_keep_best_retains_the_best_evaluated_checkpoint(tmp_path, small_dataset):
    from pipeline.train.checkpoint import list_complete

    run = tmp_path / "best"
    r = pipeline("train", "--run-dir", run, "--set", f"data.dir={small_dataset}", "--set", "model.name=mlp",
                 "--set", "train.epochs=4", "--set", "train.batch_size=256", "--set", "checkpoint.keep=1",
                 "--set", "checkpoint.every_steps=0", "--set", "checkpoint.keep_best=val_loss")
    assert r.returncode == 0, r.stderr
    evals = read_jsonl(run / "metrics.jsonl")
    best_step = min(evals, key=lambda m: m["val_loss"])["step"]
    kept = [c.step for c in list_complete(run / "checkpoints")]
    assert kept == sorted({best_step, evals[-1]["step"]})
