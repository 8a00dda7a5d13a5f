"""The TensorFlow stack (pipeline/stack.py): which Keras `tf.keras` must be, decided from what the
process sees (the install record, the installed TensorFlow, the environment), with hand-made
inputs for every stack; then, on whichever stack this venv runs, that `import pipeline` gives
Keras 2 and Horovod's kind of variables."""

import json
import subprocess
import sys
import types

import pytest
from conftest import ROOT, env

from pipeline import stack
from pipeline.cluster import doctor
from pipeline.errors import UserError
from pipeline.runtime import dist


@pytest.mark.parametrize("text, want", [("2.15.1", (2, 15, 1)), ("2.17.0rc1", (2, 17, 0)), ("2.18", (2, 18)),
                                        ("", ()), (None, ()), ("dev", ())])
def test_versions_are_read_as_numbers(text, want):
    assert stack.version_tuple(text) == want


@pytest.mark.parametrize("tf, environ, want", [
    ("2.15.1", {}, None),  # its own Keras 2; the variable would make tf.keras resolve to nothing
    ("2.16.2", {}, "1"),
    ("2.17.1", {}, "1"),
    ("2.18.1", {}, "1"),
    ("2.17.1", {"TF_USE_LEGACY_KERAS": "0"}, None),  # the user's own setting wins (and is checked later)
    ("2.15.1", {"TF_USE_LEGACY_KERAS": "1"}, None),  # the user's too (and refused later: no Keras at all)
    (None, {}, None),  # no TensorFlow installed: nothing to decide
    # inherited from a pipeline process of the other stack: dropped on 2.15, kept on 2.17
    ("2.15.1", {"TF_USE_LEGACY_KERAS": "1", "PIPELINE_SET_TF_USE_LEGACY_KERAS": "1"}, ""),
    ("2.17.1", {"TF_USE_LEGACY_KERAS": "1", "PIPELINE_SET_TF_USE_LEGACY_KERAS": "1"}, None),
])
def test_the_legacy_keras_variable_follows_the_stack(tf, environ, want):
    assert stack.legacy_setting(tf, environ) == want


def test_the_record_says_the_stack_before_the_installed_packages_do():
    installed = {"tensorflow-cpu": "2.15.1"}.get
    assert stack.tf_version_of({"stack": {"request": "2.17", "tensorflow": "2.17.1"}}, installed) == "2.17.1"
    assert stack.tf_version_of({}, installed) == "2.15.1"  # a record from before the stacks, or none
    assert stack.tf_version_of({}, {"tensorflow": "2.18.1"}.get) == "2.18.1"  # the and-cuda package
    assert stack.tf_version_of({}, {}.get) is None


def test_the_stack_asked_for_is_read_from_the_record():
    assert stack.request_of({"stack": {"request": "2.18"}}) == "2.18"
    assert stack.request_of({"gpu": "none"}) == "2.15"  # a record from before the stacks
    assert stack.request_of({}) == "-"  # not a venv of make env


def test_a_record_is_read_from_the_venv_and_a_damaged_one_counts_as_none(tmp_path):
    assert stack.record_of(tmp_path) == {}
    (tmp_path / "pipeline-env.json").write_text('{"stack": {"request": "2.17"')
    assert stack.record_of(tmp_path) == {}
    (tmp_path / "pipeline-env.json").write_text(json.dumps({"stack": {"request": "2.17"}}))
    assert stack.record_of(tmp_path)["stack"]["request"] == "2.17"


@pytest.mark.parametrize("tf, environ, tf_keras, keras, words", [
    ("2.15.1", {}, None, "2.15.0", None),
    ("2.17.1", {"TF_USE_LEGACY_KERAS": "1"}, "2.17.0", "2.17.0", None),
    # TF 2.17 without tf-keras: Keras 3
    ("2.17.1", {"TF_USE_LEGACY_KERAS": "1"}, None, "3.6.0",
     ["TensorFlow 2.17.1: tf.keras is Keras 3.6.0", "Horovod 0.28.1 needs Keras 2", "tf-keras==2.17.*",
      "make env TF=2.17"]),
    # tf-keras there, but the user turned the switch off
    ("2.18.1", {"TF_USE_LEGACY_KERAS": "0"}, "2.18.0", "3.8.0",
     ["tf.keras is Keras 3.8.0", "tf-keras 2.18.0 is installed but TF_USE_LEGACY_KERAS='0'", "set it to 1"]),
    # everything right, but TensorFlow came in first (a user script imported it before pipeline)
    ("2.17.1", {"TF_USE_LEGACY_KERAS": "1"}, "2.17.0", "3.6.0", ["import pipeline before tensorflow"]),
    # TF 2.15 with the variable set and no tf_keras: no Keras at all
    ("2.15.1", {"TF_USE_LEGACY_KERAS": "1"}, None, None, ["tf.keras resolves to no Keras", "make env"]),
])
def test_what_is_wrong_with_tf_keras_is_said_in_one_line(tf, environ, tf_keras, keras, words):
    problem = stack.keras_problem(tf, environ, tf_keras, keras)
    if words is None:
        assert problem is None
    else:
        assert problem and "\n" not in problem and all(w in problem for w in words), problem


