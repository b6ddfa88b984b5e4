"""Activations: each function next to its derivative, one table entry per activation.

In the style of micrograd, an activation is defined once with what the backward pass needs
from it: the forward function of the pre-activation ``z`` and its derivative written in terms
of the output ``a = act(z)`` (the engine keeps ``a``, not ``z``). The names are the API's
(:data:`partition_server.api.manifest.ACTIVATIONS`); :data:`TABLE` has exactly one entry per
name, and a unit test holds it to that.

All arrays are ``[batch, units]`` float32; results are float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from partition_server.api.manifest import ACTIVATIONS

__all__ = ["Activation", "TABLE", "activate", "activation_derivative"]

F32 = np.float32


@dataclass(frozen=True)
class Activation:
    """One activation and its derivative.

    Attributes:
        name: the API name (one of ``ACTIVATIONS``).
        fn: ``z [batch, units] float32 -> a [batch, units] float32``.
        derivative: ``a -> act'(z)`` elementwise, ``[batch, units]`` float32, in terms of the
            output ``a``; it returns None when the derivative is 1 everywhere (identity), so
            callers skip the multiply. None (no function) when the activation has no
            elementwise derivative (softmax: its gradient is folded into the loss).
    """

    name: str
    fn: Callable[[np.ndarray], np.ndarray]
    derivative: Callable[[np.ndarray], np.ndarray | None] | None


def _relu(z: np.ndarray) -> np.ndarray:
    return np.maximum(z, F32(0))


def _relu_derivative(a: np.ndarray) -> np.ndarray:
    return (a > 0).astype(F32)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    # tanh form: no overflow for large |z|, unlike 1 / (1 + exp(-z)).
    return (F32(0.5) * (F32(1) + np.tanh(F32(0.5) * z))).astype(F32, copy=False)


def _sigmoid_derivative(a: np.ndarray) -> np.ndarray:
    return a * (F32(1) - a)


def _tanh(z: np.ndarray) -> np.ndarray:
    return np.tanh(z)


def _tanh_derivative(a: np.ndarray) -> np.ndarray:
    return F32(1) - a * a


def _identity(z: np.ndarray) -> np.ndarray:
    return z


def _identity_derivative(a: np.ndarray) -> None:
    return None


def _softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row maximum."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


TABLE: Mapping[str, Activation] = {
    a.name: a for a in (
        Activation("relu", _relu, _relu_derivative),
        Activation("sigmoid", _sigmoid, _sigmoid_derivative),
        Activation("tanh", _tanh, _tanh_derivative),
        Activation("identity", _identity, _identity_derivative),
        Activation("softmax", _softmax, None),
    )
}


def activate(name: str, z: np.ndarray) -> np.ndarray:
    """Apply activation ``name`` to ``z`` (``[batch, units]`` float32); softmax is row-wise.

    Returns:
        ``[batch, units]`` float32 (identity returns ``z`` itself).
    Raises:
        ValueError: unknown activation.
    """
    act = TABLE.get(name)
    if act is None:
        raise ValueError(f"activation: unknown {name!r}, expected one of {ACTIVATIONS}")
    return act.fn(z)


def activation_derivative(name: str, a: np.ndarray) -> np.ndarray | None:
    """``act'(z)`` elementwise, written in terms of the output ``a = act(z)``.

    Args:
        name: the activation.
        a: ``[batch, units]`` float32 outputs of the activation.

    Returns:
        ``[batch, units]`` float32, or None for identity (derivative 1). Softmax has no
        elementwise derivative and is handled through the loss.
    Raises:
        ValueError: softmax or an unknown activation.
    """
    act = TABLE.get(name)
    if act is None or act.derivative is None:
        raise ValueError(f"activation: no elementwise derivative for {name!r}")
    return act.derivative(a)
