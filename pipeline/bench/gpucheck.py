"""`make gpu-check` (scripts/gpu-check.sh): the GPU path proven on the machine at hand, in one
report, runs/gpu-check/report.md (and report.json). docs/gpu.md says what each part shows.

1. The node, without TensorFlow: the GPUs through `nvidia-smi` (and NVML, with nvidia-ml-py),
   the pinning decision for 1..N local ranks under each launcher binding, each GPU's peak entry
   and the install choice a dry run of `make env` would make. This part imports the standard
   library and the project's pure modules only, so it runs on a node image with nothing but
   the driver and a Python (`python3 -m pipeline.bench.gpucheck`).
2. Where TensorFlow imports: `pipeline doctor`, then one rank per GPU training the default CNN
   and `keras.applications.ResNet50` on synthetic data in float32, mixed_float16 and with XLA,
   each next to plain Keras `fit` on one GPU with the same model and batch (samples/s per GPU,
   the ratio, MFU, the memory peak), and on 2+ GPUs Horovod's NCCL allreduce from 64 MiB to
   1 GiB. It never downloads anything: the data is made here, the models start from random
   weights.

Without a GPU it says so in one line and exits 0. GPU_CHECK_CPU=1 runs the whole sequence on
the CPU at tiny sizes, the GPU-only parts listed as skipped (tests/bench/test_gpucheck.py).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline.runtime import gpus, peak

ROOT = Path(__file__).resolve().parents[2]
QUERY = "index,uuid,name,memory.total,driver_version"

# (model, input shape, classes, batch per GPU, steps) on a GPU and, tiny, on the CPU.
MODELS = {
    "gpu": [("cnn", (28, 28, 1), 10, 256, 120), ("keras.applications.ResNet50", (224, 224, 3), 1000, 64, 40)],
    "cpu": [("cnn", (28, 28, 1), 10, 32, 20), ("keras.applications.ResNet50", (32, 32, 3), 10, 4, 8)],
}
# (label, train.precision, train.jit_compile)
MODES = [("float32", "float32", False), ("mixed_float16", "mixed_float16", False), ("float32 + XLA", "float32", True)]
ALLREDUCE_MIB = "64,256,1024"


def _run(cmd: list[str], timeout: float = 900, env: dict | None = None) -> tuple[int, str]:
    """(exit status, stdout + stderr); 127 and the reason where the command cannot start."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL,
                           cwd=ROOT)
    except FileNotFoundError:
        return 127, f"{cmd[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, f"{' '.join(cmd)}: still running after {timeout:.0f} s"
    return p.returncode, p.stdout + p.stderr


# --- 1. the node, without TensorFlow ---

def query_rows(csv: str) -> list[dict]:
    """`nvidia-smi --query-gpu=index,uuid,name,memory.total,driver_version --format=csv,noheader,
    nounits` as one dict per GPU."""
    rows = []
    for line in csv.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) == 5 and cells[0].isdigit():
            rows.append({"index": int(cells[0]), "uuid": cells[1], "name": cells[2],
                         "memory_mib": int(cells[3]) if cells[3].isdigit() else None, "driver": cells[4]})
    return rows


def pinning(n: int) -> list[dict]:
    """What each of 1..n local ranks keeps (pipeline/runtime/gpus.py `choose`) under plain
    mpirun on the node (every rank sees all n GPUs) and under srun --gpus-per-task=1 (each rank
    sees one device, numbered 0 by the device cgroup)."""
    rows = []
    for size in range(1, n + 1):
        every = [gpus.choose([str(i) for i in range(n)], r, size, rank=r, host="this node", environ={})
                 for r in range(size)]
        one = [gpus.choose(["0"], r, size, rank=r, host="this node", environ={"CUDA_VISIBLE_DEVICES": "0"})
               for r in range(size)]
        rows.append({"local_ranks": size, "mpirun": every, "srun_gpus_per_task": one})
    return rows


def nvml_gpus() -> tuple[list[dict] | None, str]:
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed in this Python"
    try:
        pynvml.nvmlInit()
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                        "memory_used_mib": mem.used // 2**20, "memory_total_mib": mem.total // 2**20,
                        "util": pynvml.nvmlDeviceGetUtilizationRates(h).gpu})
        return out, "NVML (nvidia-ml-py)"
    except Exception as e:  # noqa: BLE001 - NVMLError and its subclasses: said in the report
        return None, f"NVML: {e}"


