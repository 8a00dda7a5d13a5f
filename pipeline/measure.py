"""The measurement rules, one copy each: every speed figure the pipeline prints (a rank's
summary, `pipeline analyze`, every benchmark) uses these, so two figures never disagree
because two copies of a rule drifted apart.

- Warm-up: the first steps of a segment of training (graph tracing, allocator and input
  pipeline filling) are left out of speed figures: 10, or a fifth of a short segment.
- Repeats: a figure measured several times is reported as its median with min and max.
"""

from __future__ import annotations

import statistics

WARMUP_MAX = 10        # steps left out at the start of each segment of training ...
WARMUP_FRACTION = 5    # ... or a fifth of a short segment
WARMUP_RULE = f"first min({WARMUP_MAX}, n/{WARMUP_FRACTION}) steps"


def warmup_count(steps: int) -> int:
    """Steps left out of speed figures at the start of a segment of `steps` steps."""
    return min(WARMUP_MAX, steps // WARMUP_FRACTION)


def median_range(values, target: float | None = None) -> dict:
    """Median with min and max over repeats; with a target, whether the median meets it."""
    values = list(values)
    out = {"value": statistics.median(values), "min": min(values), "max": max(values), "repeats": len(values)}
    if target is not None:
        out["target"] = target
        out["met"] = out["value"] >= target
    return out


def fmt(s: dict, unit: str = "", scale: float = 1.0, digits: int = 0) -> str:
    """`median [min-max]` of a median_range result."""
    return (f"{s['value'] * scale:.{digits}f}{unit} "
            f"[{s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f}]")
