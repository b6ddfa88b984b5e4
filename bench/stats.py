"""Summaries the bench scripts report: the median with the spread around it."""

from __future__ import annotations

import statistics

__all__ = ["summary"]


def summary(values: list[float], digits: int = 6) -> dict:
    """``{"median", "min", "max"}`` of ``values`` rounded to ``digits``, and ``"n"``."""
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values)}
