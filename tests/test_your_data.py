"""Your data, your model: HDF5 files in the CosmoFlow and DeepCAM raw layouts (made by
`pipeline data synth --kind`), indexed in place and trained with built-in models and with a
model from a .py file; bad inputs end with exit 2 and one line, writing nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, assert_user_error, mpirun, pipeline, read_jsonl, require_root, write_run


def digest_tree(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def raw(tmp_path_factory):
    """Raw files in both layouts, made once per session (no TensorFlow: h5py and numpy)."""
    from pipeline.data.synth_layouts import synth_layout

    d = tmp_path_factory.mktemp("raw")
    synth_layout("cosmoflow", d / "cosmoflow", files=48, progress=lambda *_: None)
    synth_layout("segmentation", d / "segmentation", files=160, progress=lambda *_: None)
    return d


INDEX = {
    "cosmoflow": ["--x", "full", "--y", "unitPar", "--subvolume", "16", "--val-fraction", "0.25"],
    "segmentation": ["--x", "climate/data", "--y", "climate/labels_0", "--per-file", "one", "--num-classes", "3",
                     "--val-fraction", "0.2"],
}


def index(raw_dir: Path, kind: str, out: Path, *src) -> dict:
    r = pipeline("data", "index", *(src or [raw_dir / kind]), "--out", out, *INDEX[kind])
    assert r.returncode == 0, r.stderr
    return json.loads((out / "manifest.json").read_text())


def test_index_refers_to_the_files_in_place(raw, tmp_path):
    before = digest_tree(raw)
    cf = index(raw, "cosmoflow", tmp_path / "cf")
    # 48 universes of 32^3: 8 sub-volumes of 16^3 each; 12 universes (whole) are validation.
    assert (cf["shape"], cf["y_shape"], cf["x_dtype"], cf["num_classes"]) == ([16, 16, 16, 4], [4], "int16", None)
    assert cf["splits"]["train"]["num_samples"] == 36 * 8 and cf["splits"]["val"]["num_samples"] == 12 * 8
    train_files = {s["file"] for s in cf["splits"]["train"]["shards"]}
    assert not train_files & {s["file"] for s in cf["splits"]["val"]["shards"]}, "a universe on both sides"
    assert Path(cf["root"]) == (raw / "cosmoflow").resolve() and all(not Path(f).is_absolute() for f in train_files)
    seg = index(raw, "segmentation", tmp_path / "seg", str(raw / "segmentation" / "data-*.h5"))
    assert (seg["shape"], seg["y_shape"], seg["num_classes"]) == ([64, 64, 4], [64, 64], 3)
    assert seg["splits"]["train"]["num_samples"] + seg["splits"]["val"]["num_samples"] == 160
    assert sorted(p.name for p in (tmp_path / "cf").iterdir()) == ["extents.npz", "manifest.json"], "nothing copied"
    for d in ("cf", "seg"):
        v = pipeline("data", "verify", tmp_path / d)
        assert v.returncode == 0 and "files match the manifest" in v.stdout, v.stderr
    assert digest_tree(raw) == before, "the sources are never written"


def test_the_reader_cuts_sub_volumes_as_hyperslabs(raw, tmp_path):
    from pipeline.data import reader, sharding, shards

    index(raw, "cosmoflow", tmp_path / "cf")
    m = shards.load_manifest(tmp_path / "cf")
    plan = sharding.assign([s.num_samples for s in m.shards("train")], 0, 1, 8)
    x, y = reader.read_share(m, "train", plan)
    with h5py.File(m.path(m.shards("train")[0])) as f:
        full, par = f["full"][()], f["unitPar"][()]
    # Sample j of a file is its j-th 16-cube in C order over the 2x2x2 grid: j = 5 is (1, 0, 1).
    assert np.array_equal(x[5], full[16:32, 0:16, 16:32, :])
    assert all(np.array_equal(y[j], par) for j in range(8)), "every sub-volume has its universe's target"
    streamed = reader.ShardSource(m, "train")
    blocks = reader.cut_blocks(plan, reader.block_size(4096, m.chunk_samples))
    streamed.load(blocks)
    xs, ys = np.empty_like(x), np.empty_like(y)
    streamed.take(np.arange(len(x)), xs, ys)
    assert np.array_equal(xs, x) and np.array_equal(ys, y), "streaming and in-memory reads agree"


def _bad_file(d: Path, kind: str) -> list[str]:
    """A directory of good one-sample files plus one bad file; the index arguments."""
    rng = np.random.default_rng(0)
    d.mkdir()
    for i in range(3):
        with h5py.File(d / f"ok-{i}.h5", "w") as f:
            f["x"] = rng.random((4, 8, 8, 2), dtype=np.float32)
            f["y"] = np.arange(4, dtype=np.int64)
    bad = d / "ok-9.h5"
    if kind == "not-hdf5":
        bad.write_text("temperature,pressure\n1,2\n")
    elif kind == "unreadable":
        shutil.copy(d / "ok-0.h5", bad)
        with open(bad, "r+b") as f:
            f.truncate(900)
    else:
        with h5py.File(bad, "w") as f:
            f["x"] = rng.random((5 if kind == "count" else 4, *((8, 9, 2) if kind == "shape" else (8, 8, 2))),
                                dtype=np.float64 if kind == "dtype" else np.float32)
            if kind != "missing-key":
                f["y"] = np.arange(4, dtype=np.int64)
    return [str(d), "--x", "x", "--y", "y"]


@pytest.mark.parametrize("kind, words", [
    ("shape", ["ok-9.h5", "'x'", "(8, 9, 2)", "(8, 8, 2)"]),
    ("dtype", ["ok-9.h5", "'x'", "float64", "float32"]),
    ("count", ["ok-9.h5", "'x' has 5 samples but 'y' has 4"]),
    ("missing-key", ["ok-9.h5", "no dataset 'y'"]),
    ("not-hdf5", ["ok-9.h5", "not an HDF5 file"]),
    ("unreadable", ["ok-9.h5", "cannot be read"]),
])
def test_bad_sources_exit_2_with_one_line_and_write_nothing(tmp_path, kind, words):
    args = _bad_file(tmp_path / "src", kind)
    out = tmp_path / "out"
    assert_user_error(pipeline("data", "index", *args, "--out", out), *words)
    assert not out.exists(), "nothing under --out"


def test_index_argument_errors(raw, tmp_path):
    out = tmp_path / "out"
    assert_user_error(pipeline("data", "index", tmp_path / "nope", "--out", out, "--x", "a", "--y", "b"), "nope")
    assert_user_error(pipeline("data", "index", str(tmp_path / "*.h5"), "--out", out, "--x", "a", "--y", "b"),
                      "matches no file")
    assert_user_error(pipeline("data", "index", raw / "cosmoflow", "--out", out, "--x", "full", "--y", "unitPar",
                               "--subvolume", "64"), "--subvolume 64 is larger")
    assert_user_error(pipeline("data", "index", raw / "cosmoflow", "--out", out, "--x", "full", "--y", "unitPar",
                               "--subvolume", "16", "--num-classes", "3"), "--num-classes needs integer")
    assert not out.exists()


BAD_MODEL = '''
import tensorflow as tf


def raises(input_shape, target_shape, num_classes):
    raise RuntimeError("no GPU kernel for this layer")


def wrong_output(input_shape, target_shape, num_classes):
    return tf.keras.Sequential([tf.keras.layers.Input(input_shape), tf.keras.layers.Flatten(),
                                tf.keras.layers.Dense(3)])
'''


@pytest.mark.parametrize("name, words", [
    ("{d}/missing.py:build", ["model.name", "no such file"]),
    ("{d}/models.py:nosuch", ["model.name", "has no function 'nosuch'"]),
    ("{d}/models.py:raises", ["model.name", "could not be built", "input (16, 16, 16, 4)", "targets (4,)",
                              "no GPU kernel"]),
    ("{d}/models.py:wrong_output", ["model.name", "output shape (3,)", "input (16, 16, 16, 4)", "targets (4,)"]),
    ("cnn", ["model.name 'cnn'", "input (16, 16, 16, 4)", "targets (4,)"]),
])
def test_bad_models_exit_2_with_one_line_and_write_nothing(raw, tmp_path, name, words):
    index(raw, "cosmoflow", tmp_path / "cf")
    (tmp_path / "models.py").write_text(BAD_MODEL)
    run = tmp_path / "run"
    r = pipeline("train", "--run-dir", run, "--set", f"data.dir={tmp_path / 'cf'}",
                 "--set", f"model.name={name.format(d=tmp_path)}", "--set", "train.loss=mse")
    assert_user_error(r, *words)
    assert not run.exists(), "nothing written"


GOOD_MODEL = '''
import tensorflow as tf
from tensorflow.keras import layers


def regressor(input_shape, target_shape, num_classes, width=16):
    """A plain 3D CNN, nothing like the built-in: strided convolutions and global pooling."""
    inputs = layers.Input(input_shape)
    x = layers.Conv3D(width, 3, strides=2, padding="same", activation="relu")(inputs)
    x = layers.Conv3D(2 * width, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Concatenate()([layers.GlobalAveragePooling3D()(x), layers.GlobalMaxPooling3D()(x)])
    x = layers.Dense(64, activation="relu")(x)
    return tf.keras.Model(inputs, layers.Dense(target_shape[0])(x))


def segmenter(input_shape, target_shape, num_classes, width=16):
    """A fully convolutional net without down-sampling."""
    inputs = layers.Input(input_shape)
    x = layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(width, 5, padding="same", activation="relu")(x)
    return tf.keras.Model(inputs, layers.Conv2D(num_classes, 1)(x))
'''


def constant_predictors(manifest_dir: Path) -> dict:
    """What a model that ignores its input scores: the training mean for each parameter (MAE on
    the validation split), and the most frequent training class for every pixel (mean IoU)."""
    from pipeline.data import shards

    m = shards.load_manifest(manifest_dir)

    def targets(split):
        out = []
        for s in m.shards(split):
            with h5py.File(m.path(s)) as f:
                y = f[m.layout.y_key][()]
            out += [y] * s.num_samples
        return np.stack(out)

    train, val = targets("train"), targets("val")
    if m.num_classes is None:
        return {"val_mae": float(np.abs(val - train.mean(axis=0)).mean())}
    common = np.bincount(train.ravel(), minlength=m.num_classes).argmax()
    # IoU of the predicted class is its share of the pixels; the other classes score 0.
    return {"val_mean_iou": float((val == common).mean()) / m.num_classes}


@pytest.mark.mpi
@pytest.mark.parametrize("kind, model", [("cosmoflow", "builtin"), ("cosmoflow", "file"),
                                         ("segmentation", "builtin"), ("segmentation", "file")])
def test_two_ranks_learn_from_indexed_files(raw, tmp_path, kind, model):
    data = tmp_path / "data"
    index(raw, kind, data)
    config = ROOT / "configs" / f"{kind}.yaml"
    sets = ["--set", f"data.dir={data}", "--set", "log.progress_every_s=3600"]
    if kind == "cosmoflow":
        sets += ["--set", "mlperf.stop_at_target=false"]  # every epoch, for the one-record-per-epoch check
    if kind == "segmentation":
        assert pipeline("data", "stats", data).returncode == 0
    if model == "file":
        (tmp_path / "mine.py").write_text(GOOD_MODEL)
        fn = "regressor" if kind == "cosmoflow" else "segmenter"
        sets += ["--set", f"model.name={tmp_path / 'mine.py'}:{fn}", "--set", "model.args={width: 16}"]
    run = tmp_path / "run"
    r = mpirun(2, "train", "--config", config, "--run-dir", run, *sets)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    final = read_jsonl(run / "metrics.jsonl")[-1]
    (metric, constant), = constant_predictors(data).items()
    print(f"{kind} {model}: {metric} {final[metric]:.4f}, constant predictor {constant:.4f}")
    if metric == "val_mae":
        # Stated: the constant predictor's MAE is about 0.5 on parameters uniform in [-1, 1].
        assert final[metric] <= 0.6 * constant, (final, constant)
    else:
        assert final[metric] >= 1.5 * constant, (final, constant)
    # Both ranks evaluated the same model: one record per epoch, written by rank 0.
    cfg = json.loads((run / "config.json").read_text())
    assert len(read_jsonl(run / "metrics.jsonl")) == cfg["train"]["epochs"]
    digests = {json.loads((run / "ranks" / f"rank-{i}.json").read_text())["weights_sha256"] for i in (0, 1)}
    assert len(digests) == 1


def _short_run(data: Path, run: Path, *sets):
    return pipeline("train", "--config", ROOT / "configs" / "cosmoflow.yaml", "--run-dir", run,
                    "--set", f"data.dir={data}", "--set", "train.max_steps=3", *sets)


@pytest.mark.root
def test_read_only_sources_staged_copies_and_changed_files(raw, tmp_path):
    require_root("a read-only bind mount", "root")
    ro = tmp_path / "ro"
    ro.mkdir()
    # A real read-only file system (root ignores permission bits): a read-only bind mount.
    subprocess.run(["mount", "--bind", str(raw / "cosmoflow"), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        with pytest.raises(OSError):
            (ro / "probe").write_text("x")
        index(raw, "cosmoflow", tmp_path / "cf", ro)
        r = _short_run(tmp_path / "cf", tmp_path / "run-ro")
        assert r.returncode == 0, r.stderr
    finally:
        subprocess.run(["umount", str(ro)], check=True)

    # Staged to "node-local disk": the originals move away, data.root points at the copy.
    src = tmp_path / "src"
    shutil.copytree(raw / "cosmoflow", src)
    index(raw, "cosmoflow", tmp_path / "cf2", src)
    staged = tmp_path / "local"
    src.rename(staged)
    missing = _short_run(tmp_path / "cf2", tmp_path / "run-missing")
    assert_user_error(missing, str(src / "univ-"), "missing", "data.root")
    r = _short_run(tmp_path / "cf2", tmp_path / "run-staged", "--set", f"data.root={staged}")
    assert r.returncode == 0, r.stderr

    # A file that changed size since indexing is named before any rank starts.
    victim = sorted(staged.glob("univ-*.h5"))[-1]
    with open(victim, "ab") as f:
        f.write(b"\0" * 16)
    changed = _short_run(tmp_path / "cf2", tmp_path / "run-changed", "--set", f"data.root={staged}")
    assert_user_error(changed, victim.name, "size changed since indexing")
    assert not (tmp_path / "run-changed").exists()
    os.truncate(victim, victim.stat().st_size - 16)


def test_layout_and_target_rules():
    from pipeline.data.layout import Layout
    from pipeline.target import parse as parse_target
    from pipeline.train import checkpoint

    lay = Layout("full", "unitPar", "one", 16, (32, 48, 32, 4))
    assert lay.grid == (2, 3, 2) and lay.samples_in_file((32, 48, 32, 4)) == 12
    assert lay.cube(5) == (slice(0, 16), slice(32, 48), slice(16, 32), slice(None))
    assert Layout(per_file="many").sample_shape((10, 8, 8, 2)) == (8, 8, 2)
    assert Layout(per_file="one").target_shape((8, 8)) == (8, 8)
    assert parse_target(0.9) == parse_target("0.9") == ("val_accuracy", ">=", 0.9)
    assert parse_target("val_mae<=0.2") == parse_target("mae <= 0.2") == ("val_mae", "<=", 0.2)
    assert [checkpoint.direction(m) for m in ("val_loss", "val_mae", "val_mean_iou", "val_accuracy")] == \
        ["min", "min", "max", "max"]
    assert checkpoint.direction("val_mae", "max") == "max"


def test_any_metric_as_the_target(tmp_path):

    m = [{"epoch": e, "step": 10 * e, "time": 1_700_000_000.0 + e, "val_loss": 1.0, "val_mae": mae}
         for e, mae in ((1, 0.4), (2, 0.25), (3, 0.18))]
    d = write_run(tmp_path / "r", ranks=1, steps=30, metrics=m)
    r = pipeline("analyze", d, "--json", "--target", "val_mae<=0.2")
    tta = json.loads(r.stdout)["runs"][0]["time_to_accuracy"]
    assert (tta["metric"], tta["op"], tta["reached"], tta["step"], tta["best"]) == ("val_mae", "<=", True, 30, 0.18)
    assert "time to val_mae <= 0.2" in pipeline("analyze", d, "--target", "val_mae<=0.2").stdout
    assert_user_error(pipeline("analyze", d, "--target", "mae=<0.2"), "--target")


def test_list_and_mapping_keys_from_the_command_line():
    from pipeline import config

    cfg = config.load(None, ["train.metrics=[mae, mse]", "model.args.filters=8", "model.args.dense=[32, 16]",
                             "checkpoint.keep_best=val_mae"])
    assert cfg.train.metrics == ["mae", "mse"] and cfg.model.args == {"filters": 8, "dense": [32, 16]}
    with pytest.raises(config.ConfigError, match="train.metrics must be list"):
        config.load(None, ["train.metrics=mae"])
    with pytest.raises(config.ConfigError, match="keep_best 'val_iou' is not written"):
        config.load(None, ["checkpoint.keep_best=val_iou"])
    with pytest.raises(config.ConfigError, match="train.batch_size is not a mapping"):
        config.load(None, ["train.batch_size.x=1"])
