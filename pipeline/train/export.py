"""The trained model, ready to serve: Keras format at the end of every finished run (rank 0),
and on request an int8 TFLite model (post-training quantization) with its validation
accuracy next to the float model's and single-sample inference latency for both."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.fsutil import atomic_write_text
from pipeline.rundir import RunDir


def save_keras(model, run_dir: RunDir) -> Path:
    """RUN/model.keras, written under a temporary name and renamed: never half a model."""
    final = run_dir.model
    tmp = final.with_name(f".tmp-{os.getpid()}-{final.name}")
    model.save(tmp)
    os.replace(tmp, final)
    return final


def _val_arrays(dataset_dir: str, limit: int):
    import h5py

    from pipeline.data import shards

    m = shards.load_manifest(dataset_dir)
    xs, ys, n = [], [], 0
    for s in m.shards("val") or m.shards("train"):
        with h5py.File(m.path(s), "r") as f:
            take = min(limit - n, len(f["y"]))
            xs.append(f["x"][:take])
            ys.append(f["y"][:take])
            n += take
        if n >= limit:
            break
    return np.concatenate(xs), np.concatenate(ys)


def _to_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def _classification_data(run: RunDir) -> str:
    """The dataset a finished run trained on, checked to be one of class ids in shards."""
    try:
        cfg = json.loads(run.config.read_text())
        data_dir = cfg.get("dataset") or cfg["data"]["dir"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{run.config}: missing or unreadable; it names the dataset to calibrate on") from None
    from pipeline.data import shards

    m = shards.load_manifest(data_dir)
    if m.indexed or m.num_classes is None or m.y_shape:
        raise UserError(f"{run.path}: pipeline export tflite compares int8 and float accuracy on class ids; "
                        f"{data_dir} is not a classification dataset in the pipeline's shard format")
    return data_dir


def _convert_int8(model, xf, calibration: int, out: Path) -> bytes:
    """Full integer TFLite: int8 weights and activations, calibrated on `calibration` samples;
    float input and output kept for callers. Written under a temporary name, then renamed."""
    import tensorflow as tf

    def representative():
        for i in range(min(calibration, len(xf))):
            yield [xf[i:i + 1]]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    blob = conv.convert()
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    tmp.write_bytes(blob)
    os.replace(tmp, out)
    return blob


def _median_latency(fn, xf, runs: int) -> float:
    """Median of single-sample calls, after 10 to warm up."""
    for i in range(10):
        fn(xf[i % len(xf):i % len(xf) + 1])
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        fn(xf[i % len(xf):i % len(xf) + 1])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tflite_int8(run_dir: str, samples: int = 2000, calibration: int = 200, latency_runs: int = 200) -> dict:
    import tensorflow as tf

    run = RunDir(run_dir)
    if not run.model.exists():
        raise UserError(f"{run.path}: no {run.model.name} (written at the end of a finished pipeline train run)")
    data_dir = _classification_data(run)
    model = tf.keras.models.load_model(run.model)
    x, y = _val_arrays(data_dir, samples)
    xf = _to_float(x)
    out = run.model_int8
    blob = _convert_int8(model, xf, calibration, out)
    interp = tf.lite.Interpreter(model_path=str(out), num_threads=1)
    interp.allocate_tensors()
    inp, outp = interp.get_input_details()[0], interp.get_output_details()[0]

    def tflite_logits(sample):
        interp.set_tensor(inp["index"], sample)
        interp.invoke()
        return interp.get_tensor(outp["index"])

    int8_pred = np.array([np.argmax(tflite_logits(xf[i:i + 1])) for i in range(len(xf))])
    float_pred = np.argmax(model.predict(xf, batch_size=256, verbose=0), axis=-1)
    serve = tf.function(lambda t: model(t, training=False))
    res = {
        "tflite": str(out), "tflite_bytes": len(blob), "keras_bytes": run.model.stat().st_size,
        "samples": int(len(y)), "float_accuracy": float(np.mean(float_pred == y)),
        "int8_accuracy": float(np.mean(int8_pred == y)),
        "float_latency_ms": _median_latency(lambda s: serve(s).numpy(), xf, latency_runs) * 1e3,
        "int8_latency_ms": _median_latency(tflite_logits, xf, latency_runs) * 1e3,
        "latency_note": "median of single-sample calls; Keras model in a tf.function, TFLite on 1 thread",
    }
    atomic_write_text(run.export_record, json.dumps(res, indent=1) + "\n")
    return res


# --- the command line (pipeline/cli.py dispatches) ---

def tflite_arguments(p) -> None:
    p.add_argument("run_dir")
    p.add_argument("--samples", type=int, default=2000, help="validation samples to compare on (2000)")
    p.set_defaults(func=tflite_cli)


def tflite_cli(a) -> int:
    r = tflite_int8(a.run_dir, samples=a.samples)
    print(f"{r['tflite']}: {r['tflite_bytes'] / 1024:.0f} KiB (Keras {r['keras_bytes'] / 1024:.0f} KiB); "
          f"val accuracy int8 {r['int8_accuracy']:.4f} vs float {r['float_accuracy']:.4f} on {r['samples']} "
          f"samples; single-sample latency int8 {r['int8_latency_ms']:.3f} ms vs float {r['float_latency_ms']:.3f} ms")
    return 0
