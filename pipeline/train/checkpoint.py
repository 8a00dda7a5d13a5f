"""Rank-0 checkpoints that are complete or invisible.

Layout under RUN_DIR/checkpoints/:
    step-00000200/state.index, state.data-*   model + optimizer variables (tf.train.Checkpoint)
    step-00000200/meta.json                   step, epoch, time; written last: the completion mark
A checkpoint is written into a hidden temporary directory, every file fsynced, meta.json
added, then the directory is renamed into place; a crash at any point leaves either the old
set or the old set plus one complete new checkpoint. Leftover temporaries are removed on the
next start. Only directories named step-N holding a meta.json with "complete": true are ever
chosen for resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.fsutil import atomic_write_text, fsync_path
from pipeline.rundir import RunDir

STATE = "state"
META = "meta.json"
_NAME = re.compile(r"^step-(\d{8,})$")


@dataclass(frozen=True)
class CheckpointRef:
    path: Path
    step: int
    meta: dict

    @property
    def prefix(self) -> str:
        return str(self.path / STATE)


def should_save(step: int, every_steps: int, last_step: int) -> bool:
    """Save after `step` when it is a multiple of every_steps, and always after the last step."""
    return step == last_step or (every_steps > 0 and step % every_steps == 0)


def read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("complete") is True else None


def list_complete(directory: Path) -> list[CheckpointRef]:
    """Complete checkpoints, oldest first."""
    refs = []
    if not directory.is_dir():
        return refs
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            meta = read_meta(p)
            if meta is not None and meta.get("step") == int(m.group(1)):
                refs.append(CheckpointRef(p, int(m.group(1)), meta))
    return sorted(refs, key=lambda r: r.step)


def latest(directory: Path) -> CheckpointRef | None:
    refs = list_complete(directory)
    return refs[-1] if refs else None


# Metrics where lower is better, by the words in their names; everything else (accuracy,
# IoU, precision, recall, AUC) is maximised. checkpoint.keep_best_mode overrides.
LOWER_IS_BETTER = ("loss", "error", "mae", "mse", "mape", "msle", "crossentropy", "hinge", "divergence",
                   "poisson", "logcosh", "huber")


def direction(metric: str, mode: str = "") -> str:
    """'min' or 'max' for `metric` (a val_<name>)."""
    if mode:
        return mode
    return "min" if any(w in metric.lower() for w in LOWER_IS_BETTER) else "max"


def best(refs: list[CheckpointRef], metric: str, mode: str = "") -> CheckpointRef | None:
    """The checkpoint with the best `metric` in its meta (losses and errors lowest, else highest)."""
    scored = [r for r in refs if isinstance(r.meta.get(metric), (int, float))]
    if not scored:
        return None
    pick = min if direction(metric, mode) == "min" else max
    return pick(scored, key=lambda r: r.meta[metric])


def to_prune(refs: list[CheckpointRef], keep: int, keep_best: str = "", mode: str = "") -> list[CheckpointRef]:
    """Complete checkpoints (oldest first) to delete: all but the newest `keep`, and the best."""
    keepers = {r.step for r in refs[-keep:]}
    if keep_best:
        b = best(refs, keep_best, mode)
        if b is not None:
            keepers.add(b.step)
    return [r for r in refs if r.step not in keepers]


class CheckpointWriteError(Exception):
    """A checkpoint could not be written (disk full, quota, file size limit, I/O error)."""


class Checkpoints:
    """The save rule, on every rank (each must end its calls of steps where rank 0 saves);
    writing and finding checkpoints do nothing here. Rank 0's `CheckpointWriter` is its
    subclass, chosen once by `for_rank`, so the training loop never asks which rank it is.
    `settings` is the config's checkpoint section (every_steps, keep, keep_best)."""

    def __init__(self, settings):
        self.every_steps = settings.every_steps
        self.keep = settings.keep
        self.keep_best = settings.keep_best
        self.keep_best_mode = settings.keep_best_mode

    def due(self, step: int, last_step: int, evaluated: bool) -> bool:
        """The whole "save now?" rule: every `every_steps` steps, after the last step, and after
        each evaluation when the best checkpoint is kept."""
        return should_save(step, self.every_steps, last_step) or (evaluated and bool(self.keep_best))

    def save_if_due(self, ckpt, step: int, epoch: int, last_step: int, evaluated: dict,
                    force: bool = False) -> CheckpointRef | None:
        """Saves when due() (or `force`); `evaluated` holds this step's evaluation figures, if
        any (kept in meta)."""
        if not force and not self.due(step, last_step, bool(evaluated)):
            return None
        return self.save(ckpt, step, epoch, evaluated)

    def latest(self) -> CheckpointRef | None:
        return None

    def save(self, ckpt, step: int, epoch: int, extra: dict | None = None) -> CheckpointRef | None:
        return None


