"""Horovod timelines (Chrome trace format, written by rank 0): where communication time goes
and which rank arrives last at negotiation.

Each tensor is a trace "process" (pid). Its life is a NEGOTIATE_<OP> bar, with one
zero-length tick per rank named after that rank as it reports the tensor ready, followed by
an <OP> bar (ALLREDUCE, ...) whose nested bars are the phases: MPI_ALLREDUCE,
MEMCPY_IN_FUSION_BUFFER, QUEUE, ... Fused tensors overlap in time, so each phase's time is the
union of its bars' intervals (wall time during which the phase was running for any tensor),
not their sum. A file cut off mid-write (a killed run) is read up to its last whole event.
"""

from __future__ import annotations

import bisect
import functools
import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def events(path: Path, chunk: int = 1 << 20):
    """Trace events one by one, streaming; stops quietly at a truncated tail."""
    dec = json.JSONDecoder()
    buf = ""
    with open(path, encoding="utf-8", errors="replace") as f:
        started = False
        while True:
            data = f.read(chunk)
            buf += data
            pos = 0
            if not started:
                stripped = buf.lstrip()
                if not stripped:
                    if not data:
                        return
                    continue
                if stripped[0] != "[":
                    return  # not a trace array
                pos = len(buf) - len(stripped) + 1
                started = True
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos >= len(buf) or buf[pos] == "]":
                    break
                try:
                    ev, end = dec.raw_decode(buf, pos)
                except ValueError:
                    break  # an event split across chunks (or a truncated tail)
                if isinstance(ev, dict):
                    yield ev
                pos = end
            buf = buf[pos:]
            if not data or buf.startswith("]"):
                return


def _union_s(intervals: list[tuple[float, float]]) -> float:
    if not intervals:
        return 0.0
    iv = np.array(sorted(intervals))
    total, cur_s, cur_e = 0.0, iv[0, 0], iv[0, 1]
    for s, e in iv[1:]:
        if s > cur_e:
            total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return (total + cur_e - cur_s) / 1e6


def is_gradient(tensor: str) -> bool:
    """Gradient tensors: Horovod's tape names them after the gradient ops
    (`..._gradient_tape_...`), the grouped allreduce of accumulated gradients `grads`, and
    `hvd.DistributedOptimizer` (the Horovod Keras loop) `Distributed<Opt>_Allreduce/.../
    HorovodAllreduce_grads_<i>_0`; the per-step stop flag, evaluation sums and statistics are
    not gradients."""
    t = tensor.lower()
    last = t.split("/")[-1]
    return "gradient" in t or last.startswith("grads") or last.startswith("horovodallreduce_grads")


OP_PHASES = ("MPI_ALLREDUCE", "NCCL_ALLREDUCE", "GLOO_ALLREDUCE")
# Where a gradient tensor's name stops naming the traced function it belongs to.
FUNCTION_ENDS = ("Distributed", "gradient_allreduce/", "HorovodAllreduce", "grads")


# Tensors of one fused response start their MPI/NCCL call within this many microseconds.
FUSED_WITHIN_US = 100.0


def _fused(starts: list[float], within_us: float = FUSED_WITHIN_US) -> list[float]:
    """The start of each fused operation: tensors of one fused response start their
    MPI/NCCL call within microseconds of each other."""
    ops: list[float] = []
    for t in sorted(starts):
        if not ops or t - ops[-1] > within_us:
            ops.append(t)
    return ops