def test_require_keras2_raises_a_user_error_quiet_on_the_other_ranks(monkeypatch):
    keras3 = types.ModuleType("keras")
    keras3.__version__ = "3.6.0"
    model = type("Model", (), {"__module__": "keras.src.models.model"})
    fake_tf = types.SimpleNamespace(__version__="2.17.1", keras=types.SimpleNamespace(Model=model))
    monkeypatch.setitem(sys.modules, "keras", keras3)
    monkeypatch.setattr(stack, "installed_version", lambda name: None)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    with pytest.raises(UserError, match="tf.keras is Keras 3.6.0") as e:
        dist.keras2(fake_tf)
    assert e.value.quiet
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "0")
    with pytest.raises(UserError) as e:
        dist.keras2(fake_tf)
    assert not e.value.quiet


@pytest.mark.parametrize("environ, want", [({"OMPI_COMM_WORLD_RANK": "3"}, 3), ({"PMIX_RANK": "1"}, 1),
                                           ({"SLURM_PROCID": "2"}, 2), ({"HOROVOD_RANK": "0"}, 0), ({}, None)])
def test_the_rank_is_known_from_the_launcher_before_horovod_starts(environ, want):
    assert dist.launcher_rank(environ) == want


def test_a_standalone_keras3_object_is_told_apart_from_tf_keras(monkeypatch):
    keras = types.ModuleType("keras")
    keras.__version__ = "3.6.0"
    monkeypatch.setitem(sys.modules, "keras", keras)
    Model = type("Sequential", (), {"__module__": "keras.src.models.sequential"})
    assert stack.keras3_object(Model()) == "3.6.0"
    TfKeras = type("Sequential", (), {"__module__": "tf_keras.src.engine.sequential"})
    assert stack.keras3_object(TfKeras()) is None
    keras.__version__ = "2.15.0"  # TF 2.15: `import keras` is tf.keras's own Keras 2
    assert stack.keras3_object(Model()) is None


def test_tensorflows_import_noise_is_dropped_and_the_rest_kept():
    text = ("E0000 00:00:1 cuda_fft.cc:485] Unable to register cuFFT factory: Attempting to register factory\n"
            "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            "E0000 cuda_blas.cc:1418] Unable to register cuBLAS factory: Attempting to register\n"
            "a warning of the user's own\n")
    assert stack.quiet(text) == "a warning of the user's own\n"


@pytest.mark.parametrize("report, want", [
    ({"tensorflow": "2.17.1", "keras": "2.17.0", "tf_stack": "2.17"},
     "stack (rank 0): TensorFlow 2.17.1 with Keras 2.17.0 as tf.keras; make env TF=2.17"),
    ({"tensorflow": "2.16.1", "keras": "2.16.0", "tf_stack": "-"},
     "stack (rank 0): TensorFlow 2.16.1 with Keras 2.16.0 as tf.keras; not a venv of make env "
     "(make env TF=2.15|2.17|2.18|system)"),
])
def test_doctor_says_the_stack(report, want):
    assert doctor.stack_line(report) == want


def test_import_pipeline_gives_keras2_on_this_stack_with_quiet_imports():
    """On whichever stack this venv runs (make test runs it on both): TF_USE_LEGACY_KERAS is set
    exactly when the TensorFlow is >= 2.16, tf.keras is Keras 2 with tf.Variable weights (what
    Horovod's broadcast and optimizer need), and the import prints none of TensorFlow's noise."""
    code = ("import os, pipeline, tensorflow as tf; from pipeline import stack\n"
            "m = tf.keras.Sequential([tf.keras.layers.Dense(2, input_shape=(3,))])\n"
            "print(os.environ.get('TF_USE_LEGACY_KERAS'), stack.require_keras2(tf), tf.__version__,\n"
            "      isinstance(m.weights[0], tf.Variable), stack.loaded_keras_version(tf))")
    e = {k: v for k, v in env().items() if k != "TF_USE_LEGACY_KERAS"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**e, "TF_CPP_MIN_LOG_LEVEL": "2"},
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    legacy, keras, tf_version, is_variable, keras_after = r.stdout.split()
    assert legacy == ("1" if stack.needs_legacy_keras(tf_version) else "None")
    assert keras.startswith("2.") and is_variable == "True"
    # the installed Keras 2 package's version, before and after a model is built
    want = stack.installed_version("tf-keras" if stack.needs_legacy_keras(tf_version) else "keras")
    assert keras == keras_after == want
    assert "Unable to register" not in r.stderr, r.stderr


def test_cuinit_noise_is_dropped_only_where_nothing_shows_a_gpu(tmp_path, capfd):
    """TensorFlow 2.18's CPU wheel logs `failed call to cuInit` at its first device listing; on a
    machine with no GPU it says nothing and is dropped, on a GPU node it is kept. Here the C++
    side is played by a write to fd 2."""
    import os

    line = b"E0000 cuda_driver.cc:152] failed call to cuInit: INTERNAL: CUDA error: UNKNOWN ERROR (303)\n"
    dev = tmp_path / "dev"
    dev.mkdir()
    with dist._quiet_cuinit(None, str(dev)):
        os.write(2, line + b"kept\n")
    assert capfd.readouterr().err == "kept\n"
    with dist._quiet_cuinit("SLURM_JOB_GPUS=0", str(dev)):  # the job was given a GPU
        os.write(2, line)
    assert "failed call to cuInit" in capfd.readouterr().err
    (dev / "nvidia0").write_text("")  # the node has one
    with dist._quiet_cuinit(None, str(dev)):
        os.write(2, line)
    assert "failed call to cuInit" in capfd.readouterr().err