class CheckpointWriter(Checkpoints):
    """Rank 0's: writes, prunes and finds checkpoints in `directory`."""

    def __init__(self, directory: Path, settings):
        super().__init__(settings)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        for p in self.directory.iterdir():
            if p.name.startswith(".tmp-") or p.name.startswith(".trash-"):
                shutil.rmtree(p, ignore_errors=True)

    def latest(self) -> CheckpointRef | None:
        return latest(self.directory)

    def save(self, ckpt, step: int, epoch: int, extra: dict | None = None) -> CheckpointRef | None:
        """Writes `ckpt` (a tf.train.Checkpoint) as step-`step`; returns its ref."""
        final = self.directory / f"step-{step:08d}"
        if read_meta(final) is not None:
            meta = read_meta(final)
            if extra and any(meta.get(k) != v for k, v in extra.items()):
                # Same step saved again with new facts (a metric computed after the first save).
                meta = {**meta, **extra}
                atomic_write_text(final / META, json.dumps(meta, indent=2))
                self._prune()
            return CheckpointRef(final, step, meta)
        tmp = self.directory / f".tmp-step-{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            self._write(ckpt, tmp, step, epoch, extra, final)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) or type(e).__module__.startswith("tensorflow"):
                previous = latest(self.directory)
                raise CheckpointWriteError(
                    f"{final}: checkpoint write failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                    f"newest complete checkpoint is still {previous.path if previous else 'none'}") from None
            raise
        self._prune()
        return CheckpointRef(final, step, read_meta(final))

    def _write(self, ckpt, tmp: Path, step: int, epoch: int, extra: dict | None, final: Path) -> None:
        """Everything into `tmp`, fsynced, the completion mark last, then one rename."""
        ckpt.write(str(tmp / STATE))
        for f in tmp.iterdir():
            fsync_path(f)
        meta = {"complete": True, "step": step, "epoch": epoch, "time": time.time(),
                "writer": {"host": socket.gethostname(), "pid": os.getpid()}, **(extra or {})}
        with open(tmp / META, "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        fsync_path(tmp)
        if final.exists():  # an incomplete directory of that name: never trusted, replaced
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(self.directory)

    def _prune(self) -> None:
        for old in to_prune(list_complete(self.directory), self.keep, self.keep_best, self.keep_best_mode):
            # Rename first, so a half-deleted checkpoint never looks like a candidate.
            trash = self.directory / f".trash-{old.path.name}-{os.getpid()}"
            os.rename(old.path, trash)
            shutil.rmtree(trash, ignore_errors=True)


def digest(run_dir: str | Path) -> tuple[int, str]:
    """(step, sha256) over every model and optimizer variable of the newest complete checkpoint."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise UserError(f"{run.path}: run directory not found")
    ref = latest(run.checkpoints)
    if ref is None:
        raise UserError(f"{run.checkpoints}: no complete checkpoint")
    import tensorflow as tf

    reader = tf.train.load_checkpoint(ref.prefix)
    h = hashlib.sha256()
    keys = sorted(k for k in reader.get_variable_to_shape_map()
                  if k.endswith("/.ATTRIBUTES/VARIABLE_VALUE") and k.split("/")[0] in ("model", "optimizer"))
    for key in keys:
        value = reader.get_tensor(key)
        h.update(key.encode())
        h.update(str(value.dtype).encode() + str(value.shape).encode())
        h.update(value.tobytes())
    return ref.step, h.hexdigest()


def variables_digest(variables) -> str:
    """sha256 over the values of live variables, in order: equal digests, equal replicas."""
    h = hashlib.sha256()
    for v in variables:
        value = v.numpy()
        h.update(str(value.dtype).encode() + str(value.shape).encode())
        h.update(value.tobytes())
    return h.hexdigest()


def for_rank(directory: Path, settings, is_root: bool) -> Checkpoints:
    """Rank 0's writer, or the rule alone on the other ranks: decided here, once."""
    return CheckpointWriter(directory, settings) if is_root else Checkpoints(settings)


# --- the command line (pipeline/cli.py dispatches) ---

def digest_arguments(p) -> None:
    p.add_argument("run_dir")
    p.set_defaults(func=digest_cli)


def digest_cli(a) -> int:
    step, sha = digest(a.run_dir)
    print(f"step {step} sha256 {sha}")
    return 0


def list_arguments(p) -> None:
    p.add_argument("run_dir")
    p.set_defaults(func=list_cli)


def list_cli(a) -> int:
    from pipeline.errors import UserError
    from pipeline.rundir import RunDir

    directory = RunDir(a.run_dir).checkpoints
    refs = list_complete(directory)
    if not refs:
        raise UserError(f"{directory}: no complete checkpoint")
    for r in refs:
        print(f"step {r.step:>8} epoch {r.meta.get('epoch', '?'):>4} {r.path}")
    return 0
