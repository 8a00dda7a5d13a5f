"""The grammar of `debug.fault`, a fault on purpose for tests and for checking what a site does
when a rank hangs, exits or raises: `rank=1,step=20,phase=data,kind=hang`. Pure: the config
checks it when loaded; pipeline/runtime/fault.py makes it happen.

Phases: `startup` (before the rank joins the job: as a rank stuck importing from a slow file
system), `data` (before the call holding the step gets its batch), `allreduce` (the batch in
hand, before the call holding the step: the peers wait in that step's allreduce), `eval` (the
first evaluation at or after the step), `checkpoint` (the first checkpoint at or after the
step, on the rank named; rank 0 is the one that writes). Kinds: `hang` (waits forever),
`exit` (leaves at once with EXIT_FAULT, leaving no post-mortem, as a killed process would),
`raise` (a RuntimeError, as a bug would).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import UserError

PHASES = ("startup", "data", "allreduce", "eval", "checkpoint")
KINDS = ("hang", "exit", "raise")


@dataclass(frozen=True)
class Fault:
    rank: int
    step: int
    phase: str
    kind: str

    def __str__(self) -> str:
        return f"rank={self.rank},step={self.step},phase={self.phase},kind={self.kind}"

    def splits_before(self, rank: int) -> int | None:
        """The step after which a call of steps must end so the fault's step starts one."""
        return self.step - 1 if rank == self.rank and self.phase in ("data", "allreduce") else None

    def due(self, rank: int, phase: str, step: int) -> bool:
        if rank != self.rank or phase != self.phase:
            return False
        return step == self.step if phase in ("data", "allreduce") else step >= self.step


def parse(text: str, key: str = "debug.fault") -> Fault | None:
    """`rank=R,step=N,phase=P,kind=K` (step may be left out for phase=startup); "" is none."""
    if not text.strip():
        return None
    fields = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or name not in ("rank", "step", "phase", "kind"):
            raise UserError(f"{key}: {part.strip()!r} is not one of rank=R, step=N, phase=P, kind=K "
                            f"(e.g. rank=1,step=20,phase=data,kind=hang)")
        fields[name] = value
    phase, kind = fields.get("phase", ""), fields.get("kind", "")
    if phase not in PHASES:
        raise UserError(f"{key}: phase must be one of {', '.join(PHASES)}, got {phase!r}")
    if kind not in KINDS:
        raise UserError(f"{key}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not fields.get("rank", "").isdigit():
        raise UserError(f"{key}: rank must be a rank number >= 0, got {fields.get('rank', '')!r}")
    step = fields.get("step", "0" if phase == "startup" else "")
    if not step.isdigit() or (phase != "startup" and int(step) < 1):
        raise UserError(f"{key}: step must be a step number >= 1, got {step!r}")
    return Fault(int(fields["rank"]), int(step), phase, kind)
