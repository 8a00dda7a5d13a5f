"""`make env`'s choice of build, through its dry run on this machine's ready venv: told
(GPU=cuda), found (GPU=auto with an nvidia-smi on PATH that lists a GPU, as a GPU node's
does), or the CPU build when nothing shows a GPU. The dry run changes nothing in the venv."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

FAKE_SMI = '#!/bin/sh\n[ "$1" = -L ] && echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-8e0b6f1d-2c3a-4b5c-9d8e-7f6a5b4c3d2e)"\n'


def venv_state() -> dict:
    venv = ROOT / ".venv"
    return {p.relative_to(venv).as_posix(): p.stat().st_mtime_ns for p in
            [venv / "pipeline-env.json", venv / ".ready", *(venv / "lib").glob("python3*/site-packages/*")]
            if p.exists()}


def fake_nvcc(tmp_path, release: str) -> Path:
    """A CUDA toolkit folder whose bin/nvcc answers --version as NVIDIA's does."""
    bin_dir = tmp_path / f"cuda-{release}" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "nvcc").write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Cuda compilation tools, release '
                                  f'{release}, V{release}.140"\n')
    (bin_dir / "nvcc").chmod(0o755)
    return bin_dir


def setup_env(tmp_path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GPU", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES", "NCCL_HOME", "NCCL_ROOT", "CUDA_HOME",
                        "HOROVOD_CUDA_HOME", "TF")}
    # The default stack unless the test names one (without TF= the venv's own stack is kept,
    # and make test-stack2 runs these on the other stack's venv).
    return {**env, "TF": "2.15", **extra}


def dry_run(tmp_path, gpu: str | None, smi: bool = False, device: bool = False, **extra) -> str:
    env = setup_env(tmp_path, **extra)
    dev = tmp_path / "dev"  # this machine's /dev stands aside: only what the test puts here counts
    dev.mkdir()
    if device:
        (dev / "nvidia0").write_text("")
    env["SETUP_DEV_DIR"] = str(dev)
    if smi:
        (tmp_path / "nvidia-smi").write_text(FAKE_SMI)
        (tmp_path / "nvidia-smi").chmod(0o755)
        env["PATH"] = f"{tmp_path}{os.pathsep}{env['PATH']}"
    args = ["make", "-s", "env", "SETUP_DRY_RUN=1"] + ([f"GPU={gpu}"] if gpu else [])
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("gpu, smi, device, why", [
    ("cuda", False, False, "(GPU=cuda)"),  # a login node, told
    (None, True, False, "(GPU=auto: nvidia-smi -L lists 1 GPU(s))"),  # a GPU node's nvidia-smi
    (None, False, True, "dev/nvidia0 exists)"),  # a device file, no nvidia-smi on PATH
], ids=["told", "nvidia-smi", "device"])
def test_a_gpu_build_names_cuda_tensorflow_nccl_and_where_nccl_comes_from(tmp_path, gpu, smi, device, why):
    before = venv_state()
    out = dry_run(tmp_path, gpu, smi, device)
    assert "[setup] dry run: nothing is installed or changed" in out
    assert "[setup] TensorFlow requirement: tensorflow[and-cuda]==2.15.1" in out
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in out and "HOROVOD_NCCL_" in out and "NCCL from: " in out
    build = next(line for line in out.splitlines() if line.startswith("[setup] build: "))
    assert build.startswith("[setup] build: nccl (GPU=") and build.endswith(why), build
    assert venv_state() == before


def test_nothing_that_shows_a_gpu_gives_the_cpu_build(tmp_path):
    before = venv_state()
    out = dry_run(tmp_path, None)
    assert "[setup] TensorFlow requirement: tensorflow-cpu==2.15.1" in out
    variables = out.split("build variables: ")[1].splitlines()[0]
    assert variables.endswith("HOROVOD_GPU_OPERATIONS=") and "NCCL" not in variables
    assert venv_state() == before


