"""Staging: copies of exactly the files a node's ranks read, on node-local storage.

`data.stage_dir` names the directory, expanded on each rank (`expand`: `{host}`, `{rank}`,
environment variables such as `$SLURM_TMPDIR`). The ranks that share a host and an expanded
directory form a group; its first rank stages the union of their training and validation
shares under the run's plan (`files_for_ranks`) with a `Stager`:

- a file already there and intact (the source's size and mtime, or, with the source out of
  reach, the size and mtime recorded when it was staged) is reused, not copied;
- the others are copied in parallel, after checking the free space, each under a temporary
  name, checked against the manifest's size (and sha256 when the index has checksums),
  given the source's mtime and renamed into place; a failure removes what it was writing and
  ends with one line naming the file and the host;
- `.pipeline-staged.json` in the directory records what was staged (for reuse with the
  sources gone, and for `clean`).

The run then reads the staged copies as through `data.root` (pipeline/train/staging.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data import sharding
from pipeline.data.shards import Manifest, ShardInfo
from pipeline.errors import UserError

RECORD = ".pipeline-staged.json"
LOCK = ".pipeline-staged.lock"
TMP_MARK = ".staging-"
COPY_BLOCK = 8 << 20
_VAR = re.compile(r"\$(\w+)|\$\{([^}]*)\}")


def expand(pattern: str, host: str, rank: int, environ) -> Path:
    """data.stage_dir on this rank: `{host}` and `{rank}` filled in, `$VAR` / `${VAR}` from the
    environment, `~` expanded. An unset variable or another `{...}` is one line naming it."""
    def var(m):
        name = m.group(1) or m.group(2)
        if name not in environ or not environ[name]:
            raise UserError(f"data.stage_dir={pattern}: ${name} is not set on {host} (rank {rank})")
        return environ[name]

    text = _VAR.sub(var, pattern)
    try:
        text = text.format(host=host, rank=rank)
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"data.stage_dir={pattern}: only {{host}} and {{rank}} are filled in ({e})") from None
    path = Path(text).expanduser()
    if not path.is_absolute():
        raise UserError(f"data.stage_dir={pattern}: {path} is not an absolute path")
    return path


def files_for_ranks(m: Manifest, ranks: list[int], size: int, update_batch: int, val_batch: int) -> list[ShardInfo]:
    """The files the given ranks read under the run's plan (pipeline/train/trainer.py's
    make_plan): their training and validation shares, each file once, in manifest order."""
    want: dict[str, ShardInfo] = {}
    for split, batch, drop_last in (("train", update_batch, True), ("val", val_batch, False)):
        shards = m.shards(split)
        if not shards:
            continue
        counts = [s.num_samples for s in shards]
        for r in ranks:
            for i, _, _ in sharding.assign(counts, r, size, batch, drop_last=drop_last).ranges:
                want.setdefault(shards[i].file, shards[i])
    order = {s.file: i for i, s in enumerate(m.shards("train") + m.shards("val"))}
    return sorted(want.values(), key=lambda s: order[s.file])


@dataclass
class Outcome:
    dir: str
    files: int
    bytes: int
    copied: int
    reused: int
    copied_bytes: int
    seconds: float
    paths: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"dir": self.dir, "files": self.files, "bytes": self.bytes, "copied": self.copied,
                "reused": self.reused, "copied_bytes": self.copied_bytes, "seconds": round(self.seconds, 3)}


def read_record(dest: Path) -> dict:
    try:
        doc = json.loads((dest / RECORD).read_text())
        return doc if isinstance(doc, dict) and isinstance(doc.get("files"), dict) else {"files": {}}
    except (OSError, ValueError):
        return {"files": {}}


@contextlib.contextmanager
def _locked(dest: Path):
    """Ranks of several groups may share one directory (a stage_dir without {host} on one
    file system): the record is read and rewritten under a lock."""
    import fcntl

    with open(dest / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Stager:
    """Stages `files` of manifest `m` (read from where `m` says they are) into `dest`."""

    def __init__(self, m: Manifest, dest: Path, files: list[ShardInfo], host: str, threads: int = 0):
        self.m, self.dest, self.files, self.host = m, Path(dest), files, host
        self.threads = threads or min(8, max(1, os.cpu_count() or 1))
        self.total_bytes = 0
        self.done_bytes = 0
        self._lock = threading.Lock()
        self._abort = threading.Event()

    # --- what is there already ---

    def _expected(self, s: ShardInfo, src_st) -> int | None:
        return s.bytes if s.bytes is not None else (src_st.st_size if src_st is not None else None)

    def intact(self, s: ShardInfo, record: dict) -> bool:
        """The staged copy of `s` is there and whole: the source's size and mtime (or, with the
        source out of reach, the size and mtime recorded when it was staged)."""
        try:
            st = os.stat(self.dest / s.file)
        except OSError:
            return False
        src_st = _stat(self.m.path(s))
        want = self._expected(s, src_st)
        if want is not None and st.st_size != want:
            return False
        if src_st is not None:
            return st.st_size == src_st.st_size and st.st_mtime_ns == src_st.st_mtime_ns
        rec = record.get("files", {}).get(s.file)
        return bool(rec) and rec.get("bytes") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns

    # --- the copy ---

    def run(self) -> Outcome:
        t0 = time.perf_counter()
        try:
            self.dest.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"{self.dest}: cannot make the staging directory on {self.host} ({e.strerror}; "
                            f"data.stage_dir)") from None
        record = read_record(self.dest)
        todo, reused = [], []
        for s in self.files:
            (reused if self.intact(s, record) else todo).append(s)
        sizes = []
        for s in todo:
            src_st = _stat(self.m.path(s))
            if src_st is None:
                raise UserError(f"{self.m.path(s)}: missing on {self.host}, and no intact staged copy in {self.dest} "
                                f"(data.stage_dir)")
            sizes.append(src_st.st_size)
        self.total_bytes = sum(sizes)
        self._check_space(todo, sizes)
        done: dict[str, dict] = {}
        if todo:
            with ThreadPoolExecutor(self.threads, thread_name_prefix="stage-copy") as pool:
                futures = [pool.submit(self._copy, s, done) for s in todo]
                wait(futures, return_when=FIRST_EXCEPTION)
                failed = next((f for f in futures if f.done() and f.exception() is not None), None)
                if failed is not None:
                    self._abort.set()
                    for f in futures:
                        f.cancel()
                    wait(futures)
                    # The copy's own failure is the one to report; the record is a convenience
                    # (the sources' size and mtime still show the renamed copies intact).
                    with contextlib.suppress(OSError):
                        self._write_record(done)
                    raise failed.exception()
        try:
            self._write_record(done)
        except OSError as e:
            raise UserError(f"{self.dest / RECORD}: cannot write the staging record on {self.host} "
                            f"({e.strerror or e}; data.stage_dir)") from None
        all_bytes = sum(os.stat(self.dest / s.file).st_size for s in self.files)
        return Outcome(str(self.dest), len(self.files), all_bytes, len(todo), len(reused), self.total_bytes,
                       time.perf_counter() - t0, [str(self.dest / s.file) for s in self.files])

    def _check_space(self, todo: list[ShardInfo], sizes: list[int]) -> None:
        need = sum(sizes)
        if not need:
            return
        free = shutil.disk_usage(self.dest).free
        if need <= free:
            return
        acc = 0
        for s, n in zip(todo, sizes):
            acc += n
            if acc > free:
                raise UserError(f"{self.dest / s.file}: does not fit on {self.host}: {need / 1e6:.1f} MB to stage, "
                                f"{free / 1e6:.1f} MB free in {self.dest} (data.stage_dir)")

    def _copy(self, s: ShardInfo, done: dict) -> None:
        src, dst = self.m.path(s), self.dest / s.file
        tmp = dst.with_name(f".{dst.name}{TMP_MARK}{self.host}-{os.getpid()}")
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            st = os.stat(src)
            digest = hashlib.sha256() if s.sha256 else None
            n = 0
            buf = bytearray(COPY_BLOCK)
            view = memoryview(buf)
            with open(src, "rb", buffering=0) as fi, open(tmp, "wb", buffering=0) as fo:
                while True:
                    if self._abort.is_set():
                        raise _Aborted()
                    k = fi.readinto(buf)
                    if not k:
                        break
                    part = view[:k]
                    while part:
                        part = part[fo.write(part):]
                    if digest is not None:
                        digest.update(view[:k])
                    n += k
                    with self._lock:
                        self.done_bytes += k
            want = s.bytes if s.bytes is not None else st.st_size
            if n != want:
                raise UserError(f"{src}: copied {n} bytes to {self.host}, the manifest says {want} (the source changed "
                                f"since indexing? pipeline data verify)")
            if digest is not None and digest.hexdigest() != s.sha256:
                raise UserError(f"{src}: the copy on {self.host} has sha256 {digest.hexdigest()[:12]}..., the index "
                                f"says {s.sha256[:12]}... (the source changed, or it was damaged in the copy)")
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.replace(tmp, dst)
            with self._lock:
                done[s.file] = {"bytes": n, "mtime_ns": st.st_mtime_ns, "sha256": digest.hexdigest() if digest else ""}
        except _Aborted:
            _remove(tmp)
            raise
        except UserError:
            _remove(tmp)
            raise
        except OSError as e:
            _remove(tmp)
            raise UserError(f"{src}: staging to {dst} on {self.host} failed ({e.strerror or e}); nothing half-copied "
                            f"is left in use") from None

    def _write_record(self, done: dict) -> None:
        if not done:
            return
        with _locked(self.dest):
            doc = read_record(self.dest)
            doc["dataset"] = str(self.m.dir)
            doc["files"].update(done)
            tmp = self.dest / f"{RECORD}.tmp-{os.getpid()}"
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
            os.replace(tmp, self.dest / RECORD)


class _Aborted(Exception):
    """Another copy failed: this one stops and removes its temporary file."""


def clean(dest: Path) -> tuple[int, int]:
    """Removes what staging put in `dest` (the files its record lists, left-over temporary
    files, the record) and the directories left empty; returns (files, bytes) removed."""
    dest = Path(dest)
    if not dest.is_dir():
        return 0, 0
    files, nbytes = 0, 0
    targets = [dest / f for f in read_record(dest)["files"]]
    targets += [p for p in dest.rglob(f"*{TMP_MARK}*") if p.is_file()]
    for p in targets:
        with contextlib.suppress(FileNotFoundError):
            size = p.stat().st_size
            p.unlink()
            files, nbytes = files + 1, nbytes + size
    for name in (RECORD, LOCK):
        _remove(dest / name)
    for d in sorted((p for p in dest.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()
    with contextlib.suppress(OSError):
        dest.rmdir()
    return files, nbytes


def _stat(path: Path):
    try:
        return os.stat(path)
    except OSError:
        return None


def _remove(p: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(p)