def peak_entry(name: str) -> dict:
    """A GPU's float32 and mixed-precision peaks (None: not in the table)."""
    entry: dict = {"name": name}
    for label, precision in (("float32", "float32"), ("mixed", "mixed_float16")):
        p = peak.gpu_peak(name, precision)
        entry[label] = {"tflops": p.flops_per_s / 1e12, "source": p.source} if p else None
    return entry


def node(cpu_mode: bool, skipped: list[str], smi_l: tuple[int, str]) -> dict:
    """The part that needs no TensorFlow; `smi_l`: (exit status, output) of `nvidia-smi -L`."""
    out: dict = {"host": socket.gethostname()}
    code, listing = smi_l
    out["smi_lines"] = [x for x in listing.splitlines() if x.strip()] if code == 0 else []
    if code == 0:
        out["gpus"] = query_rows(_run(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"],
                                      timeout=60)[1])
        out["driver_cuda"] = gpus.driver_cuda(_run(["nvidia-smi"], timeout=60)[1])
    else:
        out["gpus"] = []
        skipped.append(f"nvidia-smi: {listing.strip() or 'exit ' + str(code)}")
    n = len(out["gpus"])
    out["nvml"], out["nvml_source"] = nvml_gpus() if n else (None, "no GPU")
    if n and out["nvml"] is None:
        skipped.append(f"NVML figures: {out['nvml_source']}")
    if n:
        out["pinning"] = pinning(n)
        out["peaks"] = [peak_entry(g["name"]) for g in out["gpus"]]
    else:
        skipped.append("pinning for 1..N local ranks and the GPU peak entries: no GPU" +
                       (" (GPU_CHECK_CPU=1)" if cpu_mode else ""))
    cpu = peak.this_cpu(os.cpu_count() or 1)
    out["cpu_peak"] = {"tflops": cpu.flops_per_s / 1e12, "source": cpu.source} if cpu else None
    dry_env = {**os.environ, "SETUP_DRY_RUN": "1", "GPU": "auto"}
    code, text = _run(["bash", "scripts/setup-env.sh"], timeout=120, env=dry_env)
    out["install"] = {"exit": code, "lines": [x for x in text.splitlines() if x.startswith("[setup]")] or
                      text.splitlines()[-3:]}
    return out


# --- 2. with TensorFlow ---