def test_an_unknown_build_is_refused():
    r = subprocess.run(["bash", "scripts/setup-env.sh"], cwd=ROOT, env={**os.environ, "GPU": "rocm"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "setup-env.sh: GPU must be cuda, none or auto, got 'rocm'"


def test_the_cuda_compiler_must_be_tensorflows_cuda_major(tmp_path):
    """nvcc 12.x (TensorFlow 2.15.1 is built for 12.2) is used and said; nvcc 13 would give
    Horovod's kernels another CUDA runtime than TensorFlow's: the dry run says the build would
    stop, and the real run stops with exit 2 and one line before it installs anything."""
    before = venv_state()
    good = fake_nvcc(tmp_path, "12.4")
    (tmp_path / "a").mkdir()
    out = dry_run(tmp_path / "a", "cuda", HOROVOD_CUDA_HOME=str(good.parent))
    assert f"CUDA compiler from: site CUDA 12.4 at {good.parent} (HOROVOD_CUDA_HOME)" in out
    assert f"HOROVOD_CUDA_HOME={good.parent} " in out and "would stop" not in out

    bad = fake_nvcc(tmp_path, "13.0")
    env = setup_env(tmp_path, PATH=f"{bad}{os.pathsep}{os.environ['PATH']}", GPU="cuda")
    (tmp_path / "b").mkdir()
    out = dry_run(tmp_path / "b", "cuda", PATH=env["PATH"])
    assert f"would stop (exit 2): nvcc 13.0 at {bad.parent} (nvcc on PATH), but TensorFlow 2.15.1 is built for " \
           f"CUDA 12.2" in out
    r = subprocess.run(["bash", "scripts/setup-env.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.startswith("setup-env.sh: GPU build (GPU=cuda): nvcc 13.0 at ") and r.stderr.count("\n") == 1
    assert venv_state() == before


# --- the TensorFlow stacks (TF=2.15|2.17|2.18|system, docs/setup.md) ---

@pytest.mark.parametrize("tf, gpu, requirement, stack_line", [
    ("2.17", None, "tensorflow-cpu==2.17.1", "stack: TF=2.17 (TensorFlow 2.17.1, tf-keras 2.17.0)"),
    ("2.17.1", None, "tensorflow-cpu==2.17.1", "stack: TF=2.17 (TensorFlow 2.17.1, tf-keras 2.17.0)"),
    ("2.18", "cuda", "tensorflow[and-cuda]==2.18.1", "stack: TF=2.18 (TensorFlow 2.18.1, tf-keras 2.18.0)"),
    ("2.15", None, "tensorflow-cpu==2.15.1", "stack: TF=2.15 (TensorFlow 2.15.1)"),
])
def test_each_stack_names_its_tensorflow_and_tf_keras(tmp_path, tf, gpu, requirement, stack_line):
    before = venv_state()
    out = dry_run(tmp_path, gpu, TF=tf)
    assert f"[setup] TensorFlow requirement: {requirement}" in out
    assert f"[setup] {stack_line}; installed stack now: " in out
    assert venv_state() == before


def test_a_stacks_cuda_is_the_one_its_and_cuda_extra_brings(tmp_path):
    """TensorFlow 2.18.1 is built for CUDA 12.5: nvcc 11.8 is refused naming both."""
    old = fake_nvcc(tmp_path, "11.8")
    out = dry_run(tmp_path, "cuda", TF="2.18", HOROVOD_CUDA_HOME=str(old.parent))
    assert "would stop (exit 2): nvcc 11.8 at " in out and "TensorFlow 2.18.1 is built for CUDA 12.5" in out


def run_setup(tmp_path, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/setup-env.sh"], cwd=ROOT, env=setup_env(tmp_path, **extra),
                          capture_output=True, text=True, timeout=120)


def test_an_unknown_stack_is_refused():
    r = subprocess.run(["bash", "scripts/setup-env.sh"], cwd=ROOT, env={**os.environ, "TF": "2.16"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == \
        "setup-env.sh: TF must be 2.15, 2.17, 2.18 or system, got '2.16' (docs/setup.md, the stacks)"


def test_a_python_the_stack_has_no_wheels_for_is_refused_before_anything_is_made(tmp_path):
    fake = tmp_path / "python3.10"
    fake.write_text('#!/bin/sh\necho 3.10\n')
    fake.chmod(0o755)
    r = run_setup(tmp_path, TF="2.15", PYTHON=str(fake), VENV=str(tmp_path / "venv"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == f"setup-env.sh: TF=2.15 needs Python 3.11, but {fake} is Python 3.10 (set PYTHON=, " \
                               f"or another TF=)"
    assert not (tmp_path / "venv").exists()


def test_tf_system_needs_the_sites_tensorflow_and_a_venv_of_its_kind(tmp_path):
    """TF=system installs neither TensorFlow nor Horovod: a Python without them is refused in one
    line, before a venv is made; and a venv of another stack (its own packages) is not turned
    into one with the site's."""
    bare = str(Path(sys.base_prefix) / "bin" / "python3")  # the Python this venv was made from
    r = run_setup(tmp_path, TF="system", PYTHON=bare, VENV=str(tmp_path / "venv"), PYTHONPATH="")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"setup-env.sh: TF=system: {bare} cannot import tensorflow and horovod.tensorflow "
                               f"(ModuleNotFoundError: No module named "), r.stderr
    assert not (tmp_path / "venv").exists()

    r = run_setup(tmp_path, TF="system", PYTHON=sys.executable, VENV=str(tmp_path / "venv"))
    assert r.returncode == 2 and r.stderr.strip() == (
        f"setup-env.sh: TF=system: {sys.executable} is a venv's Python, whose packages a venv made from it would not "
        f"see; set PYTHON= to the site's or the container's Python")

    before = venv_state()
    r = run_setup(tmp_path, TF="system", VENV=".venv")
    assert r.returncode == 2 and r.stderr.strip() == (
        "setup-env.sh: TF=system needs a venv with the site's packages, but .venv has its own; use another VENV= "
        "(for example VENV=.venv-system)")
    assert venv_state() == before


@pytest.mark.mpi  # the set-up prints `mpirun --version`
def test_tf_system_uses_the_sites_tensorflow_and_horovod_as_they_are(tmp_path):
    """A site module as clusters ship one: the base Python with PYTHONPATH holding TensorFlow
    and Horovod (here: the default venv's packages). TF=system makes a venv on it that installs
    neither, holds the site's versions, records them, and checks the stack as doctor would."""
    site = next((ROOT / ".venv" / "lib").glob("python3*/site-packages"))
    venv = tmp_path / "venv"
    r = run_setup(tmp_path, TF="system", PYTHON=str(Path(sys.base_prefix) / "bin" / "python3"), VENV=str(venv),
                  PYTHONPATH=str(site), TF_CPP_MIN_LOG_LEVEL="2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[setup] stack: TF=system: " in r.stdout and "installing neither" in r.stdout
    assert "[setup] stack: TensorFlow 2.15.1, tf.keras is Keras 2.15.0" in r.stdout
    assert not list((venv / "lib").glob("python3*/site-packages/tensorflow*"))  # the site's, not a copy
    assert not list((venv / "lib").glob("python3*/site-packages/horovod*"))
    held = dict(line.split("==") for line in (venv / "held-by-site.txt").read_text().split())
    assert held["tensorflow-cpu"] == "2.15.1" and held["horovod"] == "0.28.1"
    rec = json.loads((venv / "pipeline-env.json").read_text())["stack"]
    assert rec["request"] == "system" and rec["tensorflow"] == "2.15.1" and rec["horovod"] == "0.28.1"


def test_without_tf_the_venv_keeps_its_stack(tmp_path):
    """make env TF=2.17 once; later make train / make test (no TF=) must not switch back to 2.15."""
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / "pipeline-env.json").write_text(json.dumps({"stack": {"request": "2.17", "tensorflow": "2.17.1"}}))
    out = dry_run(tmp_path, None, TF="", VENV=str(venv))
    assert "[setup] stack: TF=2.17 (TensorFlow 2.17.1, tf-keras 2.17.0); installed stack now: " in out
    assert "[setup] TensorFlow requirement: tensorflow-cpu==2.17.1" in out
    (tmp_path / "new").mkdir()
    out = dry_run(tmp_path / "new", None, TF="", VENV=str(tmp_path / "new" / "venv"))  # a new venv: 2.15
    assert "[setup] TensorFlow requirement: tensorflow-cpu==2.15.1" in out
