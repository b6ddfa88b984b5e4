"""Ownership of neuron ranges, once assigned: coverage checks, normalizing, per-partition summaries.

:func:`check_coverage` validates lookup tables and hand-edited Partition ranges; :func:`shares` and
:func:`range_texts` describe what each partition owns as ``L:A-B`` text. The assignment itself is
:func:`partition_server.api.distributor.distribute`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from partition_server.api.distributor import Assignment, Range, Runs, _append_merged, _fmt

__all__ = ["PartitionShare", "check_coverage", "normalize", "range_texts", "shares"]


def check_coverage(layer_units: Sequence[int], owners: Sequence[Sequence[Range]]) -> list[str]:
    """Problems with per-layer ranges: neurons owned twice or never, as ``L:A-B`` text.

    Used to validate lookup tables and hand-edited Partition ranges. An empty list
    means every neuron of every layer has exactly one owner.
    """
    problems: list[str] = []
    if len(owners) != len(layer_units):
        return [f"{len(owners)} layers of ranges for a network of {len(layer_units)} layers"]
    for layer, (units, ranges) in enumerate(zip(layer_units, owners)):
        if isinstance(ranges, Runs) and ranges.units == units:
            continue  # valid by construction
        cursor = 0
        for r in sorted(ranges, key=lambda r: (r.start, r.end)):
            if r.start < 0 or r.end > units or r.start >= r.end:
                problems.append(f"range {layer}:{r.start}-{r.end - 1} of partition {r.partition} is outside 0-{units - 1}")
                continue
            if r.start < cursor:
                problems.append(f"neurons {_fmt(layer, r.start, min(r.end, cursor))} owned twice")
            elif r.start > cursor:
                problems.append(f"neurons {_fmt(layer, cursor, r.start)} owned by no partition")
            cursor = max(cursor, r.end)
        if cursor < units:
            problems.append(f"neurons {_fmt(layer, cursor, units)} owned by no partition")
    return problems


def normalize(owners: Sequence[Sequence[Range]]) -> Assignment:
    """Sort each layer's ranges and merge adjacent ranges of the same partition
    (:class:`Runs` are kept as they are: they are sorted and merged already)."""
    out: Assignment = []
    for ranges in owners:
        if isinstance(ranges, Runs):
            out.append(ranges)
            continue
        merged: list[Range] = []
        for r in sorted(ranges, key=lambda r: (r.start, r.end)):
            _append_merged(merged, r)
        out.append(merged)
    return out


@dataclass
class PartitionShare:
    """Summary of what one partition owns, for status and printing."""

    index: int
    neurons: int = 0
    ranges: list[str] = field(default_factory=list)


def shares(owners: Sequence[Sequence[Range]], partitions: int) -> list[PartitionShare]:
    """Per-partition neuron counts and ``L:A-B`` range texts."""
    out = [PartitionShare(i) for i in range(partitions)]
    for layer, ranges in enumerate(owners):
        triples = ranges.triples() if isinstance(ranges, Runs) else ((r.partition, r.start, r.end) for r in ranges)
        for p, start, end in triples:
            share = out[p]
            share.neurons += end - start
            share.ranges.append(_fmt(layer, start, end))
    return out


def range_texts(owners: Sequence[Sequence[Range]], partition: int) -> list[str]:
    """``L:A-B`` texts of what ``partition`` owns, layer-major (one partition of :func:`shares`)."""
    out: list[str] = []
    for layer, ranges in enumerate(owners):
        spans = (ranges.spans(partition) if isinstance(ranges, Runs)
                 else [(r.start, r.end) for r in ranges if r.partition == partition])
        out += [_fmt(layer, start, end) for start, end in spans]
    return out
