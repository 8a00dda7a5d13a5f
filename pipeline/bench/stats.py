"""Summaries of repeated measurements: median with min and max."""

from __future__ import annotations

import statistics


def summary(values: list[float]) -> dict:
    return {"value": statistics.median(values), "min": min(values), "max": max(values), "repeats": len(values)}


def fmt(s: dict, unit: str = "", scale: float = 1.0, digits: int = 0) -> str:
    return (f"{s['value'] * scale:.{digits}f}{unit} "
            f"[{s['min'] * scale:.{digits}f}-{s['max'] * scale:.{digits}f}]")
