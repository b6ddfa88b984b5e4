"""Optimizers of one partition's rows: SGD with momentum and Adam.

Optimizer state lives with the rows it updates (``DESIGN.md``, "Execution engine"): each owned
layer keeps its buffers, named ``{weight|bias}.{buffer}`` as :meth:`OptimizerConfig.buffer_names`
lists them, next to its parameters. An update never modifies an array in place: it returns
new, read-only arrays, so snapshots taken earlier stay valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from partition_server.api.manifest import OPTIMIZERS
from partition_server.engine.versions import Params, frozen

__all__ = ["OptimizerConfig", "apply_gradients", "update"]

F32 = np.float32


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer of the local rows; its state lives with the rows it updates.

    Attributes:
        name: ``"sgd"`` (classic momentum: ``v = momentum*v + g; w -= lr*v``; plain SGD when
            ``momentum == 0``) or ``"adam"`` (Kingma & Ba, bias-corrected).
        learning_rate: step size, > 0.
        momentum: SGD momentum in ``[0, 1)``.
        beta1, beta2: Adam decay rates in ``[0, 1)``.
        eps: Adam denominator term, > 0.
        weight_decay: L2 coefficient ``>= 0`` added to the gradient of weights and biases
            (``g += weight_decay * w``, as ``torch.optim.SGD``/``Adam``).

    Raises:
        ValueError: a value out of range; the message names the field.
    """

    name: str = "sgd"
    learning_rate: float = 0.01
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer.name: must be 'sgd' or 'adam' (got {self.name!r})")
        if not self.learning_rate > 0:
            raise ValueError(f"optimizer.learning_rate: must be > 0 (got {self.learning_rate!r})")
        for field in ("momentum", "beta1", "beta2"):
            value = getattr(self, field)
            if not 0 <= value < 1:
                raise ValueError(f"optimizer.{field}: must be in [0, 1) (got {value!r})")
        if not self.eps > 0:
            raise ValueError(f"optimizer.eps: must be > 0 (got {self.eps!r})")
        if not self.weight_decay >= 0:
            raise ValueError(f"optimizer.weight_decay: must be >= 0 (got {self.weight_decay!r})")

    def buffer_names(self) -> tuple[str, ...]:
        """Per-parameter state buffer suffixes: ``("momentum",)``, ``("adam_m", "adam_v")`` or ``()``."""
        if self.name == "adam":
            return ("adam_m", "adam_v")
        return ("momentum",) if self.momentum > 0 else ()


def _sgd(cfg: OptimizerConfig, p: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray],
         name: str, t: int) -> np.ndarray:
    lr = F32(cfg.learning_rate)
    if cfg.momentum == 0:
        return p - lr * g
    key = f"{name}.momentum"
    v = g if key not in state else F32(cfg.momentum) * state[key] + g
    v = np.array(v, dtype=F32, copy=True)
    state[key] = v
    return p - lr * v


def _adam(cfg: OptimizerConfig, p: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray],
          name: str, t: int) -> np.ndarray:
    lr = F32(cfg.learning_rate)
    mk, vk = f"{name}.adam_m", f"{name}.adam_v"
    b1, b2 = F32(cfg.beta1), F32(cfg.beta2)
    m = (F32(1) - b1) * g if mk not in state else b1 * state[mk] + (F32(1) - b1) * g
    v = (F32(1) - b2) * (g * g) if vk not in state else b2 * state[vk] + (F32(1) - b2) * (g * g)
    state[mk], state[vk] = m, v
    m_hat = m / F32(1 - cfg.beta1 ** t)
    v_hat = v / F32(1 - cfg.beta2 ** t)
    return p - lr * m_hat / (np.sqrt(v_hat) + F32(cfg.eps))


_RULES: Mapping[str, Callable[..., np.ndarray]] = {"sgd": _sgd, "adam": _adam}


def update(cfg: OptimizerConfig, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], *,
           name: str, t: int) -> np.ndarray:
    """The new value of one parameter after one optimizer step.

    Args:
        cfg: the optimizer.
        param: the parameter, float32, any shape (``[n_local, in_k]`` or ``[n_local]``).
        grad: its gradient, float32, same shape.
        state: the layer's buffers; the entries ``{name}.{buffer}`` are replaced by new arrays
            (a missing buffer counts as zeros).
        name: ``"weight"`` or ``"bias"``, the buffers' prefix.
        t: the step number, ``>= 1`` (Adam's bias correction).

    Returns:
        the updated parameter, a new float32 array of the same shape.
    """
    if cfg.weight_decay:
        grad = grad + F32(cfg.weight_decay) * param
    return _RULES[cfg.name](cfg, param, grad, state, name, t)


def apply_gradients(cfg: OptimizerConfig, grads: Mapping[int, tuple[np.ndarray, np.ndarray]], *,
                    params: Params, opt_state: Mapping[int, Mapping[str, np.ndarray]],
                    t: int) -> tuple[Params, dict[int, dict[str, np.ndarray]]]:
    """One optimizer step of every layer in ``grads``; the inputs are not modified.

    Args:
        cfg: the optimizer.
        grads: ``{k: (dW_rows [n_local_k, in_k], db_rows [n_local_k])}`` float32.
        params: ``{k: (W_rows, b_rows)}`` float32, shaped as ``grads[k]``, for every owned layer.
        opt_state: ``{k: {"weight.momentum": ..., ...}}`` per layer of ``params``.
        t: the step number this update makes, ``>= 1``.

    Returns:
        ``(params, opt_state)`` after the step: new dicts, read-only arrays; layers without a
        gradient keep their arrays.
    """
    new_params = dict(params)
    new_state = dict(opt_state)
    for k, (dw, db) in grads.items():
        w, b = params[k]
        state = dict(opt_state[k])
        w2 = update(cfg, w, dw, state, name="weight", t=t)
        b2 = update(cfg, b, db, state, name="bias", t=t)
        for arr in state.values():
            arr.flags.writeable = False
        new_params[k] = (frozen(w2), frozen(b2))
        new_state[k] = state
    return new_params, new_state