def tf_python() -> tuple[str | None, str]:
    """The Python that has TensorFlow: this one, else the project's venv; None and why."""
    for py in dict.fromkeys([sys.executable, str(ROOT / ".venv" / "bin" / "python")]):
        if Path(py).exists():
            code, out = _run([py, "-c", "import tensorflow as tf; print(tf.__version__)"], timeout=300,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            if code == 0:
                return py, f"TensorFlow {out.strip().splitlines()[-1]} in {py}"
    return None, f"TensorFlow is not importable ({sys.executable}, {ROOT / '.venv' / 'bin' / 'python'})"


def gpus_for_ranks(environ, listed: int) -> int:
    """The GPUs this job may use: CUDA_VISIBLE_DEVICES's entries where it is set (a SLURM step
    without device cgroups sees the whole node in nvidia-smi), else what nvidia-smi lists."""
    visible = gpus.visible_entries(environ)
    return len(visible) if visible is not None else listed


def first_gpu(environ) -> str:
    """The CUDA_VISIBLE_DEVICES entry the one-GPU Keras peer runs on."""
    visible = gpus.visible_entries(environ)
    return visible[0] if visible else "0"


def _launch(n: int, args: list[str]) -> list[str]:
    """One rank per GPU: mpirun for 2+, a plain process for one (no launcher needed)."""
    if n <= 1:
        return args
    return [shutil.which("mpirun") or "mpirun", "-np", str(n), *args]


def make_data(py: str, work: Path, shape, classes: int, samples: int) -> Path:
    d = work / f"data-{'x'.join(map(str, shape))}-{classes}"
    if not (d / "manifest.json").exists():
        code, out = _run([py, "-m", "pipeline", "data", "synth", "--out", str(d), "--samples", str(samples),
                          "--val-samples", str(max(64, samples // 16)), "--shards", "2", "--shape",
                          ",".join(map(str, shape)), "--classes", str(classes)])
        if code:
            raise RuntimeError(f"data synth: {out.strip().splitlines()[-1:]}")
    return d


def train_pair(py: str, n: int, work: Path, data: Path, model: str, batch: int, steps: int, mode: tuple) -> dict:
    """The pipeline (one rank per GPU: n ranks, 0 on the CPU) and Keras fit (one GPU) on the
    same model and batch."""
    label, precision, xla = mode
    tag = f"{model.rsplit('.', 1)[-1]}-{label.replace(' + ', '-').replace(' ', '')}"
    run = work / "runs" / tag
    shutil.rmtree(run, ignore_errors=True)
    sets = [f"data.dir={data}", f"model.name={model}", f"train.batch_size={batch}", f"train.max_steps={steps}",
            f"train.precision={precision}", f"train.jit_compile={str(xla).lower()}", "checkpoint.every_steps=0",
            "log.tensorboard_every_steps=0", "log.progress_every_s=60"]
    code, out = _run(_launch(n, [py, "-m", "pipeline", "train", "--run-dir", str(run),
                                 *[x for s in sets for x in ("--set", s)]]))
    row = {"model": model, "mode": label, "batch_per_gpu": batch, "steps": steps, "run_dir": str(run)}
    if code:
        row["error"] = f"pipeline train exit {code}: " + " | ".join(out.strip().splitlines()[-2:])
        return row
    s = json.loads(_run([py, "-m", "pipeline", "analyze", str(run), "--json"])[1])["runs"][0]
    cfg = json.loads((run / "config.json").read_text())
    row.update(pipeline_samples_per_s_per_gpu=s["throughput_samples_per_s"] / max(1, s["ranks"]),
               pipeline_mfu=s["mfu"]["value"], peak_source=s["mfu"]["peak_source"],
               model_flops_per_sample=cfg.get("model_flops_per_sample"),
               pipeline_mem_peak_mb=(s.get("gpu") or {}).get("gpu_mem_peak_mb", {}).get("max"))
    keras_out = work / f"keras-{tag}.json"
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": first_gpu(os.environ)} if n else {})}
    code, out = _run([py, "-m", "pipeline.bench.baselines", "--mode", "keras", "--data", str(data), "--batch-size",
                      str(batch), "--steps", str(steps), "--warmup", str(max(2, steps // 5)), "--model", model,
                      "--precision", precision, "--steps-per-execution", "32", "--out", str(keras_out),
                      *(["--jit-compile"] if xla else [])], env=env)
    if code:
        row["keras_error"] = f"Keras fit exit {code}: " + " | ".join(out.strip().splitlines()[-2:])
        return row
    k = json.loads(keras_out.read_text())
    per_rank_peak = cfg["peak_flops_per_s"] / cfg["ranks"] if cfg.get("peak_flops_per_s") else None
    row.update(keras_samples_per_s=k["throughput_samples_per_s"],
               keras_steps_per_execution=k["best_steps_per_execution"],
               keras_mfu=peak.mfu(cfg.get("model_flops_per_sample"), k["throughput_samples_per_s"], per_rank_peak),
               keras_mem_peak_mb=k.get("gpu_mem_peak_mb"),
               ratio=row["pipeline_samples_per_s_per_gpu"] / k["throughput_samples_per_s"])
    return row


def with_tf(py: str, n: int, cpu_mode: bool, work: Path, skipped: list[str], say) -> dict:
    out: dict = {}
    size = "cpu" if cpu_mode else "gpu"
    datasets = [make_data(py, work, shape, classes, max(batch * steps, 1024) if size == "gpu" else 1024)
                for _, shape, classes, batch, steps in MODELS[size]]
    say("gpu-check: pipeline doctor")
    code, text = _run(_launch(n, [py, "-m", "pipeline", "doctor", "--set", f"data.dir={datasets[0]}", "--run-dir",
                                  str(work / "runs" / "doctor")]), timeout=600)
    out["doctor"] = {"exit": code, "lines": text.strip().splitlines()[-(n + 6):]}
    rows = []
    for (model, shape, classes, batch, steps), data in zip(MODELS[size], datasets):
        for mode in MODES:
            if mode[1] == "mixed_float16" and cpu_mode:
                skipped.append(f"{model} in mixed_float16: float16 needs a GPU")
                continue
            say(f"gpu-check: {model} {mode[0]}")
            rows.append(train_pair(py, n, work, data, model, batch, steps, mode))
    out["training"] = rows
    if n >= 2 and not cpu_mode:
        say("gpu-check: NCCL allreduce")
        res = work / "allreduce.json"
        # One GPU per rank, as training pins them: the job's entry at the local rank.
        wrapper = ["bash", "-c", 'r=${OMPI_COMM_WORLD_LOCAL_RANK:-${SLURM_LOCALID:-0}}; '
                                 'IFS=, read -ra v <<< "${CUDA_VISIBLE_DEVICES:-}"; '
                                 'export CUDA_VISIBLE_DEVICES=${v[$r]:-$r}; '
                                 'exec "$0" -m pipeline.bench.allreduce "$@"', py]
        code, text = _run(_launch(n, wrapper + ["--out", str(res), "--sizes-mib", ALLREDUCE_MIB, "--repeats", "3"]))
        out["allreduce"] = json.loads(res.read_text()) if code == 0 else {"error": text.strip().splitlines()[-2:]}
    else:
        skipped.append("NCCL allreduce busbw: " + ("no GPU (GPU_CHECK_CPU=1)" if cpu_mode else
                                                   f"needs 2 or more GPUs, this node has {n}"))
    return out


# --- the report ---

def _f(v, digits=1, pct=False) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}%}" if pct else f"{v:,.{digits}f}"


def report(res: dict) -> str:
    nd = res["node"]
    lines = ["# gpu-check", "", f"{res['when']} on {nd['host']}: {res['mode']}. {res['tf']}.", "",
             "## The node (no TensorFlow needed)", ""]
    lines += [f"- {x}" for x in nd["smi_lines"]] or ["- nvidia-smi lists no GPU"]
    if nd.get("driver_cuda"):
        lines.append(f"- driver {nd['gpus'][0]['driver'] if nd['gpus'] else '?'}, CUDA {nd['driver_cuda']}")
    for g in nd["nvml"] or []:
        lines.append(f"- NVML GPU {g['index']}: {g['name']}, {g['memory_used_mib']}/{g['memory_total_mib']} MiB "
                     f"used, {g['util']}% busy")
    if nd.get("cpu_peak"):
        lines.append(f"- CPU peak: {nd['cpu_peak']['tflops']:.3f} TFLOP/s fp32 ({nd['cpu_peak']['source']})")
    if nd.get("pinning"):
        lines += ["", "### Which GPU each local rank takes (pipeline/runtime/gpus.py)", "",
                  "| local ranks | plain mpirun (every rank sees all) | srun --gpus-per-task=1 |", "|---|---|---|"]
        for r in nd["pinning"]:
            lines.append(f"| {r['local_ranks']} | {', '.join(r['mpirun'])} | {', '.join(r['srun_gpus_per_task'])} |")
    if nd.get("peaks"):
        lines += ["", "### Peak entries (MFU's denominator)", "", "| GPU | float32 | mixed | source |", "|---|---|---|---|"]
        for p in nd["peaks"]:
            f32, mixed = p["float32"], p["mixed"]
            lines.append(f"| {p['name']} | {_f(f32 and f32['tflops'])} TFLOP/s | {_f(mixed and mixed['tflops'])} "
                         f"TFLOP/s | {(f32 or {}).get('source', 'not in the table: MFU unknown')} |")
    lines += ["", "### The install a dry run chooses (SETUP_DRY_RUN=1 GPU=auto make env)", "", "```",
              *nd["install"]["lines"], "```"]
    tfp = res.get("with_tf")
    if tfp:
        lines += ["", "## pipeline doctor", "", "```", *tfp["doctor"]["lines"], "```", "",
                  "## Training: the pipeline next to Keras fit (same model, batch, precision)", "",
                  "| model | mode | batch/GPU | pipeline samples/s/GPU | Keras fit samples/s | ratio | MFU pipeline | "
                  "MFU Keras | memory peak MiB (pipeline / Keras) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in tfp["training"]:
            if "error" in r or "keras_error" in r:
                lines.append(f"| {r['model']} | {r['mode']} | {r['batch_per_gpu']} | "
                             f"{_f(r.get('pipeline_samples_per_s_per_gpu'))} | {r.get('error') or r['keras_error']} "
                             f"| | | | |")
                continue
            lines.append(f"| {r['model']} | {r['mode']} | {r['batch_per_gpu']} | {_f(r['pipeline_samples_per_s_per_gpu'])}"
                         f" | {_f(r['keras_samples_per_s'])} (steps_per_execution {r['keras_steps_per_execution']}) | "
                         f"{r['ratio']:.2f} | {_f(r['pipeline_mfu'], pct=True)} | {_f(r['keras_mfu'], pct=True)} | "
                         f"{_f(r['pipeline_mem_peak_mb'], 0)} / {_f(r['keras_mem_peak_mb'], 0)} |")
        peaks = {r["peak_source"] for r in tfp["training"] if r.get("peak_source")}
        lines += ["", *[f"Peak: {p}" for p in sorted(peaks)]]
        ar = tfp.get("allreduce")
        if ar and "rows" in ar:
            lines += ["", f"## NCCL allreduce over {ar['ranks']} GPUs (Horovod, busbw = algbw x 2(n-1)/n)", "",
                      "| MiB | busbw GB/s (median, min-max) |", "|---|---|"]
            for r in ar["rows"]:
                lines.append(f"| {r['bytes'] / 2**20:.0f} | {r['hvd_busbw_gbps']:.1f} ({r['hvd_busbw_min_gbps']:.1f}-"
                             f"{r['hvd_busbw_max_gbps']:.1f}) |")
        elif ar:
            lines += ["", "## NCCL allreduce", "", f"failed: {ar['error']}"]
    lines += ["", "## Skipped", ""] + ([f"- {s}" for s in res["skipped"]] or ["- nothing"])
    lines += ["", f"Took {res['wall_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def has_gpu(smi_l: tuple[int, str], dev: str = "/dev") -> str | None:
    """What shows an NVIDIA GPU here, or None (pipeline/runtime/gpus.py `on_the_node`)."""
    code, listing = smi_l
    devices = [Path(p).name for p in glob.glob(f"{dev}/nvidia[0-9]*")]
    return gpus.on_the_node(devices, listing.splitlines() if code == 0 else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpu-check")
    p.add_argument("--out", default="runs/gpu-check")
    a = p.parse_args(argv)
    cpu_mode = os.environ.get("GPU_CHECK_CPU", "") == "1"
    smi_l = _run(["nvidia-smi", "-L"], timeout=60)
    seen = has_gpu(smi_l, os.environ.get("GPU_CHECK_DEV", "/dev"))
    if not seen and not cpu_mode:
        print("gpu-check: no NVIDIA GPU on this machine (nvidia-smi lists none, no /dev/nvidia*): nothing to check "
              "(GPU_CHECK_CPU=1 runs the sequence on the CPU)")
        return 0
    t0 = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    res = {"when": datetime.datetime.now().isoformat(timespec="seconds"),
           "mode": "GPU_CHECK_CPU=1: the sequence on the CPU at tiny sizes" if cpu_mode else f"GPUs ({seen})",
           "node": node(cpu_mode, skipped, smi_l)}
    py, res["tf"] = tf_python()
    if py is None:
        skipped.append(f"pipeline doctor, training next to Keras fit, NCCL allreduce: {res['tf']}")
    else:
        n = 0 if cpu_mode else gpus_for_ranks(os.environ, len(res["node"]["gpus"]))
        res["with_tf"] = with_tf(py, n, cpu_mode, out, skipped, lambda line: print(line, flush=True))
    res["skipped"], res["wall_s"] = skipped, time.time() - t0
    (out / "report.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "report.md").write_text(report(res))
    print(f"gpu-check: {out / 'report.md'} ({len(skipped)} part(s) skipped, {res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