class _File:
    """One timeline file read once: each phase's intervals (all tensors, and gradient tensors
    alone), and for every negotiation all ranks took part in, which rank came last and by how
    much."""

    def __init__(self, path: Path, ranks: int):
        self.ranks = ranks
        self.phases: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.grad_phases: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.late: list[tuple[int, float, float]] = []  # (last rank, the one before it ready, it ready)
        self.events, self.span = 0, 0.0
        self._stack: dict[int, list[tuple[str, float]]] = defaultdict(list)
        self._ticks: dict[int, dict[int, float]] = defaultdict(dict)
        self._grad_pids: set = set()
        self._names: dict[int, str] = {}
        self._op_starts: dict[int, list[float]] = defaultdict(list)
        self._ready: dict[int, list[float]] = defaultdict(list)   # per gradient tensor: all ranks ready
        self._done: dict[int, list[float]] = defaultdict(list)    # ... and its collective done
        t_min, t_max = float("inf"), float("-inf")
        for ev in events(path):
            ph, pid, ts = ev.get("ph"), ev.get("pid"), ev.get("ts")
            if ph == "M" and ev.get("name") == "process_name":
                self._names[pid] = str(ev.get("args", {}).get("name", ""))
                if is_gradient(self._names[pid]):
                    self._grad_pids.add(pid)
            if ph not in ("B", "E", "X") or not isinstance(ts, (int, float)):
                continue
            self.events += 1
            t_min, t_max = min(t_min, ts), max(t_max, ts)
            self._event(ev, ph, pid, ts)
        self.span = (t_max - t_min) / 1e6 if t_max >= t_min else 0.0

    def _event(self, ev: dict, ph: str, pid, ts: float) -> None:
        stack = self._stack[pid]
        if ph == "B":
            stack.append((str(ev.get("name", "")), ts))
        elif ph == "X":
            if stack and stack[-1][0].startswith("NEGOTIATE_"):
                try:
                    self._ticks[pid][int(ev.get("name"))] = ts
                except (TypeError, ValueError):
                    pass
        elif stack:
            name, start = stack.pop()
            self.phases[name].append((start, ts))
            if pid in self._grad_pids:
                self.grad_phases[name].append((start, ts))
            if name in OP_PHASES:
                self._op_starts[pid].append(start)
                if pid in self._grad_pids:
                    self._done[pid].append(ts)
            if name.startswith("NEGOTIATE_"):
                arrived = self._ticks.pop(pid, {})
                if pid in self._grad_pids:  # ready on every rank (no ticks: the cache's end)
                    self._ready[pid].append(max(arrived.values(), default=ts))
                if len(arrived) == self.ranks and self.ranks > 1:
                    order = sorted(arrived.items(), key=lambda kv: kv[1])
                    (last, t_last), (_, t_prev) = order[-1], order[-2]
                    if 0 <= last < self.ranks:
                        self.late.append((last, t_prev, t_last))

    @functools.cached_property
    def _gradient_op_starts(self) -> list[float]:
        """The start of each fused call that carries gradients, in order (the file is read
        whole by __init__, so this is worked out once)."""
        return _fused([t for p in self._grad_pids for t in self._op_starts.get(p, [])])

    def gradient_ops(self) -> int:
        """Fused operations: gradient tensors whose MPI/NCCL call started together are one."""
        return len(self._gradient_op_starts)

    def solo_ops(self) -> int:
        """Collectives of tensors that are not gradients (the stop flag, evaluation sums) that
        no gradient shares: each one a negotiation and a call of its own."""
        grad = self._gradient_op_starts
        other = _fused([t for p, ts in self._op_starts.items() if p not in self._grad_pids for t in ts])

        def shared(t: float) -> bool:
            i = bisect.bisect_left(grad, t - FUSED_WITHIN_US)
            return i < len(grad) and grad[i] <= t + FUSED_WITHIN_US

        return sum(1 for t in other if not shared(t))

    def tails_s(self) -> list[float]:
        """Per step: from the moment the last gradient is ready on every rank to the end of
        its collective, the communication backprop did not hide. A tensor's k-th negotiation
        is step k's; tensors of one traced function (the name's scope before the allreduce's
        own: Horovod's tape or optimizer scope, the pipeline's, or the op) make one sequence."""
        groups: dict[str, list[int]] = defaultdict(list)
        for p in self._grad_pids:
            if self._done.get(p):
                name = self._names.get(p, "")
                cut = min([i for i in (name.find(m) for m in FUNCTION_ENDS) if i >= 0] or [len(name)])
                groups[name[:cut]].append(p)
        out = []
        for pids in groups.values():
            for k in range(min(min(len(self._ready[p]), len(self._done[p])) for p in pids)):
                last = max(pids, key=lambda p: self._ready[p][k])
                out.append((max(self._done[p][k] for p in pids) - self._ready[last][k]) / 1e6)
        return out


def analyze(paths: list[Path], ranks: int) -> dict:
    """Phase times and negotiation arrival order from one or more timeline files (files are
    separate runs: times are a union within each file, summed across them)."""
    n = max(ranks, 1)
    wall, count = defaultdict(float), defaultdict(int)
    grad_wall, grad_count = defaultdict(float), defaultdict(int)
    last_counts, late_total = np.zeros(n, dtype=np.int64), np.zeros(n)
    lateness: list[list[float]] = [[] for _ in range(n)]
    grad_ops, solo_ops, span, n_events, tails = 0, 0, 0.0, 0, []
    for path in paths:
        f = _File(path, ranks)
        span, n_events, grad_ops = span + f.span, n_events + f.events, grad_ops + f.gradient_ops()
        solo_ops, tails = solo_ops + f.solo_ops(), tails + f.tails_s()
        late_iv: list[list[tuple[float, float]]] = [[] for _ in range(n)]
        for last, t_prev, t_last in f.late:
            last_counts[last] += 1
            lateness[last].append((t_last - t_prev) / 1e6)
            late_iv[last].append((t_prev, t_last))
        for r, iv in enumerate(late_iv):
            late_total[r] += _union_s(iv)
        for name, iv in f.phases.items():
            wall[name] += _union_s(iv)
            count[name] += len(iv)
        for name, iv in f.grad_phases.items():
            grad_wall[name] += _union_s(iv)
            grad_count[name] += len(iv)
    negotiations = int(last_counts.sum())
    return {
        "files": [str(p) for p in paths],
        "events": n_events,
        "span_s": span,
        "phases": {name: {"wall_s": wall[name], "count": count[name]} for name in sorted(wall)},
        # The same for gradient tensors only: what the communication model predicts.
        "gradient_phases": {name: {"wall_s": grad_wall[name], "count": grad_count[name]} for name in sorted(grad_wall)},
        "gradient_ops": grad_ops,
        "solo_ops": solo_ops,
        "steps": len(tails),  # steps whose gradients the timeline saw (of every traced function)
        # per step, the median time from the last gradient ready on all ranks to its collective done
        "exposed_tail_p50_s": float(np.median(tails)) if tails else None,
        "negotiations": negotiations,
        "last_to_negotiate": [
            {"rank": r, "share": float(last_counts[r] / negotiations) if negotiations else 0.0,
             "lateness_p50_s": float(np.median(lateness[r])) if lateness[r] else 0.0,
             # wall time during which the others were ready for a tensor and this rank was not
             # (a union: tensors negotiated together count once)
             "late_s_total": float(late_total[r])}
            for r in range(ranks)] if ranks > 1 else [],
    }
