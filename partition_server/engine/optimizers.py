"""Optimizers of one partition's rows: SGD with momentum and Adam.

Optimizer state lives with the rows it updates (``DESIGN.md``, "Execution engine"): each owned
layer keeps its buffers, named ``{weight|bias}.{buffer}`` as :meth:`OptimizerConfig.buffer_names`
lists them, next to its parameters. An update never modifies a parameter: it returns new,
read-only arrays, so the versions inference reads stay valid. The buffers are the training
step's alone and are updated in place; a checkpoint copies them (``Engine.state_snapshot``).
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


def _effective_grad(cfg: OptimizerConfig, p: np.ndarray, g: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """``g + weight_decay * p`` in ``out`` (or a new array), or ``g`` itself without weight decay."""
    if not cfg.weight_decay:
        return g
    out = np.multiply(p, F32(cfg.weight_decay), out=out)
    out += g
    return out


def _decayed(state: dict[str, np.ndarray], key: str, rate: np.float32, like: np.ndarray) -> np.ndarray:
    """``state[key] *= rate`` in place, or a new array ``rate * state[key]`` (zeros when missing)
    stored in ``state`` when the buffer cannot be written.

    A buffer loaded from a checkpoint may be a read-only view of the file's bytes: the first step
    after the load replaces it with a new array, every later step updates that one."""
    buf = state.get(key)
    if buf is not None and buf.flags.writeable:
        buf *= rate
        return buf
    buf = np.multiply(buf, rate) if buf is not None else np.zeros_like(like, dtype=F32)
    state[key] = buf
    return buf


def _sgd(cfg: OptimizerConfig, p: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray],
         name: str, t: int) -> np.ndarray:
    # New arrays: the parameter only; the velocity is updated in place (``-lr*v + p`` rounds
    # exactly as ``p - lr*v``).
    new_p = np.empty_like(p, dtype=F32)
    g = _effective_grad(cfg, p, g, new_p)
    if cfg.momentum == 0:
        np.multiply(g, -F32(cfg.learning_rate), out=new_p)
        new_p += p
        return new_p
    v = _decayed(state, f"{name}.momentum", F32(cfg.momentum), p)
    v += g
    np.multiply(v, -F32(cfg.learning_rate), out=new_p)
    new_p += p
    return new_p


def _adam(cfg: OptimizerConfig, p: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray],
          name: str, t: int) -> np.ndarray:
    # New arrays: the parameter, plus one scratch array when weight decay puts the effective
    # gradient into the parameter's buffer; m and v are updated in place.
    b1, b2 = F32(cfg.beta1), F32(cfg.beta2)
    new_p = np.empty_like(p, dtype=F32)
    g = _effective_grad(cfg, p, g, new_p)  # lives in new_p with weight decay
    scratch = np.empty_like(new_p) if g is new_p else new_p
    m = _decayed(state, f"{name}.adam_m", b1, p)
    v = _decayed(state, f"{name}.adam_v", b2, p)
    np.multiply(g, F32(1) - b1, out=scratch)
    m += scratch
    np.multiply(g, g, out=scratch)
    scratch *= F32(1) - b2
    v += scratch
    # p - lr * (m / bc1) / (sqrt(v / bc2) + eps); g is no longer needed
    np.divide(v, F32(1 - cfg.beta2 ** t), out=new_p)
    np.sqrt(new_p, out=new_p)
    new_p += F32(cfg.eps)
    np.divide(m, new_p, out=new_p)
    new_p *= -F32(cfg.learning_rate) / F32(1 - cfg.beta1 ** t)
    new_p += p
    return new_p


_RULES: Mapping[str, Callable[..., np.ndarray]] = {"sgd": _sgd, "adam": _adam}


def update(cfg: OptimizerConfig, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], *,
           name: str, t: int) -> np.ndarray:
    """The new value of one parameter after one optimizer step.

    Args:
        cfg: the optimizer.
        param: the parameter, float32, any shape (``[n_local, in_k]`` or ``[n_local]``).
        grad: its gradient, float32, same shape.
        state: the layer's buffers ``{name}.{buffer}``, float32, shaped as ``param``; updated in
            place (a missing or read-only buffer is replaced by a new array; missing counts as zeros).
        name: ``"weight"`` or ``"bias"``, the buffers' prefix.
        t: the step number, ``>= 1`` (Adam's bias correction).

    Returns:
        the updated parameter, a new float32 array of the same shape.

    Memory: full-size arrays allocated per step: the new parameter, plus for Adam with weight decay
    one scratch array: at most 2. A buffer created or replaced adds one that step.
    ``param`` and ``grad`` are not modified: versioned inference reads old parameters.
    """
    return _RULES[cfg.name](cfg, param, grad, state, name, t)


def apply_gradients(cfg: OptimizerConfig, grads: Mapping[int, tuple[np.ndarray, np.ndarray]], *,
                    params: Params, opt_state: Mapping[int, Mapping[str, np.ndarray]],
                    t: int) -> tuple[Params, dict[int, dict[str, np.ndarray]]]:
    """One optimizer step of every layer in ``grads``; parameters are not modified, buffers are
    updated in place (the caller serializes this with readers of ``opt_state``).

    Args:
        cfg: the optimizer.
        grads: ``{k: (dW_rows [n_local_k, in_k], db_rows [n_local_k])}`` float32.
        params: ``{k: (W_rows, b_rows)}`` float32, shaped as ``grads[k]``, for every owned layer.
        opt_state: ``{k: {"weight.momentum": ..., ...}}`` per layer of ``params``.
        t: the step number this update makes, ``>= 1``.

    Returns:
        ``(params, opt_state)`` after the step: new dicts; new, read-only parameters; layers without a
        gradient keep their arrays.
    """
    new_params = dict(params)
    new_state = dict(opt_state)
    for k, (dw, db) in grads.items():
        w, b = params[k]
        state = dict(opt_state[k])
        w2 = update(cfg, w, dw, state, name="weight", t=t)
        b2 = update(cfg, b, db, state, name="bias", t=t)
        new_params[k] = (frozen(w2), frozen(b2))
        new_state[k] = state
    return new_params, new_state
