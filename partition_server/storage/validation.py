"""Errors of the checkpoint store and the checks of its inputs: ints, row ranges, network shapes.

Every check raises :class:`StoreError` with a message that names the field and
the offending value, so a caller can pass it on to a user unchanged.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "CheckpointNotFoundError",
    "ForeignReservationError",
    "ReservationError",
    "RowRanges",
    "StoreError",
    "check_int",
    "check_network",
    "check_ranges",
    "count_rows",
    "layer_inputs",
]

RowRanges = list[tuple[int, int]]
"""Half-open ``(start, end)`` neuron index ranges within one layer, ascending, not overlapping."""


class StoreError(ValueError):
    """Bad input to the store, or a checkpoint that is inconsistent or corrupt.

    The message names the sequence, layer, tensor or file and what was wrong.
    """


class CheckpointNotFoundError(StoreError, LookupError):
    """No committed checkpoint exists for the requested sequence."""


class ReservationError(StoreError):
    """A write or commit for a sequence that is not reserved, already committed, or superseded
    by a newer reservation: nothing was written. (gRPC: FAILED_PRECONDITION.)"""


class ForeignReservationError(ReservationError):
    """The sequence is reserved, but by another run or with another token: nothing was written.
    (gRPC: PERMISSION_DENIED.)"""


def check_int(value: Any, field: str, *, minimum: int = 0, maximum: int | None = None) -> int:
    """``value`` as an int in ``minimum..maximum`` (inclusive; no upper bound when None).

    Raises:
        StoreError: naming ``field``, if ``value`` is not an int (bools are refused) or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise StoreError(f"{field} must be an int, got {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        hi = "" if maximum is None else f"..{maximum}"
        raise StoreError(f"{field} must be in {minimum}{hi}, got {value}")
    return value


def check_ranges(ranges: Any, field: str, *, units: int | None = None) -> tuple[tuple[int, int], ...]:
    """Validate :data:`RowRanges`: int pairs, ``start < end``, ascending, disjoint, ``end <= units``.

    Returns:
        The ranges as a tuple of ``(start, end)`` int pairs.

    Raises:
        StoreError: naming ``field`` and the index of the first bad range.
    """
    if isinstance(ranges, (str, bytes)) or not isinstance(ranges, Iterable):
        raise StoreError(f"{field} must be a list of (start, end) pairs, got {ranges!r}")
    out: list[tuple[int, int]] = []
    previous_end = 0
    for i, r in enumerate(ranges):
        try:
            start, end = r
        except (TypeError, ValueError):
            raise StoreError(f"{field}[{i}] must be a (start, end) pair, got {r!r}") from None
        start = check_int(start, f"{field}[{i}] start")
        end = check_int(end, f"{field}[{i}] end")
        if start >= end:
            raise StoreError(f"{field}[{i}] = ({start}, {end}) is empty or reversed; ranges are half-open [start, end)")
        if start < previous_end:
            raise StoreError(f"{field}[{i}] = ({start}, {end}) overlaps or precedes the range before it; "
                             "ranges must be ascending and disjoint")
        if units is not None and end > units:
            raise StoreError(f"{field}[{i}] = ({start}, {end}) exceeds the layer's {units} units")
        out.append((start, end))
        previous_end = end
    return tuple(out)


def count_rows(ranges: Sequence[tuple[int, int]]) -> int:
    """Number of rows (neurons) in half-open ``ranges``."""
    return sum(end - start for start, end in ranges)


def check_network(network: Any) -> list[int]:
    """Validate ``{"inputs": int, "layers": [{"units": int}, ...]}``.

    Returns:
        The units (neurons) per layer.

    Raises:
        StoreError: naming the field, if ``network`` is not of that shape or a count is below 1.
    """
    if not isinstance(network, Mapping):
        raise StoreError(f"network must be a mapping with 'inputs' and 'layers', got {type(network).__name__}")
    check_int(network.get("inputs"), "network.inputs", minimum=1)
    layers = network.get("layers")
    if not isinstance(layers, Sequence) or isinstance(layers, (str, bytes)) or not layers:
        raise StoreError(f"network.layers must be a non-empty list, got {layers!r}")
    units = []
    for k, layer in enumerate(layers):
        if not isinstance(layer, Mapping):
            raise StoreError(f"network.layers[{k}] must be a mapping with 'units', got {layer!r}")
        units.append(check_int(layer.get("units"), f"network.layers[{k}].units", minimum=1))
    return units


def layer_inputs(network: Mapping[str, Any], layer: int) -> int:
    """Input width of ``layer`` in a validated ``network``: ``inputs`` for layer 0, else the previous units."""
    return int(network["inputs"]) if layer == 0 else int(network["layers"][layer - 1]["units"])
