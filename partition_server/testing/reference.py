"""The single-process numpy reference: the whole network on whole matrices.

The distributed engine (``engine.PartitionEngine``) must reproduce this to float32
rounding for every assignment (``DESIGN.md``, "Execution engine"). It is written
independently of the engine on purpose: plain full-matrix forward, backward and
optimizer, so tests compare two implementations rather than one with itself.
Its loss and optimizer conventions are those documented in ``engine.passes`` and
``engine.optimizers``.

The initial weights are the engine's (``engine.init_params``, re-exported here): the
deterministic global initialisation every partition slices its own rows from without
coordination (``slice_params``); ``gather_rows`` puts the rows back together.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from partition_server.engine import OptimizerConfig, StepResult, init_params, validate_batch

__all__ = ["ReferenceNetwork", "gather_rows", "init_params", "slice_params"]

F32 = np.float32


def slice_params(params: Sequence[tuple[np.ndarray, np.ndarray]], table: Any,
                 partition: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """One partition's rows of global parameters, as ``PartitionEngine`` takes them.

    Args:
        params: ``[(W_k [units_k, in_k], b_k [units_k])]``.
        table: lookup table (``ranges(layer, partition)``).
        partition: the partition index.

    Returns:
        ``{k: (W_k[R] [n_local, in_k], b_k[R] [n_local])}`` for the layers where ``partition``
        owns neurons, rows concatenated in range order (copies).
    """
    out = {}
    for k, (w, b) in enumerate(params):
        ranges = table.ranges(k, partition)
        if ranges:
            out[k] = (np.concatenate([w[r.start:r.end] for r in ranges]),
                      np.concatenate([b[r.start:r.end] for r in ranges]))
    return out


def gather_rows(table: Any, layer: int, parts: Mapping[int, np.ndarray]) -> np.ndarray:
    """Inverse of ``slice_params`` for one layer and one tensor: put each partition's local rows
    back at their global positions.

    Args:
        table: lookup table.
        layer: layer index.
        parts: ``{partition: rows [n_local, ...]}`` for every owner of ``layer``.

    Returns:
        ``[units, ...]`` array of the parts' dtype.
    Raises:
        ValueError: an owner of the layer is missing from ``parts`` or its row count is wrong.
    """
    owners = table.partitions_in_layer(layer)
    missing = [p for p in owners if p not in parts]
    if missing:
        raise ValueError(f"parts: no rows for partition(s) {missing} of layer {layer}")
    sample = parts[owners[0]]
    out = np.empty((table.layer_units[layer],) + sample.shape[1:], dtype=sample.dtype)
    for p in owners:
        ranges = table.ranges(layer, p)
        rows = parts[p]
        if rows.shape[0] != sum(r.end - r.start for r in ranges):
            raise ValueError(f"parts[{p}]: {rows.shape[0]} rows, partition owns "
                             f"{sum(r.end - r.start for r in ranges)} of layer {layer}")
        at = 0
        for r in ranges:
            out[r.start:r.end] = rows[at:at + r.end - r.start]
            at += r.end - r.start
    return out


def _act(name: str, z: np.ndarray) -> np.ndarray:
    if name == "relu":
        return np.where(z > 0, z, F32(0))
    if name == "sigmoid":
        with np.errstate(over="ignore"):
            return (F32(1) / (F32(1) + np.exp(-z))).astype(F32)
    if name == "tanh":
        return np.tanh(z)
    if name == "identity":
        return z.copy()
    if name == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    raise ValueError(f"activation: unknown {name!r}")


def _act_grad(name: str, z: np.ndarray) -> np.ndarray:
    """d act / dz written in terms of z."""
    if name == "relu":
        return (z > 0).astype(F32)
    if name == "sigmoid":
        s = _act("sigmoid", z)
        return s * (F32(1) - s)
    if name == "tanh":
        t = np.tanh(z)
        return F32(1) - t * t
    if name == "identity":
        return np.ones_like(z)
    raise ValueError(f"activation: no elementwise derivative for {name!r}")


class ReferenceNetwork:
    """The whole network in one process.

    Args:
        inputs: features of layer 0.
        layers: objects with ``units`` and ``activation`` (softmax only last).
        params: ``[(W_k [units_k, in_k], b_k [units_k])]``; copied as float32.
        optimizer: as for ``PartitionEngine``.

    Raises:
        ValueError: params of the wrong shapes, softmax before the last layer.
    """

    def __init__(self, inputs: int, layers: Sequence[Any], params: Sequence[tuple[np.ndarray, np.ndarray]],
                 optimizer: OptimizerConfig | None = None):
        self.inputs = int(inputs)
        self.layers = list(layers)
        self.optimizer = optimizer or OptimizerConfig()
        if len(params) != len(self.layers):
            raise ValueError(f"params: {len(params)} layers given, the network has {len(self.layers)}")
        fan_in = self.inputs
        self.params: list[tuple[np.ndarray, np.ndarray]] = []
        for k, (layer, (w, b)) in enumerate(zip(self.layers, params)):
            if layer.activation == "softmax" and k != len(self.layers) - 1:
                raise ValueError(f"layers[{k}].activation: softmax is allowed on the last layer only")
            if np.shape(w) != (layer.units, fan_in) or np.shape(b) != (layer.units,):
                raise ValueError(f"params[{k}]: expected [{layer.units}, {fan_in}] and [{layer.units}], "
                                 f"got {list(np.shape(w))} and {list(np.shape(b))}")
            self.params.append((np.array(w, dtype=F32), np.array(b, dtype=F32)))
            fan_in = layer.units
        self.state: list[dict[str, np.ndarray]] = [{} for _ in self.layers]
        self.optimizer_step = 0
        self.last_grads: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.last_deltas: dict[int, np.ndarray] = {}

    def _run(self, x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        zs, acts = [], [x]
        for layer, (w, b) in zip(self.layers, self.params):
            z = acts[-1] @ w.T + b
            zs.append(z)
            acts.append(_act(layer.activation, z))
        return zs, acts

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Outputs ``[batch, units_last]`` float32 (post-activation) for ``x`` ``[batch, inputs]`` float32.

        Raises:
            ValueError: bad ``x``.
        """
        validate_batch(self.inputs, self.layers[-1].units, x)
        return self._run(x)[1][-1]

    def train_step(self, x: np.ndarray, y: np.ndarray, apply: bool = True) -> StepResult:
        """Forward, backward and (if ``apply``) one optimizer update of every parameter.

        Afterwards ``last_grads[k] = (dW_k [units_k, in_k], db_k [units_k])`` and
        ``last_deltas[k] = dL/dz_k [batch, units_k]``.

        Raises:
            ValueError: bad ``x`` or ``y``.
        """
        batch = validate_batch(self.inputs, self.layers[-1].units, x, y)
        zs, acts = self._run(x)
        out = acts[-1]
        onehot = np.zeros_like(out)
        onehot[np.arange(batch), y] = 1
        last = self.layers[-1].activation
        if last == "softmax":
            z = zs[-1].astype(np.float64)
            z = z - z.max(axis=1, keepdims=True)
            log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            loss = float(-(log_probs * onehot).sum() / batch)
            delta = (out - onehot) / F32(batch)
        else:
            loss = float(((out.astype(np.float64) - onehot) ** 2).sum() / (2 * batch))
            delta = (out - onehot) / F32(batch) * _act_grad(last, zs[-1])
        grads: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        deltas: dict[int, np.ndarray] = {}
        for k in range(len(self.layers) - 1, -1, -1):
            deltas[k] = delta
            grads[k] = (delta.T @ acts[k], delta.sum(axis=0))
            if k > 0:
                delta = (delta @ self.params[k][0]) * _act_grad(self.layers[k - 1].activation, zs[k - 1])
        self.last_grads, self.last_deltas = grads, deltas
        if apply:
            self._apply(grads)
        correct = int((out.argmax(axis=1) == y).sum())
        return StepResult(loss, out, correct)

    def _apply(self, grads: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> None:
        cfg = self.optimizer
        self.optimizer_step += 1
        t = self.optimizer_step
        for k, (dw, db) in grads.items():
            new = []
            for name, p, g in (("weight", *(self.params[k][0], dw)), ("bias", *(self.params[k][1], db))):
                g = g + F32(cfg.weight_decay) * p if cfg.weight_decay else g
                st = self.state[k]
                if cfg.name == "sgd" and cfg.momentum == 0:
                    p = p - F32(cfg.learning_rate) * g
                elif cfg.name == "sgd":
                    v = st.get(f"{name}.momentum", np.zeros_like(p))
                    v = F32(cfg.momentum) * v + g
                    st[f"{name}.momentum"] = v
                    p = p - F32(cfg.learning_rate) * v
                else:
                    m = st.get(f"{name}.adam_m", np.zeros_like(p))
                    v = st.get(f"{name}.adam_v", np.zeros_like(p))
                    m = F32(cfg.beta1) * m + F32(1 - cfg.beta1) * g
                    v = F32(cfg.beta2) * v + F32(1 - cfg.beta2) * g * g
                    st[f"{name}.adam_m"], st[f"{name}.adam_v"] = m, v
                    m_hat = m / F32(1 - cfg.beta1 ** t)
                    v_hat = v / F32(1 - cfg.beta2 ** t)
                    p = p - F32(cfg.learning_rate) * m_hat / (np.sqrt(v_hat) + F32(cfg.eps))
                new.append(p.astype(F32, copy=False))
            self.params[k] = (new[0], new[1])
