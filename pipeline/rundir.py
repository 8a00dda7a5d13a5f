"""The run directory: its layout and the fields of its records, in one place.

Training writes it, `pipeline analyze`, the benchmarks, `pipeline export` and
`pipeline checkpoint` read it; all of them take the paths and field names from here
(docs/run-directory.md describes it for users, and which names never change).

    RUN/config.json            rank 0: the resolved config + the run's facts (RUN_FACTS)
    RUN/steps/rank-R.jsonl     every rank: header records, then one step record per step
    RUN/ranks/rank-R.json      every rank: "running" at the start, its summary at the end
    RUN/ranks/rank-R.events    every rank: its flight recorder's ring (pipeline/runtime/flight.py)
    RUN/postmortem/rank-R.*    a rank that stalled, raised or was stopped: stacks (.txt), state (.json)
    RUN/metrics.jsonl          rank 0: one record per evaluation
    RUN/checkpoints/step-N/    rank 0: complete checkpoints (pipeline/train/checkpoint.py)
    RUN/tensorboard/           rank 0: TensorBoard event files
    RUN/timeline*.json         rank 0: Horovod timelines (log.timeline)
    RUN/autotune.csv           Horovod's autotuner log (horovod.autotune)
    RUN/model.keras            rank 0: the finished model
    RUN/model-int8.tflite      `pipeline export tflite`, with its figures in RUN/export.json
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG = "config.json"
STEPS = "steps"
RANKS = "ranks"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
AUTOTUNE = "autotune.csv"
MODEL = "model.keras"
MODEL_INT8 = "model-int8.tflite"
EXPORT_RECORD = "export.json"
_STEP_LOG = re.compile(r"^rank-(\d+)\.jsonl$")

# A step record (docs/run-directory.md: the first ten at least; lr and rss_mb besides).
STEP_FIELDS = ("step", "epoch", "rank", "size", "time", "step_s", "data_s", "compute_s", "samples", "loss",
               "lr", "rss_mb")
# What analysis needs from a step record, and what it uses when present.
STEP_NEEDED = ("step", "step_s", "data_s", "compute_s", "samples")
STEP_OPTIONAL = ("time", "loss", "rss_mb", "lr", "suspended_s", "gpu_mem_peak_mb", "gpu_util")
# gpu_mem_peak_mb, gpu_util: a GPU rank's device memory peak in its call of steps and NVML's
# utilization during the step (pipeline/runtime/devstats.py); absent on CPUs.
# suspended_s: on the step that was running when a suspended rank ran again (seconds it did
# not run); such steps are left out of every figure of `pipeline analyze`.
# A header record opens each process's part of a step log: who wrote the steps and how.
HEADER_KIND = "header"
HEADER_FIELDS = ("kind", "rank", "size", "local_rank", "local_size", "host", "pid", "start_step", "precision",
                 "jit_compile", "compression", "backward_passes_per_step", "batch_size", "threads", "backend",
                 "steps_per_call", "fault", "staging", "time")
# One evaluation in metrics.jsonl.
METRIC_FIELDS = ("epoch", "step", "time", "val_loss", "val_accuracy", "val_samples", "eval_s")
# val_samples counts what was evaluated; every other val_<name> is a figure of the model.
VAL_COUNT = "val_samples"


def is_metric(key: str) -> bool:
    """A validation figure (val_loss, val_accuracy, val_<metric>), not the sample count."""
    return key.startswith("val_") and key != VAL_COUNT
# ranks/rank-R.json at the end of a run.
SUMMARY_FIELDS = ("rank", "size", "host", "threads", "pid", "status", "start_step", "end_step", "steps_run",
                  "loop_s", "train_s", "warmup_steps", "samples_per_s", "step_log_s", "step_log_overhead",
                  "flight_recorder_s",
                  "rss_mb_peak", "last_eval_step", "weights_sha256", "wall_s", "stopped_by",
                  "signal_to_checkpoint_s", "target_reached_at_step")
# Facts config.json records beside the config sections. The config loader ignores exactly
# these, so a run's config.json (older runs' included) is a valid --config to run it again.
RUN_FACTS = ("ranks", "hosts", "threads_per_rank", "backend", "global_batch", "steps_per_epoch", "total_steps",
             "dropped_train_samples", "model_params", "gradient_bytes", "dataset", "versions",
             # MFU's parts (pipeline/train/flops.py): the model's FLOPs and the devices' peak
             "model_flops_per_sample", "forward_flops_per_sample", "flops_source", "peak_flops_per_s",
             "peak_source", "peak_device")


class RunDir:
    """The paths of one run directory (nothing is created or read by building one)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / CONFIG
        self.steps_dir = self.path / STEPS
        self.ranks_dir = self.path / RANKS
        self.metrics = self.path / METRICS
        self.checkpoints = self.path / CHECKPOINTS
        self.tensorboard = self.path / TENSORBOARD
        self.autotune = self.path / AUTOTUNE
        self.model = self.path / MODEL
        self.model_int8 = self.path / MODEL_INT8
        self.export_record = self.path / EXPORT_RECORD

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def step_log(self, rank: int) -> Path:
        return self.steps_dir / f"rank-{rank}.jsonl"

    def rank_file(self, rank: int) -> Path:
        return self.ranks_dir / f"rank-{rank}.json"

    def timeline(self, start_step: int) -> Path:
        """A resumed run records its own timeline file."""
        return self.path / ("timeline.json" if start_step == 0 else f"timeline-from-{start_step}.json")

    def timelines(self) -> list[Path]:
        return sorted(self.path.glob("timeline*.json"))

    def step_logs(self) -> dict[int, Path]:
        """The step logs present, by rank."""
        out = {}
        if self.steps_dir.is_dir():
            for p in sorted(self.steps_dir.iterdir()):
                m = _STEP_LOG.match(p.name)
                if m:
                    out[int(m.group(1))] = p
        return out


def is_header(record) -> bool:
    return isinstance(record, dict) and record.get("kind") == HEADER_KIND
