"""Deterministic initial parameters: a pure function of (seed, layer, row).

Every row of every layer has its own counter-based random stream: numpy's ``Philox`` keyed by
``(seed, layer)`` (through ``SeedSequence``) with the row index in the counter. A partition
therefore generates only the rows it owns, with no coordination and no full-size temporary, and
any assignment of neurons to partitions (any ``P``, any ranges) yields bit-identical initial
weights (``DESIGN.md``, "Execution engine"), in the spirit of the per-neuron ownership of "Multi
Part Deployment of Neural Network" (arXiv 2506.01387) and "F2D2N: Fully Distributed Deep Neural
Network" (Leite et al., 2024).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["init_params", "init_partition", "init_rows"]

F32 = np.float32


def _limit(activation: str, fan_in: int, units: int) -> float:
    if activation == "relu":
        return float(np.sqrt(6.0 / fan_in))
    return float(np.sqrt(6.0 / (fan_in + units)))


def _layer_key(seed: int, k: int) -> np.ndarray:
    if int(seed) < 0:
        raise ValueError(f"seed: must be a non-negative integer (got {seed!r})")
    return np.random.SeedSequence([int(seed), int(k)]).generate_state(2, np.uint64)


def init_rows(inputs: int, layers: Sequence[Any], seed: int, k: int,
              ranges: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``ranges`` of layer ``k``'s initial parameters, concatenated in range order.

    Row ``r`` of ``W_k`` (``in_k`` float32 values) is ``U(-limit, limit)`` drawn from
    ``Generator(Philox(key=SeedSequence([seed, k]).generate_state(2, uint64), counter=[0, r, 0, 0]))``
    (``random(dtype=float32)`` scaled to the interval): He-uniform (limit ``sqrt(6 / in_k)``) for
    relu, Glorot-uniform (limit ``sqrt(6 / (in_k + units_k))``) otherwise. Biases are 0. Memory:
    only the returned rows.

    Args:
        inputs: features of layer 0.
        layers: objects with ``units`` and ``activation`` (e.g. ``manifest.LayerSpec``).
        seed: non-negative integer.
        k: the layer.
        ranges: half-open row ranges within ``[0, units_k)``.

    Returns:
        ``(W_rows [n, in_k], b_rows [n])`` float32, writeable, ``n`` = total rows of ``ranges``.
    Raises:
        ValueError: a negative seed, or a range outside the layer.
    """
    units = int(layers[k].units)
    fan_in = int(inputs) if k == 0 else int(layers[k - 1].units)
    limit = _limit(layers[k].activation, fan_in, units)
    key = _layer_key(seed, k)
    n = 0
    for start, end in ranges:
        if not 0 <= start <= end <= units:
            raise ValueError(f"ranges: [{start}, {end}) is outside layer {k}'s {units} rows")
        n += end - start
    w = np.empty((n, fan_in), dtype=F32)
    i = 0
    bit = np.random.Philox(key=key)
    state = bit.state
    for start, end in ranges:
        for r in range(start, end):
            state["state"]["counter"] = np.array([0, r, 0, 0], dtype=np.uint64)
            state["buffer_pos"] = 4  # no buffered draws: the row starts at its counter
            state["has_uint32"] = 0
            bit.state = state
            np.random.Generator(bit).random(out=w[i], dtype=F32)
            i += 1
    # U[0, 1) -> U[-limit, limit), in place (no temporary of the layer's size).
    w *= F32(2 * limit)
    w -= F32(limit)
    return w, np.zeros(n, dtype=F32)


def init_partition(inputs: int, layers: Sequence[Any], seed: int,
                   ranges: Mapping[int, Sequence[tuple[int, int]]]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """One partition's initial rows: ``{k: init_rows(..., k, ranges[k])}`` for every layer with rows."""
    return {k: init_rows(inputs, layers, seed, k, rs) for k, rs in sorted(ranges.items()) if rs}


def init_params(inputs: int, layers: Sequence[Any], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Deterministic initial parameters of the whole network (every row; see :func:`init_rows`).

    Args:
        inputs: features of layer 0.
        layers: objects with ``units`` and ``activation`` (e.g. ``manifest.LayerSpec``).
        seed: non-negative integer.

    Returns:
        ``[(W_k [units_k, in_k], b_k [units_k])]`` per layer, float32.
    Raises:
        ValueError: a negative seed.
    """
    return [init_rows(inputs, layers, seed, k, [(0, int(layer.units))]) for k, layer in enumerate(layers)]
