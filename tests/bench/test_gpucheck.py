"""`make gpu-check` (pipeline/bench/gpucheck.py, scripts/gpu-check.sh) on this machine, which has
no GPU: the one-line answer; the node's part on a stand-in `nvidia-smi` (a script printing what
the real one prints on a 4 x H100 node: the only thing simulated) with TensorFlow hidden and
the interpreter held to the standard library (`python -S`); and the whole sequence on the CPU
(GPU_CHECK_CPU=1), for real."""

import json
import os
import subprocess
import sys

from conftest import ROOT, env

SMI = r'''#!/bin/sh
case "$*" in
  -L) for i in 0 1 2 3; do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-0000000$i-aaaa-bbbb-cccc-dddddddddddd)"; done ;;
  --query-gpu=*) for i in 0 1 2 3; do echo "$i, GPU-0000000$i-aaaa-bbbb-cccc-dddddddddddd, NVIDIA H100 80GB HBM3, 81559, 550.54.15"; done ;;
  *) echo "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4     |" ;;
esac
'''


def _env(tmp_path, **extra):
    e = env()
    e.update({k: str(v) for k, v in extra.items()})
    return e


def test_without_a_gpu_one_line_and_exit_0(tmp_path):
    (tmp_path / "dev").mkdir()
    e = _env(tmp_path, GPU_CHECK_DEV=tmp_path / "dev", GPU_CHECK_OUT=tmp_path / "out")
    e["PATH"] = os.pathsep.join(p for p in e["PATH"].split(os.pathsep)
                                if not os.path.exists(os.path.join(p, "nvidia-smi")))
    r = subprocess.run(["make", "-s", "gpu-check"], cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and "no NVIDIA GPU" in r.stdout
    assert not (tmp_path / "out").exists()


def test_the_node_part_runs_on_the_standard_library_with_tensorflow_hidden(tmp_path):
    bin_, hide = tmp_path / "bin", tmp_path / "hide" / "tensorflow"
    bin_.mkdir()
    (bin_ / "nvidia-smi").write_text(SMI)
    (bin_ / "nvidia-smi").chmod(0o755)
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    e = _env(tmp_path, PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}",
             PYTHONPATH=f"{tmp_path / 'hide'}{os.pathsep}{ROOT}")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-S", "-m", "pipeline.bench.gpucheck", "--out", str(out)], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert [g["name"] for g in res["node"]["gpus"]] == ["NVIDIA H100 80GB HBM3"] * 4
    assert res["node"]["driver_cuda"] == "12.4"
    pins = {row["local_ranks"]: row for row in res["node"]["pinning"]}
    assert pins[4]["mpirun"] == ["0", "1", "2", "3"] and pins[4]["srun_gpus_per_task"] == ["0"] * 4
    assert pins[2]["mpirun"] == ["0", "1"]
    assert res["node"]["peaks"][0]["float32"]["tflops"] == 494.5  # TF32 on an H100 SXM
    assert any("build: nccl" in line for line in res["node"]["install"]["lines"])
    assert "with_tf" not in res and "## pipeline doctor" not in md
    assert any("TensorFlow is not importable" in s for s in res["skipped"])
    assert any("NVML" in s for s in res["skipped"])  # nvidia-ml-py: not on the standard library
    assert "| 4 | 0, 1, 2, 3 | 0, 0, 0, 0 |" in md and "## Skipped" in md


def test_the_whole_sequence_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["make", "-s", "gpu-check"], cwd=ROOT, env=_env(tmp_path, GPU_CHECK_CPU=1, GPU_CHECK_OUT=out),
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert res["with_tf"]["doctor"]["exit"] == 0
    rows = res["with_tf"]["training"]
    assert [(x["model"], x["mode"]) for x in rows] == [
        (m, mode) for m in ("cnn", "keras.applications.ResNet50") for mode in ("float32", "float32 + XLA")]
    for x in rows:
        assert "error" not in x and "keras_error" not in x, x
        assert x["ratio"] == x["pipeline_samples_per_s_per_gpu"] / x["keras_samples_per_s"]
        assert 0 < x["pipeline_mfu"] and 0 < x["keras_mfu"] and x["model_flops_per_sample"] > 0
    skipped = "\n".join(res["skipped"])
    assert "mixed_float16: float16 needs a GPU" in skipped and "NCCL allreduce" in skipped
    assert "| cnn | float32 |" in md and "## Skipped" in md and "mixed_float16" in md


def test_the_gpus_a_job_may_use():
    from pipeline.bench.gpucheck import first_gpu, gpus_for_ranks

    assert gpus_for_ranks({}, 8) == 8
    assert gpus_for_ranks({"CUDA_VISIBLE_DEVICES": "2,3"}, 8) == 2  # a step without device cgroups
    assert first_gpu({"CUDA_VISIBLE_DEVICES": "2,3"}) == "2" and first_gpu({}) == "0"
