"""What rank 0 alone writes or prints: console lines, progress, metrics.jsonl, TensorBoard,
config.json and the finished model.

One idiom for every rank-0-only part (as torchtitan's metrics loggers): each base class here
does nothing, and the real writer is its subclass. Which rank writes is decided once, in
`build()`: rank 0 gets the real writers, every other rank the bases, so the training loop never
asks its rank. A method the loop calls is written on the base first.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import config
from pipeline.fsutil import atomic_write_text
from pipeline.rundir import RunDir, is_metric
from pipeline.runtime.hooks import Hook
from pipeline.train.export import save_keras


class Console:
    """Lines for the person watching the job (nothing off rank 0)."""

    def print(self, line: str) -> None:
        pass


class StreamConsole(Console):
    def __init__(self, stream=sys.stdout):
        self.stream = stream

    def print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


class Progress(Hook):
    """One line every `every_s` seconds: step, epoch, loss, samples/s, ETA (nothing off rank 0)."""

    def on_start(self, start_step: int) -> None:
        pass

    def maybe_print(self, step: int, loss: float, force: bool = False) -> None:
        pass


class ProgressLine(Progress):
    def __init__(self, console: Console, total_steps: int, steps_per_epoch: int, global_batch: int, every_s: float):
        self.console = console
        self.total, self.spe, self.global_batch, self.every_s = total_steps, steps_per_epoch, global_batch, every_s
        self.on_start(0)

    def on_start(self, start_step: int) -> None:
        """Training starts after `start_step` (0, or the step resumed from)."""
        self._t_last = time.perf_counter()
        self._step_last = start_step
        self._first = start_step + 1

    def on_steps(self, records: list[dict]) -> None:
        if records:
            self.maybe_print(records[-1]["step"], records[-1]["loss"])

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
        self.console.print(f"step {step}/{self.total} epoch {epoch}/{epochs} loss {loss:.4f} "
                           f"{rate:.0f} samples/s ETA {_hms(eta)}")
        self._t_last, self._step_last = now, step


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class MetricsLog:
    """metrics.jsonl: one record per evaluation (nothing off rank 0)."""

    def write(self, record: dict) -> None:
        pass


class MetricsFile(MetricsLog):
    """Each record flushed and fsynced (a few lines per run)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


class TensorBoard(Hook):
    """TensorBoard scalars (nothing off rank 0, or with log.tensorboard_every_steps: 0)."""

    def close(self) -> None:
        pass


def scalar_event(step: int, scalars) -> object:
    """One TensorBoard event holding (tag, value) scalars as `tf.summary.scalar` writes them."""
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorboard.plugins.scalar import metadata

    meta = metadata.create_summary_metadata(display_name="", description="")
    values = [summary_pb2.Summary.Value(tag=tag, metadata=meta, tensor=tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT, tensor_shape=tensor_shape_pb2.TensorShapeProto(), float_val=[float(value)]))
        for tag, value in scalars]
    return event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values))


class TensorBoardFile(TensorBoard):
    """Event files under RUN/tensorboard: loss, learning rate and global samples/s every `every`
    steps (averaged over them), validation loss and accuracy at each evaluation. The x axis is
    the global step.

    No TensorFlow op writes them: each `tf.summary` call is a few eager ops, which rank 0 ran
    between two calls of steps (4.6 ms per call of 32 CNN steps, 2% of the call, held up every
    rank at the next allreduce), and, moved to a thread, in the first step of the next call,
    making it 3-4 ms slower (docs/bench.md). The events are the same protocol buffers
    (`tf.summary.scalar`'s float32 tensor with the scalars plugin's metadata), made in Python
    and written by TensorBoard's own event file writer, on a thread of their own: the records
    are reduced here, on the loop's thread, and handed over in order; `close` writes what is
    left and closes the file; a write that failed is raised there."""

    def __init__(self, log_dir: Path, every: int, global_batch: int):
        import queue
        import threading

        self.log_dir, self.every, self.global_batch = log_dir, every, global_batch
        self._losses: list[float] = []
        self._t = time.perf_counter()
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="tensorboard", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        w = None
        while True:
            item = self._q.get()
            if item is None:
                break
            if self._error is not None:
                continue
            try:
                step, scalars, flush = item
                if w is None:  # the file opens at the first record
                    from tensorboard.summary.writer.event_file_writer import EventFileWriter

                    w = EventFileWriter(str(self.log_dir))
                w.add_event(scalar_event(step, scalars))
                if flush:
                    w.flush()
            except Exception as e:  # noqa: BLE001 - raised by close, on the loop's thread
                self._error = e
        if w is not None:
            w.close()

    def on_steps(self, records: list[dict]) -> None:
        for r in records:
            self._step(r["step"], r["loss"], r["lr"])

    def _step(self, step: int, loss: float, lr: float) -> None:
        self._losses.append(loss)
        if step % self.every:
            return
        now = time.perf_counter()
        self._q.put((step, [("train/loss", sum(self._losses) / len(self._losses)), ("train/lr", lr),
                            ("train/samples_per_s", len(self._losses) * self.global_batch / (now - self._t))], False))
        self._losses, self._t = [], now

    def on_eval(self, record: dict) -> bool:
        """An evaluation record of metrics.jsonl."""
        self._q.put((record["step"], [(f"eval/{k}", v) for k, v in record.items() if is_metric(k)], True))
        return False

    def close(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        if self._error is not None:
            err, self._error = self._error, None
            raise err


class ConfigFile:
    """config.json: the resolved config and the run's facts (nothing off rank 0)."""

    def write(self, cfg, **facts) -> None:
        pass


class ConfigJSON(ConfigFile):
    """Written atomically."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, cfg, **facts) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, config.dumps(cfg, **facts))


class ModelExport:
    """RUN/model.keras at the end of a finished run (nothing off rank 0)."""

    def save(self, model) -> Path | None:
        return None


class KerasExport(ModelExport):
    """Ready for serving or `pipeline export`."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir

    def save(self, model) -> Path | None:
        return save_keras(model, self.run_dir)


@dataclass
class Writers:
    console: Console
    progress: Progress
    metrics: MetricsLog
    board: TensorBoard
    config_file: ConfigFile
    export: ModelExport

    def close(self) -> None:
        self.board.close()


def build(is_root: bool, run_dir: RunDir, log, *, total_steps: int, steps_per_epoch: int, global_batch: int,
          stream=sys.stdout) -> Writers:
    """Rank 0's writers, or do-nothing ones: the only place that asks which rank this is.
    `log` is the config's log section."""
    if not is_root:
        return Writers(Console(), Progress(), MetricsLog(), TensorBoard(), ConfigFile(), ModelExport())
    console = StreamConsole(stream)
    board = TensorBoardFile(run_dir.tensorboard, log.tensorboard_every_steps, global_batch) \
        if log.tensorboard_every_steps else TensorBoard()
    return Writers(console, ProgressLine(console, total_steps, steps_per_epoch, global_batch, log.progress_every_s),
                   MetricsFile(run_dir.metrics), board, ConfigJSON(run_dir.config), KerasExport(run_dir))
