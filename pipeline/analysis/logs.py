"""Reading a run directory the way it is found: finished, crashed or still being written.

Step logs are streamed line by line into one column of floats per field, so a million
records cost tens of MiB, not a dict per line. Nothing here raises on bad content: lines
that do not parse, records without the needed fields and a truncated last line are counted
and reported; a rank with no usable records is reported as missing.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.rundir import STEP_NEEDED, STEP_OPTIONAL, RunDir, is_header

# The step record fields analysis needs (docs/run-directory.md); the optional ones are used when present.
NEEDED = STEP_NEEDED
OPTIONAL = STEP_OPTIONAL


@dataclass
class RankLog:
    rank: int
    path: Path
    cols: dict[str, np.ndarray]  # field -> values in file order (NaN where a record lacks it)
    skipped_lines: int = 0
    partial_last_line: bool = False
    repeated_steps: int = 0  # steps logged more than once (re-run after a crash); the last one counts
    headers: list = field(default_factory=list)  # one per process that wrote to this log

    @property
    def steps(self) -> int:
        return len(self.cols["step"])


@dataclass
class Run:
    dir: Path
    config: dict
    ranks: dict[int, RankLog]
    expected_ranks: int
    metrics: list[dict]
    timelines: list[Path]
    notes: list[str] = field(default_factory=list)
    metrics_skipped: int = 0

    @property
    def missing_ranks(self) -> list[int]:
        return [r for r in range(self.expected_ranks) if r not in self.ranks or self.ranks[r].steps == 0]

    @property
    def skipped_lines(self) -> int:
        return sum(r.skipped_lines for r in self.ranks.values()) + self.metrics_skipped


def read_rank_log(path: Path, rank: int) -> RankLog:
    names = NEEDED + OPTIONAL
    cols = {n: array("d") for n in names}
    skipped = 0
    partial = False
    headers = []
    nan = float("nan")
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                partial = True  # the writer was cut off (or is still writing) mid-line
                skipped += 1
                break
            try:
                rec = json.loads(raw)
                if is_header(rec):
                    headers.append(rec)
                    continue
                values = [float(rec[n]) for n in NEEDED]
            except (ValueError, KeyError, TypeError):
                skipped += 1  # not JSON, not an object, or lacks a needed field
                continue
            for n, v in zip(NEEDED, values):
                cols[n].append(v)
            for n in OPTIONAL:
                v = rec.get(n)
                cols[n].append(float(v) if isinstance(v, (int, float)) else nan)
    arrays = {n: np.frombuffer(c, dtype=np.float64) if len(c) else np.empty(0) for n, c in cols.items()}
    arrays, repeated = _last_of_each_step(arrays)
    return RankLog(rank, path, arrays, skipped, partial, repeated, headers)


def _last_of_each_step(cols: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Sorted by step; where a step was logged twice (a crash lost its checkpoint and the
    step ran again), the later record is the one whose update the model kept."""
    steps = cols["step"]
    if len(steps) == 0:
        return cols, 0
    rev = steps[::-1]
    _, first_in_rev = np.unique(rev, return_index=True)
    keep = len(steps) - 1 - first_in_rev  # index of the last occurrence of each step, by step order
    repeated = len(steps) - len(keep)
    if repeated == 0 and np.all(np.diff(steps) > 0):
        return cols, 0
    return {n: c[keep] for n, c in cols.items()}, repeated


def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    out, skipped = [], 0
    try:
        with open(path, "rb") as f:
            for raw in f:
                try:
                    rec = json.loads(raw)
                except ValueError:
                    skipped += 1
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
                else:
                    skipped += 1
    except FileNotFoundError:
        pass
    return out, skipped


def load(run_dir: str | Path) -> Run:
    rd = RunDir(run_dir)
    d = rd.path
    if not d.is_dir():
        raise UserError(f"{d}: no such run directory")
    if not rd.steps_dir.is_dir():
        raise UserError(f"{d}: not a run directory (no steps/ inside)")
    notes = []
    config = {}
    if rd.config.exists():
        try:
            config = json.loads(rd.config.read_text())
        except ValueError:
            notes.append("config.json does not parse; rank count and batch come from the step logs")
    else:
        notes.append("no config.json; rank count and batch come from the step logs")
    ranks = {rank: read_rank_log(p, rank) for rank, p in rd.step_logs().items()}
    # Without config.json the rank count is at least the highest rank file + 1.
    expected = int(config.get("ranks") or (max(ranks) + 1 if ranks else 0))
    metrics, m_skipped = _read_jsonl(rd.metrics)
    timelines = rd.timelines()
    return Run(d, config, ranks, expected, metrics, timelines, notes, m_skipped)
