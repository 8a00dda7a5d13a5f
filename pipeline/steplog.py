"""What a run writes as it goes: per-rank step logs, rank-0 metrics and progress lines.

Every rank appends one JSON line per step to steps/rank-<R>.jsonl and flushes it, so a crash
leaves every finished step on disk (flush hands the line to the kernel; no fsync per step,
which would cost more than the step). Rank 0 alone writes metrics.jsonl and prints
progress: the writers are built as do-nothing objects on other ranks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    """Resident memory of this process in MiB (one small read of /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except (OSError, IndexError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepLog:
    """Appends step records to steps/rank-<rank>.jsonl; measures its own cost."""

    def __init__(self, run_dir: Path, rank: int):
        path = Path(run_dir) / "steps" / f"rank-{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path, "a", buffering=1 << 16)
        self.cost_s = 0.0  # time spent writing records, to report logging overhead
        self.records = 0

    def write(self, record: dict) -> None:
        t0 = time.perf_counter()
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._f.flush()
        self.cost_s += time.perf_counter() - t0
        self.records += 1

    def close(self) -> None:
        self._f.close()


class JsonLines:
    """Appends JSON objects to one file, flushed and fsynced (a few lines per run)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


class TensorBoard:
    """Rank 0's TensorBoard event files under RUN/tensorboard: loss, learning rate and global
    samples/s every `every` steps (averaged over them), validation loss and accuracy at each
    evaluation. The x axis is the global step."""

    def __init__(self, log_dir: Path, every: int, global_batch: int):
        import tensorflow as tf

        self._tf = tf
        self._w = tf.summary.create_file_writer(str(log_dir))
        self.every, self.global_batch = every, global_batch
        self._losses: list[float] = []
        self._t = time.perf_counter()

    def step(self, step: int, loss: float, lr: float) -> None:
        self._losses.append(loss)
        if step % self.every:
            return
        now = time.perf_counter()
        with self._w.as_default(step=step):
            self._tf.summary.scalar("train/loss", sum(self._losses) / len(self._losses))
            self._tf.summary.scalar("train/lr", lr)
            self._tf.summary.scalar("train/samples_per_s", len(self._losses) * self.global_batch / (now - self._t))
        self._losses, self._t = [], now

    def write(self, record: dict) -> None:
        """An evaluation record from metrics.jsonl."""
        with self._w.as_default(step=record["step"]):
            for k in ("val_loss", "val_accuracy"):
                self._tf.summary.scalar(f"eval/{k}", record[k])
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class Nothing:
    """Stands in for a rank-0-only writer on other ranks."""

    def write(self, *args, **kwargs) -> None:
        pass

    def step(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    def maybe_print(self, *args, **kwargs) -> None:
        pass

    def print(self, *args, **kwargs) -> None:
        pass


class Progress:
    """One line every `every_s` seconds: step, epoch, loss, samples/s, ETA."""

    def __init__(self, total_steps: int, steps_per_epoch: int, global_batch: int, every_s: float,
                 start_step: int = 0, stream=sys.stdout):
        self.total = total_steps
        self.spe = steps_per_epoch
        self.global_batch = global_batch
        self.every_s = every_s
        self.stream = stream
        self._t_last = time.perf_counter()
        self._step_last = start_step
        self._first = start_step + 1

    def maybe_print(self, step: int, loss: float, force: bool = False) -> None:
        now = time.perf_counter()
        if step == self._first:
            # The first step traces the graph; rates and ETAs start after it.
            self._t_last, self._step_last = now, step
        if not force and now - self._t_last < self.every_s:
            return
        elapsed = now - self._t_last
        steps = step - self._step_last
        rate = steps * self.global_batch / elapsed if elapsed > 0 and steps > 0 else 0.0
        eta = (self.total - step) * elapsed / steps if steps > 0 else 0.0
        epoch = (step - 1) // self.spe + 1 if step > 0 else 1
        epochs = -(-self.total // self.spe)
        self.print(f"step {step}/{self.total} epoch {epoch}/{epochs} loss {loss:.4f} "
                   f"{rate:.0f} samples/s ETA {_hms(eta)}")
        self._t_last, self._step_last = now, step

    def print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
