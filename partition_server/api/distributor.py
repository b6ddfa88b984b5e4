"""Neuron distributor: which partition owns which neuron.

Implements the strategies of ``DESIGN.md`` ("Distributor strategies"), the four
of "Multi Part Deployment of Neural Network" (arXiv 2506.01387, section 3:
by count, by percentage, by neuron ids, by layers) plus ``balanced``, which
keeps every partition busy on every layer, and ``auto``, which is ``balanced`` except
that layers too narrow to be worth splitting (fewer than ``AUTO_MIN_UNITS_PER_PARTITION``
units per partition, e.g. a 10-unit output layer) are kept whole on one partition: their
exchanges then cost a handful of messages instead of ``P (P - 1)``.

An assignment is returned per layer as :class:`Runs`: a sequence of half-open
:class:`Range` objects sorted by ``start`` that cover ``[0, units)`` exactly once,
adjacent ranges of the same partition merged, stored as two integer tuples (run
starts and owners). Identical layers share one :class:`Runs` object, so an
assignment costs O(distinct layer patterns x runs), never O(neurons): a billion
neurons in 1,000 equal layers on 1,000 partitions is one pattern of 1,000 runs.
Every function here is deterministic.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from decimal import Decimal
from fractions import Fraction
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, overload

from partition_server.api.errors import FieldError

STRATEGIES = ("balanced", "count", "percentage", "ids", "layers", "auto")
AUTO_MIN_UNITS_PER_PARTITION = 16  # strategy auto: narrower layers stay whole on one partition


class DistributionError(FieldError):
    """A distribution that cannot be applied; ``field`` names the manifest path."""


@dataclass(frozen=True)
class Range:
    """Neurons ``[start, end)`` of one layer, owned by ``partition``."""

    partition: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Distribution:
    """``spec.distribution`` of a NeuralNetwork. Only the list of the chosen strategy is read."""

    strategy: str = "balanced"
    counts: tuple[int, ...] | None = None
    percentages: tuple[float, ...] | None = None
    ids: tuple[tuple[str, ...], ...] | None = None
    layers: tuple[tuple[int, ...], ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"strategy": self.strategy}
        for name in ("counts", "percentages", "ids", "layers"):
            value = getattr(self, name)
            if value is not None:
                out[name] = [list(v) if isinstance(v, tuple) else v for v in value]
        return out


class Runs(Sequence[Range]):
    """One layer's owners as runs: run ``i`` is ``[starts[i], starts[i+1])`` (the last ends at
    ``units``) and belongs to ``owners[i]``.

    Immutable and hashable, so identical layers share one object. Valid by construction:
    ``starts[0] == 0``, strictly increasing and below ``units``; owners non-negative and
    adjacent owners distinct (merged). As a ``Sequence[Range]`` it reads like the list of
    ranges it stands for, and compares equal to such a list. Per-partition views are
    computed once per object and cached.

    Raises:
        ValueError: on construction, runs that break one of the rules above.
    """

    __slots__ = ("units", "starts", "owners", "_hash", "_spans", "_sizes")

    def __init__(self, units: int, starts: Sequence[int], owners: Sequence[int]):
        starts, owners = tuple(starts), tuple(owners)
        if len(starts) != len(owners):
            raise ValueError(f"{len(starts)} run starts but {len(owners)} owners")
        if not starts or starts[0] != 0:
            raise ValueError("runs must start at 0")
        if starts[-1] >= units:
            raise ValueError(f"run start {starts[-1]} is not below the layer's {units} units")
        prev_s, prev_o = -1, -1
        for s, o in zip(starts, owners):
            if s <= prev_s:
                raise ValueError(f"run starts must increase ({prev_s} then {s})")
            if o < 0:
                raise ValueError(f"owner {o} is negative")
            if o == prev_o:
                raise ValueError(f"adjacent runs at {prev_s} and {s} have the same owner {o} (must be merged)")
            prev_s, prev_o = s, o
        self.units, self.starts, self.owners = units, starts, owners
        self._hash: int | None = None
        self._spans: dict[int, list[tuple[int, int]]] | None = None
        self._sizes: dict[int, int] | None = None

    @classmethod
    def whole(cls, units: int, partition: int) -> "Runs":
        """The layer owned entirely by ``partition``."""
        return cls(units, (0,), (partition,))

    @classmethod
    def even(cls, units: int, parts: int) -> "Runs":
        """``[0, units)`` cut into ``min(parts, units)`` contiguous near-equal runs owned by
        0, 1, ...; the first ``units mod parts`` get one extra (``balanced``)."""
        n = min(parts, units)
        base, extra = divmod(units, n)
        return cls(units, [p * base + min(p, extra) for p in range(n)], range(n))

    @classmethod
    def from_ranges(cls, units: int, ranges: Sequence[Range]) -> "Runs":
        """Runs of ranges that cover ``[0, units)`` exactly once (any order; merged here).

        Raises:
            ValueError: a gap, an overlap, or a range outside the layer.
        """
        if isinstance(ranges, Runs) and ranges.units == units:
            return ranges
        starts: list[int] = []
        owners: list[int] = []
        cursor = 0
        for r in sorted(ranges, key=lambda r: (r.start, r.end)):
            if r.start != cursor or r.end <= r.start or r.end > units:
                raise ValueError(f"range {r.start}-{r.end} of partition {r.partition} does not continue at {cursor} "
                                 f"within 0-{units}")
            if not owners or owners[-1] != r.partition:
                starts.append(r.start)
                owners.append(r.partition)
            cursor = r.end
        if cursor != units:
            raise ValueError(f"ranges end at {cursor}, not at the layer's {units} units")
        return cls(units, starts, owners)

    def end(self, i: int) -> int:
        return self.starts[i + 1] if i + 1 < len(self.starts) else self.units

    def triples(self) -> Iterator[tuple[int, int, int]]:
        """``(partition, start, end)`` per run, ascending."""
        ends = self.starts[1:] + (self.units,)
        return zip(self.owners, self.starts, ends)

    def __len__(self) -> int:
        return len(self.starts)

    @overload
    def __getitem__(self, i: int) -> Range: ...
    @overload
    def __getitem__(self, i: slice) -> list[Range]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self.starts)))]
        n = len(self.starts)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("run index out of range")
        return Range(self.owners[i], self.starts[i], self.end(i))

    def __iter__(self) -> Iterator[Range]:
        return (Range(p, s, e) for p, s, e in self.triples())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Runs):
            return self is other or (self.units == other.units and self.starts == other.starts
                                     and self.owners == other.owners)
        if isinstance(other, (list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash((self.units, self.starts, self.owners))
        return self._hash

    def __repr__(self) -> str:
        return f"Runs(units={self.units}, starts={list(self.starts)}, owners={list(self.owners)})"

    def owner_of(self, unit: int) -> int:
        """The partition owning ``unit`` (binary search over the run starts).

        Raises:
            IndexError: ``unit`` is outside ``[0, units)``.
        """
        if not 0 <= unit < self.units:
            raise IndexError(f"unit {unit} is outside 0-{self.units - 1}")
        return self.owners[bisect_right(self.starts, unit) - 1]

    def spans(self, partition: int) -> list[tuple[int, int]]:
        """``(start, end)`` of the runs ``partition`` owns, ascending (may be empty)."""
        if self._spans is None:
            spans: dict[int, list[tuple[int, int]]] = {}
            for p, s, e in self.triples():
                spans.setdefault(p, []).append((s, e))
            self._spans = spans
        return list(self._spans.get(partition, ()))

    def partitions(self) -> list[int]:
        """Partitions owning at least one unit of the layer, ascending."""
        return sorted(self.sizes())

    def sizes(self) -> dict[int, int]:
        """Units owned per partition (only partitions that own some)."""
        if self._sizes is None:
            sizes: dict[int, int] = {}
            for p, s, e in self.triples():
                sizes[p] = sizes.get(p, 0) + e - s
            self._sizes = sizes
        return self._sizes

    def max_owner(self) -> int:
        return max(self.owners)


Assignment = list[Sequence[Range]]

_FIELD = "spec.distribution"
_ID_RE = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*(?:-\s*(\d+)\s*)?\Z")


def distribute(layer_units: Sequence[int], partitions: int, dist: Distribution) -> Assignment:
    """Assign every neuron to one of ``partitions`` partitions.

    Args:
        layer_units: neurons per layer, e.g. ``[128, 64, 10]``.
        partitions: number of partitions P, ``1 <= P <= sum(layer_units)``.
        dist: the strategy and its list.

    Returns:
        Per layer, the owned ranges sorted by start, covering ``[0, units)`` once.

    Raises:
        DistributionError: naming the field (``spec.partitions``,
            ``spec.distribution.counts`` ...) and the offending value, for a list
            whose length differs from P, a sum that is off, a neuron owned twice
            or never, an unknown strategy or layer.
    """
    total = sum(layer_units)
    if partitions < 1 or partitions > total:
        raise DistributionError("spec.partitions", partitions,
                                f"must be between 1 and the number of neurons ({total})")
    if dist.strategy == "balanced":
        return _balanced(layer_units, partitions)
    if dist.strategy == "auto":
        return _auto(layer_units, partitions)
    if dist.strategy == "count":
        counts = _require_list(dist.counts, "counts", partitions)
        for i, c in enumerate(counts):
            if not isinstance(c, int) or isinstance(c, bool) or c < 0:
                raise DistributionError(f"{_FIELD}.counts[{i}]", c, "must be a non-negative integer")
        if sum(counts) != total:
            raise DistributionError(f"{_FIELD}.counts", list(counts),
                                    f"sum is {sum(counts)}, must equal the number of neurons ({total})")
        return _by_counts(layer_units, counts)
    if dist.strategy == "percentage":
        pcts = _require_list(dist.percentages, "percentages", partitions)
        return _by_counts(layer_units, percentages_to_counts(pcts, total))
    if dist.strategy == "ids":
        return _by_ids(layer_units, _require_list(dist.ids, "ids", partitions))
    if dist.strategy == "layers":
        return _by_layers(layer_units, _require_list(dist.layers, "layers", partitions))
    raise DistributionError(f"{_FIELD}.strategy", dist.strategy, f"must be one of {', '.join(STRATEGIES)}")


def _require_list(value: Sequence | None, name: str, partitions: int) -> Sequence:
    if value is None:
        raise DistributionError(f"{_FIELD}.{name}", None, f"is required by strategy '{_strategy_of(name)}'")
    if len(value) != partitions:
        raise DistributionError(f"{_FIELD}.{name}", list(value),
                                f"has {len(value)} entries, must have one per partition ({partitions})")
    return value


def _strategy_of(list_name: str) -> str:
    return {"counts": "count", "percentages": "percentage"}.get(list_name, list_name)


def percentages_to_counts(percentages: Sequence[float], total: int) -> list[int]:
    """Largest-remainder apportionment of ``total`` neurons; ties go to the lower index.

    Raises:
        DistributionError: a negative percentage, or a sum other than 100.
    """
    for i, p in enumerate(percentages):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 0:
            raise DistributionError(f"{_FIELD}.percentages[{i}]", p, "must be a finite non-negative number")
    if abs(sum(percentages) - 100) > 1e-9:
        # Summed as the decimals written, so 99.9999999 reads as such (":g" would print 100).
        exact = sum((Decimal(str(p)) for p in percentages), Decimal(0))
        raise DistributionError(f"{_FIELD}.percentages", list(percentages), f"sum is {exact}, must be 100")
    # Fractions of the decimal text keep ties exact: 33.3% of 10 must not lose to float noise.
    quotas = [Fraction(str(p)) * total / 100 for p in percentages]
    counts = [int(q) for q in quotas]
    left = total - sum(counts)
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return counts


def _balanced(layer_units: Sequence[int], partitions: int) -> Assignment:
    shared: dict[int, Runs] = {}
    return [shared.get(units) or shared.setdefault(units, Runs.even(units, partitions)) for units in layer_units]


def _auto(layer_units: Sequence[int], partitions: int) -> Assignment:
    """``balanced``, except that each layer with ``units < AUTO_MIN_UNITS_PER_PARTITION * P``
    goes whole to one partition: the narrow layers, in layer order, to partitions ``P-1``,
    ``P-2``, ... (cyclically), those ``balanced`` gives the fewest neurons. With ``P = 1`` it
    is ``balanced``."""
    out: Assignment = []
    narrow = 0
    shared: dict[tuple[int, int], Runs] = {}
    for units in layer_units:
        if partitions > 1 and units < AUTO_MIN_UNITS_PER_PARTITION * partitions:
            owner = partitions - 1 - narrow % partitions
            narrow += 1
            key = (units, -1 - owner)
            out.append(shared.get(key) or shared.setdefault(key, Runs.whole(units, owner)))
        else:
            out.append(shared.get((units, 0)) or shared.setdefault((units, 0), Runs.even(units, partitions)))
    return out


def _interned(layer_units: Sequence[int], owners: Sequence[Sequence[Range]]) -> Assignment:
    """Complete, merged per-layer ranges as :class:`Runs`, one object per distinct layer."""
    shared: dict[Runs, Runs] = {}
    out: Assignment = []
    for units, ranges in zip(layer_units, owners):
        runs = Runs.from_ranges(units, ranges)
        out.append(shared.setdefault(runs, runs))
    return out


def _by_counts(layer_units: Sequence[int], counts: Sequence[int]) -> Assignment:
    """Partition i takes the next counts[i] neurons in global (layer-major) order.

    Works on ranges: O(layers + partitions) steps, whatever the layer sizes."""
    out: list[list[Range]] = [[] for _ in layer_units]
    layer, offset = 0, 0
    for p, count in enumerate(counts):
        while count > 0:
            take = min(count, layer_units[layer] - offset)
            _append_merged(out[layer], Range(p, offset, offset + take))
            count -= take
            offset += take
            if offset == layer_units[layer]:
                layer, offset = layer + 1, 0
    return _interned(layer_units, out)


def parse_neuron_ids(text: str, field: str) -> tuple[int, int, int]:
    """Parse ``"L:U"`` or ``"L:A-B"`` (inclusive) into ``(layer, start, end)`` half-open."""
    if isinstance(text, int):
        raise DistributionError(field, text, "must be a quoted string like '1:30' (YAML reads an unquoted 1:30 as a number)")
    m = _ID_RE.match(str(text))
    if not m:
        raise DistributionError(field, text, "must look like 'L:U' or 'L:A-B'")
    layer, a = int(m.group(1)), int(m.group(2))
    b = int(m.group(3)) if m.group(3) is not None else a
    if b < a:
        raise DistributionError(field, text, "range end is before its start")
    return layer, a, b + 1


def _by_ids(layer_units: Sequence[int], ids: Sequence[Sequence[str]]) -> Assignment:
    claims: list[list[tuple[int, int, int, str]]] = [[] for _ in layer_units]
    for p, entries in enumerate(ids):
        for j, text in enumerate(entries):
            field = f"{_FIELD}.ids[{p}][{j}]"
            layer, start, end = parse_neuron_ids(text, field)
            if layer >= len(layer_units):
                raise DistributionError(field, text, f"layer {layer} does not exist (the network has {len(layer_units)})")
            if end > layer_units[layer]:
                raise DistributionError(field, text, f"layer {layer} has units 0-{layer_units[layer] - 1}")
            claims[layer].append((start, end, p, field))
    out: Assignment = []
    for layer, units in enumerate(layer_units):
        ranges: list[Range] = []
        cursor, last_field, gaps = 0, "", []
        for start, end, p, field in sorted(claims[layer]):
            if start < cursor:
                raise DistributionError(field, f"{layer}:{start}-{end - 1}",
                                        f"neurons {_fmt(layer, start, min(end, cursor))} are already owned ({last_field})")
            if start > cursor:
                gaps.append(_fmt(layer, cursor, start))
            _append_merged(ranges, Range(p, start, end))
            cursor, last_field = end, field
        if cursor < units:
            gaps.append(_fmt(layer, cursor, units))
        if gaps:
            raise DistributionError(f"{_FIELD}.ids", ", ".join(gaps), "neurons are owned by no partition")
        out.append(ranges)
    return _interned(layer_units, out)


def _by_layers(layer_units: Sequence[int], layers: Sequence[Sequence[int]]) -> Assignment:
    owner: dict[int, int] = {}
    for p, entries in enumerate(layers):
        for j, layer in enumerate(entries):
            field = f"{_FIELD}.layers[{p}][{j}]"
            if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < len(layer_units):
                raise DistributionError(field, layer, f"must be a layer index 0..{len(layer_units) - 1}")
            if layer in owner:
                raise DistributionError(field, layer, f"layer {layer} is already owned by partition {owner[layer]}")
            owner[layer] = p
    missing = [k for k in range(len(layer_units)) if k not in owner]
    if missing:
        raise DistributionError(f"{_FIELD}.layers", missing, "layers are owned by no partition")
    return _interned(layer_units, [[Range(owner[k], 0, units)] for k, units in enumerate(layer_units)])


def _append_merged(ranges: list[Range], new: Range) -> None:
    if ranges and ranges[-1].partition == new.partition and ranges[-1].end == new.start:
        ranges[-1] = Range(new.partition, ranges[-1].start, new.end)
    else:
        ranges.append(new)


def _fmt(layer: int, start: int, end: int) -> str:
    return f"{layer}:{start}" if end - start == 1 else f"{layer}:{start}-{end - 1}"
