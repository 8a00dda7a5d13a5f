"""Quality targets as written in configs and flags: `METRIC<=X` or `METRIC>=X` over a val_<name>
of metrics.jsonl (`mlperf.target`, `pipeline analyze --target`, sweeps' `--target`)."""

from __future__ import annotations

from pipeline.errors import UserError


def parse(spec, key: str = "--target") -> tuple[str, str, float]:
    """`0.9` (val_accuracy >= 0.9), `val_mae<=0.2`, `mean_iou>=0.5` -> (metric, op, value)."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return "val_accuracy", ">=", float(spec)
    text = str(spec).replace(" ", "")
    for op in (">=", "<="):
        if op in text:
            name, _, value = text.partition(op)
            try:
                v = float(value)
            except ValueError:
                break
            if name:
                return (name if name.startswith("val_") else f"val_{name}"), op, v
            break
    try:
        return "val_accuracy", ">=", float(text)
    except ValueError:
        raise UserError(f"{key} {spec!r}: give METRIC>=X or METRIC<=X (e.g. val_mae<=0.2), or a number for "
                        f"val_accuracy >= it") from None


def parse_mlperf(spec: str) -> tuple[str, str, float]:
    """mlperf.target (`val_mae<=0.124`) -> (metric, op, value)."""
    try:
        return parse(spec)
    except UserError:
        raise UserError(f"mlperf.target {spec!r}: give METRIC<=X or METRIC>=X, e.g. val_mae<=0.124") from None


def reached(value, op: str, goal: float) -> bool:
    return isinstance(value, (int, float)) and (value <= goal if op == "<=" else value >= goal)
