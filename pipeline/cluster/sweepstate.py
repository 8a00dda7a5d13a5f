"""A sweep's state on disk, read by `pipeline sweep` and by its leaderboard: the files a sweep
writes, each point's state from its run directory (and SLURM's queue, where it was submitted),
and why a point failed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

MANIFEST = "sweep.json"
POINT_FILE = "sweep-point.json"
POINT_CONFIG = "sweep-config.json"
EXIT_FILE = "sweep-exit.json"    # --local: the point's exit code and wall time
LOG_FILE = "sweep-train.out"     # --local: the point's stdout and stderr


def point_state(d: Path, active: set[str] | None = None) -> tuple[str, str]:
    """(state, why): pending (never ran), queued / running (an active SLURM job), finished,
    stopped (preempted; runs again from its checkpoint), failed (and why)."""
    active = active or set()
    if d.name in active:
        return active_state(d, active), ""
    ranks = sorted((d / "ranks").glob("rank-*.json")) if (d / "ranks").is_dir() else []
    summaries = []
    for p in ranks:
        try:
            summaries.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            summaries.append({"status": "unreadable"})
    exit_info = read_json(d / EXIT_FILE)
    size = (read_json(d / "config.json") or {}).get("ranks")
    statuses = {s.get("status") for s in summaries}
    if summaries and statuses == {"finished"} and (size is None or len(summaries) == size):
        return "finished", ""
    if summaries and statuses <= {"finished", "stopped"} and "stopped" in statuses:
        return "stopped", "preempted: resumes from its checkpoint when run again"
    if not summaries and exit_info is None and not (d / "postmortem").is_dir():
        return "pending", ""
    return "failed", failure_reason(d, exit_info)


def active_state(d: Path, active: dict | set) -> str:
    return active.get(d.name, "running") if isinstance(active, dict) else "running"


def failure_reason(d: Path, exit_info: dict | None) -> str:
    """Why a point failed: its post-mortem's first line, else its exit code and the last
    error line of its output."""
    from pipeline.analysis import postmortem

    code = (exit_info or {}).get("exit_code")
    prefix = f"exit {code}: " if code is not None else ""
    if postmortem.present(d) or list(d.glob("ranks/rank-*.events")):
        # The flight recorders say where each rank was, post-mortem files or not.
        return prefix + postmortem.analyze(d)["lines"][0]
    for log in [d / LOG_FILE] + job_logs(d):
        if log.exists():
            lines = [x for x in log.read_text(errors="replace").splitlines() if "error" in x.lower()]
            if lines:
                return prefix + lines[-1].strip()[:300]
    return prefix + "ended without a summary (killed, or failed before training); see its job log"


def job_logs(d: Path) -> list[Path]:
    """The SLURM job logs of a point's array tasks, oldest first (DIR/.jobs/JOB_TASK.out)."""
    manifest = read_json(d.parent / MANIFEST) or {}
    return [d.parent / ".jobs" / f"{s['job_id']}_{s['points'].index(d.name)}.out"
            for s in manifest.get("submissions", []) if d.name in s["points"]]


def read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def slurm(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env or os.environ, timeout=120)


def active_jobs(manifest: dict) -> dict[str, str]:
    """Points with a queued or running array task: {point name: 'queued' | 'running'}."""
    subs = manifest.get("submissions", [])
    ids = sorted({s["job_id"] for s in subs})
    if not ids or not shutil.which("squeue"):
        return {}
    r = slurm(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(ids)])
    if r.returncode != 0:
        return {}
    task_point = {f"{s['job_id']}_{i}": name for s in subs for i, name in enumerate(s["points"])}
    out = {}
    for line in r.stdout.splitlines():
        jid, _, st = line.strip().partition(" ")
        name = task_point.get(jid)
        if name:
            out[name] = "running" if st in ("RUNNING", "COMPLETING") else "queued"
    return out
