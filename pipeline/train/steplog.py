"""Every rank's step log: steps/rank-<R>.jsonl, one JSON line per step.

The records of each call of the compiled steps are flushed together, so a crash leaves every
step of every finished call on disk (flush hands the lines to the kernel; no fsync, which
would cost more than the steps). The log measures its
own cost, reported as the step-log overhead in ranks/rank-R.json. Field names and the header
record: pipeline/rundir.py.
"""

from __future__ import annotations

import json
import os
import time

from pipeline.rundir import HEADER_KIND, RunDir

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
    """Appends records to steps/rank-<rank>.jsonl; measures its own cost. A context manager:
    the file is closed on every way out of the training loop."""

    def __init__(self, run_dir: RunDir, rank: int):
        self.path = run_dir.step_log(rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1 << 16)
        self.cost_s = 0.0  # time spent writing records, to report logging overhead
        self.records = 0

    def header(self, **fields) -> None:
        """Opens this process's part of the log: who writes the following steps and how."""
        self.write({"kind": HEADER_KIND, **fields, "time": time.time()})

    def steps(self, records: list[dict]) -> None:
        """Step records (fields: rundir.STEP_FIELDS), handed to the kernel together."""
        t0 = time.perf_counter()
        self._f.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records))
        self._f.flush()
        self.cost_s += time.perf_counter() - t0
        self.records += len(records)

    def write(self, record: dict) -> None:
        self.steps([record])

    @property
    def closed(self) -> bool:
        return self._f.closed

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "StepLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
