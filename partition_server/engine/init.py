"""Deterministic initial parameters: a pure function of (seed, layer).

Every partition computes the same global initialisation and keeps only its own rows, so any
assignment of neurons to partitions yields the same network without coordination
(``DESIGN.md``, "Execution engine"), in the spirit of the per-neuron ownership of "Multi Part
Deployment of Neural Network" (arXiv 2506.01387) and "F2D2N: Fully Distributed Deep Neural
Network" (Leite et al., 2024).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["init_params"]

F32 = np.float32


def init_params(inputs: int, layers: Sequence[Any], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Deterministic initial parameters of the whole network.

    Layer ``k``'s weight ``[units_k, in_k]`` float32 is drawn uniformly from
    ``np.random.default_rng([seed, k])``: He-uniform (limit ``sqrt(6 / in_k)``) for relu,
    Glorot-uniform (limit ``sqrt(6 / (in_k + units_k))``) otherwise. Biases ``[units_k]``
    float32 are 0.

    Args:
        inputs: features of layer 0.
        layers: objects with ``units`` and ``activation`` (e.g. ``manifest.LayerSpec``).
        seed: non-negative integer.

    Returns:
        ``[(W_k [units_k, in_k], b_k [units_k])]`` per layer, float32.
    Raises:
        ValueError: a negative seed (from numpy).
    """
    params = []
    fan_in = int(inputs)
    for k, layer in enumerate(layers):
        units = int(layer.units)
        if layer.activation == "relu":
            limit = np.sqrt(6.0 / fan_in)
        else:
            limit = np.sqrt(6.0 / (fan_in + units))
        rng = np.random.default_rng([seed, k])
        w = rng.uniform(-limit, limit, size=(units, fan_in)).astype(F32)
        params.append((w, np.zeros(units, dtype=F32)))
        fan_in = units
    return params
