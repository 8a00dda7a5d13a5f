"""The run's staging step (`data.stage_dir`): every host's copy of its ranks' files, made
before any rank reads a sample, then the run reads the copies as through `data.root`.

Each rank expands data.stage_dir for itself (pipeline/data/stage.py's `expand`); the ranks
with the same host and directory form a group whose first rank stages the group's files on
its own threads. Meanwhile every rank takes part in a round of status every second (one
small allgather): the bytes copied on every host feed each rank's start-up watchdog (a copy
that moves keeps the run alive; one that stops for train.startup_timeout_s ends it) and rank
0's progress line; a failure anywhere ends every rank with the failing host's one line.
After the copy each group's first rank checks its staged files as the run's data check does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.data import shards, stage
from pipeline.errors import UserError
from pipeline.runtime import flight

ROUND_S = 1.0
PROGRESS_EVERY_S = 10.0


@dataclasses.dataclass
class Staged:
    """What staging did, for this rank's host (`outcome`) and over all hosts (`totals`)."""
    manifest: shards.Manifest  # reading from the staged copy
    outcome: dict  # this host's group: dir, files, bytes, copied, reused, copied_bytes, seconds
    totals: dict  # every group: bytes, files, copied, reused, hosts
    t0: float  # wall clock when staging began
    t1: float  # wall clock when every copy was done
    paths: list  # the staged files this rank's group holds (its first rank's list; [] elsewhere)
    leader: bool


def stage_for_run(cfg, plan, dist, watchdog=None, out=None) -> Staged:
    t0 = time.time()
    host = socket.gethostname()
    dest = stage.expand(cfg.data.stage_dir, host, dist.rank, os.environ)
    groups = dist.allgather_object((host, str(dest)), name="stage_dirs")
    members = [r for r, g in enumerate(groups) if g == (host, str(dest))]
    leader = members[0] == dist.rank
    m = plan.manifest
    job = None
    stager = None
    pool = ThreadPoolExecutor(1, thread_name_prefix="stage") if leader else None
    try:
        if leader:
            files = stage.files_for_ranks(m, members, dist.size, plan.update_batch, cfg.train.batch_size)
            stager = stage.Stager(m, dest, files, host)
            job = pool.submit(stager.run)
        statuses, paths = _rounds(dist, job, stager, watchdog, out, len(set(groups)))
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    mine = statuses[members[0]]["outcome"]
    staged_m = dataclasses.replace(m, root=dest)
    problems = []
    if leader:
        for s in stager.files:
            p = shards.check_one(staged_m, s)
            if p:
                problems.append(f"{p} (staged on {host})")
    found = [p for ps in dist.allgather_object(problems, name="staged_check") for p in ps]
    if found:
        raise UserError(found[0] + (f" (and {len(found) - 1} more)" if len(found) > 1 else ""),
                        quiet=not dist.is_root)
    outcomes = [s["outcome"] for s in statuses if s["outcome"] is not None]
    totals = {k: sum(o[k] for o in outcomes) for k in ("bytes", "files", "copied", "reused", "copied_bytes")}
    totals["hosts"] = len(outcomes)
    t1 = time.time()
    if dist.is_root and out is not None:
        print(f"pipeline: staged {totals['files']} files ({totals['bytes'] / 1e6:.1f} MB) to {cfg.data.stage_dir} on "
              f"{totals['hosts']} host(s): {totals['copied']} copied ({totals['copied_bytes'] / 1e6:.1f} MB), "
              f"{totals['reused']} already there, in {t1 - t0:.1f}s", file=out, flush=True)
    return Staged(staged_m, mine, totals, t0, t1, paths, leader)


