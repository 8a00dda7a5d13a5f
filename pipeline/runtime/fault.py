"""Faults on purpose (`debug.fault`, its grammar in pipeline/faultspec.py): hang, exit or raise
where the spec says; docs/troubleshooting.md."""

from __future__ import annotations

import os
import sys
import threading

from pipeline.errors import EXIT_FAULT
from pipeline.faultspec import Fault


def fire(fault: Fault, rank: int, step: int, flight=None) -> None:
    """Hangs, exits or raises, after recording where (the recorder names the phase)."""
    if flight is not None:
        flight.event("fault", phase=fault.phase, step=step, label=f"debug.fault {fault.kind}", waiting="")
    print(f"rank {rank}: debug.fault: {fault.kind} in {fault.phase} at step {step}", file=sys.stderr, flush=True)
    if fault.kind == "hang":
        threading.Event().wait()
    if fault.kind == "exit":
        os._exit(EXIT_FAULT)
    raise RuntimeError(f"debug.fault: rank {rank} raised on purpose in {fault.phase} at step {step}")
