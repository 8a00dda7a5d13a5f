"""User errors through the real command: exit 2, one line naming the thing, nothing damaged."""

import json
import shutil

import pytest
from conftest import assert_user_error, pipeline


def snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def trained_run(tmp_path, small_dataset):
    """A run directory that already holds a config, logs and a checkpoint."""
    run = tmp_path / "run"
    r = pipeline("train", "--run-dir", run, "--set", f"data.dir={small_dataset}", "--set", "train.max_steps=3",
                 "--set", "model.name=mlp")
    assert r.returncode == 0, r.stderr
    return run


def test_errors_leave_an_existing_run_untouched(tmp_path, trained_run, small_dataset):
    before = snapshot(trained_run)
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(small_dataset, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    missing = manifest["splits"]["train"]["shards"][1]["file"]
    (broken / missing).unlink()
    cases = [
        ([f"data.dir={tmp_path / 'nowhere'}"], [str(tmp_path / "nowhere"), "data directory not found"]),
        ([f"data.dir={empty}"], [str(empty / "manifest.json"), "manifest missing", "empty"]),
        ([f"data.dir={broken}"], [str(broken / missing), "missing"]),
        (["train.bach_size=4"], ["train.bach_size", "unknown key"]),
        (["train.batch_size=many"], ["train.batch_size must be int"]),
        (["train.batch_size=-1"], ["train.batch_size must be > 0"]),
        ([f"data.dir={small_dataset}", "train.batch_size=100000"], ["fewer than train.batch_size=100000"]),
    ]
    for overrides, words in cases:
        args = ["train", "--run-dir", trained_run]
        for o in overrides:
            args += ["--set", o]
        if not any(o.startswith("data.dir") for o in overrides):
            args += ["--set", f"data.dir={small_dataset}"]
        assert_user_error(pipeline(*args), *words)
    assert snapshot(trained_run) == before


def test_bad_flags_and_files(tmp_path):
    assert_user_error(pipeline("train"), "--run-dir")
    assert_user_error(pipeline("train", "--run-dir", tmp_path / "r", "--config", tmp_path / "no.yaml"),
                      "no.yaml", "config file not found")
    assert_user_error(pipeline("frobnicate"), "invalid choice")
    assert_user_error(pipeline("checkpoint", "digest", tmp_path), "no complete checkpoint")
    assert_user_error(pipeline("data", "synth", "--out", tmp_path / "d", "--shards", "0"), "--shards")
    assert not (tmp_path / "r").exists()


def test_verify_reports_each_bad_shard(tmp_path, small_dataset):
    d = tmp_path / "d"
    shutil.copytree(small_dataset, d)
    ok = pipeline("data", "verify", d)
    assert ok.returncode == 0 and "match the manifest" in ok.stdout
    shard = sorted(d.glob("train-*.h5"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated
    r = pipeline("data", "verify", d)
    assert r.returncode == 2 and str(shard) in r.stderr and "Traceback" not in r.stderr