def _rounds(dist, job, stager, watchdog, out, hosts: int) -> tuple[list[dict], list[str]]:
    """Status rounds until every group's copy is done; raises the first failure everywhere.
    Returns every rank's last status and the staged paths of this rank's copy ([]: not a
    group's first rank)."""
    last_bytes, last_print, t_start = -1, time.monotonic(), time.monotonic()
    paths: list[str] = []
    while True:
        status = {"done": True, "error": None, "outcome": None, "bytes": 0, "total": 0}
        if job is not None:
            try:
                res = job.result(timeout=ROUND_S)
                status["outcome"], paths = res.as_dict(), res.paths
            except TimeoutError:
                status["done"] = False
            except UserError as e:
                status["error"] = str(e)
            except Exception as e:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
                status["error"] = f"staging to {stager.dest} on {socket.gethostname()} failed: {type(e).__name__}: {e}"
            status.update(bytes=stager.done_bytes, total=stager.total_bytes)
        statuses = dist.allgather_object(status, name="staging")
        errors = [s["error"] for s in statuses if s["error"]]
        if errors:
            raise UserError(errors[0], quiet=not dist.is_root)
        done = sum(s["bytes"] for s in statuses)
        if done > last_bytes:
            last_bytes = done
            if watchdog is not None:
                watchdog.progress()
        if all(s["done"] for s in statuses):
            return statuses, paths
        now = time.monotonic()
        if dist.is_root and out is not None and now - last_print >= PROGRESS_EVERY_S:
            last_print = now
            total = sum(s["total"] for s in statuses)
            rate = done / max(now - t_start, 1e-9)
            eta = (total - done) / rate if rate > 0 else float("inf")
            print(f"pipeline: staging {done / 1e6:.0f} of {total / 1e6:.0f} MB on {hosts} host(s), "
                  f"{rate / 1e6:.0f} MB/s, ETA {eta:.0f}s", file=out, flush=True)


# --- the command line (pipeline/cli.py dispatches) ---

def add_arguments(p) -> None:
    p.add_argument("dir", nargs="?", help="a dataset directory (shards or an index): stage every file of it")
    p.add_argument("--to", metavar="DEST", help="the staging directory ({host}, {rank}, $VARS filled in, as "
                                                "data.stage_dir)")
    p.add_argument("--run-dir", help="with --clean: the run whose data.stage_dir (config.json) to clean")
    p.add_argument("--clean", action="store_true", help="remove what staging put there (the files its record "
                                                        "lists), on this host")
    p.set_defaults(func=cli)


def _dest(a) -> tuple[Path, str]:
    host = socket.gethostname()
    pattern = a.to
    if pattern is None and a.run_dir:
        cfg = Path(a.run_dir) / "config.json"
        try:
            pattern = json.loads(cfg.read_text())["data"]["stage_dir"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{cfg}: no data.stage_dir recorded (not a run that staged its data?)") from None
        if not pattern:
            raise UserError(f"{cfg}: data.stage_dir is empty: the run read its files in place")
    if pattern is None:
        raise UserError("pipeline data stage: give --to DEST (or --clean --run-dir RUN)")
    return stage.expand(pattern, host, flight.launch_rank(), os.environ), host


def cli(a) -> int:
    dest, host = _dest(a)
    if a.clean:
        files, nbytes = stage.clean(dest)
        print(f"{dest} on {host}: removed {files} staged files ({nbytes / 1e6:.1f} MB)")
        return 0
    if not a.dir:
        raise UserError("pipeline data stage: give the dataset directory to stage (or --clean)")
    m = shards.load_manifest(a.dir)
    st = stage.Stager(m, dest, [s for split in m.splits for s in m.shards(split)], host)
    out = st.run()
    if m.indexed:
        use = f"--set data.root={dest}"
    else:  # shards: their manifest goes along, so the copy is a dataset of its own
        shutil.copy2(m.dir / shards.MANIFEST, dest / shards.MANIFEST)
        use = f"--set data.dir={dest}"
    print(f"{dest} on {host}: {out.files} files ({out.bytes / 1e6:.1f} MB), {out.copied} copied "
          f"({out.copied_bytes / 1e6:.1f} MB), {out.reused} already there, in {out.seconds:.1f}s; train from it "
          f"with {use}, or set data.stage_dir to stage as part of the run")
    return 0
