"""Across the two TensorFlow stacks (docs/setup.md, the stacks): `make test-stack2` runs this file
on the second stack's venv (TF2, default 2.17) with the default venv's Python in
OTHER_STACK_PYTHON, so each test has both stacks at hand; `make test` runs it that way.

A checkpoint written under one stack restores under the other, in both directions: the same
tensors read by both TensorFlows, and the resumed steps' losses those of the run that wrote it.
On a stack >= 2.16, a Keras 3 tf.keras (TF_USE_LEGACY_KERAS=0) and a model file built with the
standalone Keras 3 package are refused in one line; on 2.15 the same file trains."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, assert_user_error, env, read_steps

from pipeline import stack

pytestmark = pytest.mark.stacks


def other_python() -> str:
    path = os.environ.get("OTHER_STACK_PYTHON")
    if not path:
        pytest.fail("tests/test_stacks.py needs OTHER_STACK_PYTHON (the other stack's venv Python): "
                    "run it with make test-stack2")
    return path


def run(python: str, *args, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([python, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                          env={**env(), **(extra_env or {})}, cwd=ROOT, timeout=600, stdin=subprocess.DEVNULL)


@functools.cache
def tf_of(python: str) -> str:
    r = subprocess.run([python, "-c", "from pipeline import stack\n"
                                      "print(stack.tf_version_of(stack.record_of()))"],
                       capture_output=True, text=True, env=env(), cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def train(python, data, run_dir, steps):
    return run(python, "train", "--config", ROOT / "configs" / "default.yaml", "--run-dir", run_dir,
               "--set", f"data.dir={data}", "--set", "train.batch_size=32", "--set", "train.deterministic=true",
               "--set", f"train.max_steps={steps}", "--set", "checkpoint.every_steps=10")


def losses(run_dir: Path) -> dict[int, float]:
    return {x["step"]: x["loss"] for x in read_steps(run_dir / "steps" / "rank-0.jsonl")}


@pytest.mark.parametrize("direction", ["this-to-other", "other-to-this"])
def test_a_checkpoint_written_under_one_stack_resumes_under_the_other(tmp_path, small_dataset, direction):
    this, other = sys.executable, other_python()
    writer, reader = (this, other) if direction == "this-to-other" else (other, this)
    assert tf_of(writer) != tf_of(reader), "OTHER_STACK_PYTHON runs the same TensorFlow as this venv"
    run_dir = tmp_path / "run"
    first = train(writer, small_dataset, run_dir, 20)
    assert first.returncode == 0, first.stdout + first.stderr
    written = losses(run_dir)
    # Both TensorFlows read the same tensors from the checkpoint at step 20.
    a, b = run(writer, "checkpoint", "digest", run_dir), run(reader, "checkpoint", "digest", run_dir)
    assert a.returncode == 0 and a.stdout.startswith("step 20 ") and a.stdout == b.stdout, (a, b)
    # Resume from step 10 under the other stack: steps 11-20 again, from the restored weights and
    # optimizer state, on the same batches.
    shutil.rmtree(run_dir / "checkpoints" / "step-00000020")
    second = train(reader, small_dataset, run_dir, 20)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming after step 10" in second.stdout, second.stdout
    resumed = [x for x in read_steps(run_dir / "steps" / "rank-0.jsonl") if x["step"] > 10][-10:]
    assert [x["step"] for x in resumed] == list(range(11, 21))
    # Another TensorFlow's kernels round differently; a restore that lost the weights or the
    # optimizer's state would put the first resumed loss far off, not in the fourth digit.
    for x in resumed[:3]:
        assert x["loss"] == pytest.approx(written[x["step"]], rel=1e-3), (x["step"], x["loss"], written)
    versions = json.loads((run_dir / "config.json").read_text())["versions"]
    assert versions["tensorflow"] == tf_of(reader)


def newer_python() -> str:
    """The Python of the stack with TensorFlow >= 2.16 (Keras 3 installed beside tf-keras)."""
    for python in (sys.executable, other_python()):
        if stack.needs_legacy_keras(tf_of(python)):
            return python
    pytest.fail("neither stack runs TensorFlow >= 2.16")


def test_keras3_as_tf_keras_is_refused_in_one_line(tmp_path, small_dataset):
    r = run(newer_python(), "train", "--run-dir", tmp_path / "run3", "--set", f"data.dir={small_dataset}",
            "--set", "train.max_steps=5", extra_env={"TF_USE_LEGACY_KERAS": "0"})
    assert_user_error(r, "tf.keras is Keras 3.", "Horovod 0.28.1 needs Keras 2", "TF_USE_LEGACY_KERAS='0'",
                      "set it to 1")
    assert not (tmp_path / "run3" / "checkpoints").exists()


KERAS3_MODEL = """
import keras  # the standalone package: Keras 3 on TensorFlow >= 2.16, tf.keras's own Keras on 2.15


def build(input_shape, target_shape, num_classes):
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))
"""


def test_a_model_file_built_with_keras3_is_refused_naming_the_file_and_trains_on_2_15(tmp_path, small_dataset):
    model = tmp_path / "mymodel.py"
    model.write_text(textwrap.dedent(KERAS3_MODEL))
    for python in (sys.executable, other_python()):
        run_dir = tmp_path / f"run-{tf_of(python)}"
        r = run(python, "train", "--run-dir", run_dir, "--set", f"data.dir={small_dataset}",
                "--set", f"model.name={model}:build", "--set", "train.max_steps=5")
        if stack.needs_legacy_keras(tf_of(python)):
            assert_user_error(r, str(model), "built a Keras 3.", "(import keras)", "build it with tf.keras")
        else:
            assert r.returncode == 0, r.stderr
            assert (run_dir / "checkpoints" / "step-00000005").is_dir(), r.stdout
