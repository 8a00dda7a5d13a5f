"""Rank-0 checkpoints that are complete or invisible.

Layout under RUN_DIR/checkpoints/:
    step-00000200/state.index, state.data-*   model + optimizer variables (tf.train.Checkpoint)
    step-00000200/meta.json                   step, epoch, time; written last: the completion mark
A checkpoint is written into a hidden temporary directory, every file fsynced, meta.json
added, then the directory is renamed into place; a crash at any point leaves either the old
set or the old set plus one complete new checkpoint. Leftover temporaries are removed on the
next start. Only directories named step-N holding a meta.json with "complete": true are ever
chosen for resume.

meta.json also holds each file's size and sha256, taken at save time. A checkpoint damaged
after it was written (a bad disk, a partial copy to or from scratch) fails `problem()` or
TensorFlow's own checksums on restore: rank 0 moves it aside to damaged-step-N/ (with a
damaged.json saying why; never chosen, never pruned) and resumes from the one before.
"""

from __future__ import annotations

import contextlib
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
DAMAGED = "damaged.json"
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


def file_facts(directory: Path) -> dict:
    """{file name: {"size", "sha256"}} of a checkpoint's state files."""
    facts = {}
    for f in sorted(directory.iterdir()):
        if f.name.startswith(STATE):
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            facts[f.name] = {"size": f.stat().st_size, "sha256": h.hexdigest()}
    return facts


def problem(ref: CheckpointRef, deep: bool = False) -> str | None:
    """What is wrong with a complete checkpoint's files, or None: a file missing, of another
    size or another sha256 than at save time (meta.json's "files"); with `deep`, or where the
    meta predates those facts, also every tensor read back through TensorFlow's checksums."""
    files = ref.meta.get("files")
    if isinstance(files, dict) and files:
        for name, want in files.items():
            f = ref.path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != want.get("size"):
                return f"{name} is {f.stat().st_size} bytes where {want.get('size')} were written"
        now = file_facts(ref.path)
        for name, want in files.items():
            if now.get(name, {}).get("sha256") != want.get("sha256"):
                return f"{name} does not match the sha256 taken when it was written"
        if not deep:
            return None
    try:
        _tensors(ref)
    except Exception as e:  # noqa: BLE001 - TensorFlow's DataLossError, NotFoundError, an OSError: all say damaged
        return f"TensorFlow cannot read it: {_first_line(e)}"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _tensors(ref: CheckpointRef):
    """(key, value) of every model and optimizer variable, read through TensorFlow."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(ref.prefix)
    keys = sorted(k for k in reader.get_variable_to_shape_map()
                  if k.endswith("/.ATTRIBUTES/VARIABLE_VALUE") and k.split("/")[0] in ("model", "optimizer"))
    return [(key, reader.get_tensor(key)) for key in keys]


def set_aside(ref: CheckpointRef, why: str) -> Path:
    """Moves a damaged checkpoint to damaged-step-N/ beside the others, with damaged.json."""
    dest = ref.path.with_name(f"damaged-{ref.path.name}")
    n = 1
    while dest.exists():
        n += 1
        dest = ref.path.with_name(f"damaged-{ref.path.name}-{n}")
    os.rename(ref.path, dest)
    with contextlib.suppress(OSError):
        atomic_write_text(dest / DAMAGED, json.dumps({"step": ref.step, "reason": why, "time": time.time(),
                                                      "was": str(ref.path)}, indent=1) + "\n")
    return dest


def list_damaged(directory: Path) -> list[tuple[Path, str]]:
    """(folder, why) of the checkpoints set aside as damaged."""
    out = []
    if directory.is_dir():
        for p in sorted(directory.glob("damaged-step-*")):
            try:
                why = json.loads((p / DAMAGED).read_text()).get("reason", "?")
            except (OSError, ValueError):
                why = "no damaged.json"
            out.append((p, why))
    return out


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

    def restore_newest(self, state, say) -> CheckpointRef | None:
        """Rank 0's: restores the newest intact checkpoint into `state`; None (fresh) elsewhere."""
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

    def restore_newest(self, state, say) -> CheckpointRef | None:
        """Restores the newest complete checkpoint that is intact (`problem()`, then TensorFlow's
        own checksums while reading); each damaged one is said in one line and set aside. None:
        there was none (a fresh start). All damaged: a UserError naming what was tried."""
        refs = list_complete(self.directory)
        tried = []
        for n, ref in enumerate(reversed(refs)):
            why = problem(ref)
            if why is None:
                try:
                    state.read(ref.prefix).assert_existing_objects_matched()
                    return ref
                except Exception as e:  # noqa: BLE001 - DataLossError, NotFoundError, OSError: damaged
                    if isinstance(e, (AssertionError, ValueError)) and "matched" in str(e).lower():
                        raise  # another model's checkpoint: not damage, a mistake to report as it is
                    why = f"TensorFlow cannot read it: {_first_line(e)}"
            dest = set_aside(ref, why)
            tried.append(f"{ref.path.name} ({why})")
            say(f"pipeline: checkpoint {ref.path} is damaged ({why}); set aside as {dest.name}"
                + (", trying the one before" if n + 1 < len(refs) else ""))
        if tried:
            raise UserError(f"{self.directory}: every checkpoint is damaged, none to resume from: {'; '.join(tried)} "
                            f"(set aside as damaged-step-N/; move them back or start a new run directory)")
        return None

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
                "writer": {"host": socket.gethostname(), "pid": os.getpid()}, "files": file_facts(tmp),
                **(extra or {})}
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
    why = problem(ref)
    if why is None:
        try:
            tensors = _tensors(ref)
        except Exception as e:  # noqa: BLE001 - TensorFlow's DataLossError and kin: the file is damaged
            why = f"TensorFlow cannot read it: {_first_line(e)}"
    if why is not None:
        raise UserError(f"{ref.path}: damaged checkpoint ({why}); `pipeline checkpoint verify {run.path}` "
                        f"checks them all")
    h = hashlib.sha256()
    for key, value in tensors:
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


def verify_arguments(p) -> None:
    p.add_argument("run_dir")
    p.set_defaults(func=verify_cli)


def verify_cli(a) -> int:
    """Every complete checkpoint read back (sizes, sha256, TensorFlow's checksums); nothing is
    moved. Exit 2 when one is damaged."""
    run = RunDir(a.run_dir)
    if not run.path.is_dir():
        raise UserError(f"{run.path}: run directory not found")
    refs = list_complete(run.checkpoints)
    if not refs:
        raise UserError(f"{run.checkpoints}: no complete checkpoint")
    bad = []
    for r in refs:
        why = problem(r, deep=True)
        print(f"step {r.step:>8} {'ok' if why is None else 'DAMAGED: ' + why}  {r.path}")
        if why is not None:
            bad.append(r)
    for p, why in list_damaged(run.checkpoints):
        print(f"set aside         {p}: {why}")
    if bad:
        raise UserError(f"{run.checkpoints}: {len(bad)} of {len(refs)} checkpoint(s) damaged (newest: "
                        f"{bad[-1].path.name})")
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
