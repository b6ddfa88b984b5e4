"""The per-partition execution engine: forward, backward and optimizer on local rows.

One network of dense layers ``k = 0..L-1`` (``W_k`` is ``[units_k, in_k]``,
PyTorch ``nn.Linear`` layout) is split by neuron: partition ``p`` owns the rows
``R_{k,p}`` of each layer (the union of its ranges in the lookup table) and
keeps ``W_k[R]``, ``b_k[R]`` and their optimizer state, rows concatenated in
range order. Every other neuron is remote and is reached through the lookup
table, as in "Multi Part Deployment of Neural Network" (arXiv 2506.01387); the
split of both passes into per-layer collective exchanges follows the fully
distributed training of "F2D2N: Fully Distributed Deep Neural Network"
(Leite et al., 2024). ``DESIGN.md``, "Execution engine", is the contract:

- Forward, per layer: owners compute their rows of ``z_k = a_{k-1} W_k^T + b_k``
  for the whole batch, then all-gather, so every owner of layer ``k+1`` holds the
  full ``a_k``. The last layer gathers its logits among its own owners, since
  softmax needs the whole row.
- Backward, per layer ``k >= 1``: owners form ``dW = δ_k[:, R]^T a_{k-1}``,
  ``db = Σ_batch δ_k[:, R]`` and the partial ``δ_k[:, R] W_k[R]``; the partials are
  reduce-scattered to the owners of layer ``k-1``, which multiply by
  ``act'(z_{k-1})``.
- One message per (layer, peer, phase) per pass, never one per neuron.

The engine is transport-agnostic: it calls ``Transport.exchange`` with keys
``(pass_id, "fwd", k)`` (the carried tensor is ``a_k``, or the logits ``z_k`` of
the last layer) and ``(pass_id, "bwd", k)`` (the carried tensor is a partial of
``dL/da_k``, sent by owners of layer ``k+1``). ``LocalTransport`` runs partitions
as threads of one process, for tests and benchmarks.

Training loss: with a softmax last layer, softmax cross-entropy on the logits,
mean over the batch. With any other last activation, ``sum((a - onehot(y))^2) /
(2 B)`` (squared error against one-hot targets, summed over units, mean over the
batch). Labels ``y`` are class indices in both cases.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol, Sequence

import numpy as np

from partition_server.engine.mailbox import Mailbox

__all__ = [
    "ACTIVATIONS",
    "ExchangeError",
    "LocalTransport",
    "OptimizerConfig",
    "PartitionEngine",
    "StepResult",
    "Transport",
    "WEIGHTS_CHANGED",
    "WeightsChanged",
    "activate",
    "activation_derivative",
    "validate_batch",
]

ACTIVATIONS = ("relu", "sigmoid", "tanh", "identity", "softmax")
F32 = np.float32


class Transport(Protocol):
    """How an engine reaches its peers."""

    def exchange(self, key: tuple, outgoing: dict[int, np.ndarray], expect: Iterable[int],
                 timeout: float) -> dict[int, np.ndarray]:
        """Send ``outgoing[peer]`` to each peer (concurrently), then wait for one array from
        each partition in ``expect`` under the same ``key``.

        Raises:
            TimeoutError: the deadline passed; the message names the missing peers.
        """
        ...


class ExchangeError(RuntimeError):
    """A peer's message does not fit: wrong shape or dtype (e.g. partitions were given
    batches of different sizes), or the transport returned an incomplete set."""


WEIGHTS_CHANGED = "weights changed during the pass; retry"


class WeightsChanged(RuntimeError):
    """A forward pass asked for a parameter version this partition cannot provide: it is no
    longer kept, or it is ahead of this partition and no training step is running that would
    reach it. The message contains ``WEIGHTS_CHANGED``; a new pass (with a newer version) may
    succeed."""


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
        if self.name not in ("sgd", "adam"):
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


@dataclass
class StepResult:
    """What one training step reports.

    Attributes:
        loss: mean loss over the batch, on owners of last-layer neurons, else None.
        outputs: ``[batch, units_last]`` float32 network outputs (post-activation), or None.
        correct: how many argmax(outputs) equal ``y``, or None.
    """

    loss: float | None
    outputs: np.ndarray | None
    correct: int | None


def activate(name: str, z: np.ndarray) -> np.ndarray:
    """Apply activation ``name`` to ``z`` (``[batch, units]`` float32); softmax is row-wise.

    Raises:
        ValueError: unknown activation.
    """
    if name == "relu":
        return np.maximum(z, F32(0))
    if name == "sigmoid":
        # tanh form: no overflow for large |z|, unlike 1 / (1 + exp(-z)).
        return (F32(0.5) * (F32(1) + np.tanh(F32(0.5) * z))).astype(F32, copy=False)
    if name == "tanh":
        return np.tanh(z)
    if name == "identity":
        return z
    if name == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    raise ValueError(f"activation: unknown {name!r}, expected one of {ACTIVATIONS}")


def activation_derivative(name: str, a: np.ndarray) -> np.ndarray | None:
    """``act'(z)`` elementwise, written in terms of the output ``a = act(z)``.

    Returns None for identity (derivative 1). Softmax has no elementwise derivative and is
    handled through the loss.

    Raises:
        ValueError: softmax or an unknown activation.
    """
    if name == "relu":
        return (a > 0).astype(F32)
    if name == "sigmoid":
        return a * (F32(1) - a)
    if name == "tanh":
        return F32(1) - a * a
    if name == "identity":
        return None
    raise ValueError(f"activation: no elementwise derivative for {name!r}")


def validate_batch(inputs: int, classes: int, x: Any, y: Any = None) -> int:
    """Check a batch before any work or traffic.

    Args:
        inputs: features per example.
        classes: units of the last layer; labels must be in ``[0, classes)``.
        x: ``[batch, inputs]`` float32 ndarray.
        y: ``[batch]`` int64 ndarray of class indices, or None (inference).

    Returns:
        the batch size.
    Raises:
        ValueError: naming the field (``x`` or ``y``), the expected and the actual shape/dtype.
    """
    if not isinstance(x, np.ndarray):
        raise ValueError(f"x: expected a float32 ndarray of shape [batch, {inputs}], got {type(x).__name__}")
    if x.dtype != F32 or x.ndim != 2 or x.shape[1] != inputs or x.shape[0] < 1:
        raise ValueError(f"x: expected float32 of shape [batch>=1, {inputs}], "
                         f"got {x.dtype} of shape {list(x.shape)}")
    batch = x.shape[0]
    if y is None:
        return batch
    if not isinstance(y, np.ndarray):
        raise ValueError(f"y: expected an int64 ndarray of shape [{batch}], got {type(y).__name__}")
    if y.dtype != np.int64 or y.shape != (batch,):
        raise ValueError(f"y: expected int64 of shape [{batch}], got {y.dtype} of shape {list(y.shape)}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"y: labels must be in [0, {classes}), got {bad}")
    return batch


def _selector(ranges: Sequence[tuple[int, int]]) -> slice | np.ndarray:
    """Column selector for the concatenation of ``ranges``: a slice when contiguous (views, no
    copy), else an index array."""
    merged: list[list[int]] = []
    for start, end in ranges:
        if merged and merged[-1][1] == start:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    if len(merged) == 1:
        return slice(merged[0][0], merged[0][1])
    return np.concatenate([np.arange(s, e, dtype=np.intp) for s, e in merged])


def _width(ranges: Sequence[tuple[int, int]]) -> int:
    return sum(e - s for s, e in ranges)


class _LayerPlan:
    """Everything about one layer that does not change between steps, computed once."""

    def __init__(self, index: int, k: int, units: int, fan_in: int, activation: str, table: Any,
                 last: bool):
        self.k = k
        self.units = units
        self.fan_in = fan_in
        self.activation = activation
        self.rows = [(r.start, r.end) for r in table.ranges(k, index)]
        self.n_local = _width(self.rows)
        self.owns = self.n_local > 0
        self.local_sel = _selector(self.rows) if self.owns else None
        self.covers_all = self.owns and self.n_local == units
        owners = table.partitions_in_layer(k)
        self.widths = {q: _width([(r.start, r.end) for r in table.ranges(k, q)]) for q in owners}
        self.col_sel = {q: _selector([(r.start, r.end) for r in table.ranges(k, q)]) for q in owners}
        # Who must hold the full output of this layer: the owners of the next layer, or, for
        # the last layer, its own owners (softmax and the loss need the whole row).
        holders = owners if last else table.partitions_in_layer(k + 1)
        self.need_full = index in holders
        self.fwd_send = [q for q in holders if q != index] if self.owns else []
        self.fwd_recv = [q for q in owners if q != index] if self.need_full else []
        # Backward into this layer: partials of dL/da_k come from the owners of layer k+1.
        self.bwd_recv = ([q for q in table.partitions_in_layer(k + 1) if q != index]
                         if self.owns and not last else [])


class PartitionEngine:
    """One partition's share of the network: its rows of every layer, and their optimizer state.

    Args:
        index: this partition's index.
        inputs: input features of layer 0.
        layers: per layer, an object with ``units`` (int) and ``activation`` (one of
            ``ACTIVATIONS``; softmax only on the last layer), e.g. ``manifest.LayerSpec``.
        table: lookup table (``owners``, ``ranges``, ``partitions_in_layer``, ``layer_units``,
            ``num_partitions``).
        params: ``{k: (W_rows [n_local_k, in_k], b_rows [n_local_k])}`` for exactly the layers
            where this partition owns neurons, rows concatenated in range order. Copied and
            stored as float32.
        optimizer: optimizer of the local rows.
        keep_versions: how many parameter versions ``forward`` can choose from (the latest
            and the ones before it, by optimizer step).

    Raises:
        ValueError: layers that disagree with the table, a bad activation, or params of the
            wrong layers or shapes; the message names the field.

    Thread safety: ``forward`` may run concurrently with anything (it reads a consistent
    snapshot of the parameters); ``train_step`` and ``load_state`` are exclusive and raise
    ``RuntimeError`` if another one is running. Parameters and optimizer buffers are
    replaced, never modified in place, so arrays returned by ``state_tensors`` stay valid.

    Versions: the parameters after ``n`` optimizer updates are version ``n``
    (``optimizer_step``). Every partition counts every training step, including steps where
    it owns nothing to update, and a checkpoint restores the counter, so one number names
    the same update on every partition. A forward pass that overlaps a training step names
    the version its entry point saw, and every partition computes with that version (the
    last ``keep_versions`` are kept: old arrays are referenced, not copied), so the pass
    never mixes rows from before and after an update.
    """

    def __init__(self, index: int, inputs: int, layers: Sequence[Any], table: Any,
                 params: Mapping[int, tuple[np.ndarray, np.ndarray]],
                 optimizer: OptimizerConfig | None = None, keep_versions: int = 4):
        if keep_versions < 1:
            raise ValueError(f"keep_versions: must be >= 1 (got {keep_versions!r})")
        if not isinstance(inputs, (int, np.integer)) or inputs < 1:
            raise ValueError(f"inputs: must be a positive integer (got {inputs!r})")
        if not layers:
            raise ValueError("layers: at least one layer is required")
        units = [int(layer.units) for layer in layers]
        if list(table.layer_units) != units:
            raise ValueError(f"layers: units {units} differ from the lookup table's {list(table.layer_units)}")
        if not 0 <= index < table.num_partitions:
            raise ValueError(f"index: {index} is not a partition of the table (0..{table.num_partitions - 1})")
        for k, layer in enumerate(layers):
            if layer.activation not in ACTIVATIONS:
                raise ValueError(f"layers[{k}].activation: unknown {layer.activation!r}, expected one of {ACTIVATIONS}")
            if layer.activation == "softmax" and k != len(layers) - 1:
                raise ValueError(f"layers[{k}].activation: softmax is allowed on the last layer only")
        self.index = index
        self.inputs = int(inputs)
        self.layers = list(layers)
        self.table = table
        self.optimizer = optimizer or OptimizerConfig()
        fan_ins = [self.inputs] + units[:-1]
        last = len(layers) - 1
        self._plans = [_LayerPlan(index, k, units[k], fan_ins[k], layers[k].activation, table, k == last)
                       for k in range(len(layers))]
        # Backward send plan of layer k (k >= 1): this partition's partial of dL/da_{k-1},
        # split by the owners of layer k-1.
        self._bwd_send: list[dict[int, Any]] = [{}]
        for k in range(1, len(layers)):
            prev = self._plans[k - 1]
            self._bwd_send.append({q: sel for q, sel in prev.col_sel.items() if q != index}
                                  if self._plans[k].owns else {})
        self._params = self._check_params(params)
        self._opt_state = {k: {} for k in self._params}
        self._step = 0
        self._keep = keep_versions
        self._versions: OrderedDict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = OrderedDict({0: self._params})
        self._train_lock = threading.Lock()
        self._state_lock = threading.RLock()
        self._state_changed = threading.Condition(self._state_lock)
        self.last_grads: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.last_deltas: dict[int, np.ndarray] = {}
        self.last_output_grads: dict[int, np.ndarray] = {}

    # ----------------------------------------------------------------- introspection

    @property
    def num_layers(self) -> int:
        return len(self._plans)

    @property
    def owned_layers(self) -> list[int]:
        """Layers where this partition owns at least one neuron, ascending."""
        return [p.k for p in self._plans if p.owns]

    @property
    def optimizer_step(self) -> int:
        """Optimizer updates applied so far (Adam's ``t``); saved with checkpoints."""
        return self._step

    def local_rows(self, layer: int) -> list[tuple[int, int]]:
        """This partition's half-open row ranges of ``layer``, ascending (empty if none)."""
        return list(self._plans[layer].rows)

    def messages_per_pass(self) -> dict[str, int]:
        """Messages this partition sends per pass: ``{"fwd": n, "bwd": n}`` (bwd only in training)."""
        return {"fwd": sum(len(p.fwd_send) for p in self._plans),
                "bwd": sum(len(s) for s in self._bwd_send)}

    # ----------------------------------------------------------------- passes

    def forward(self, pass_id: str, x: np.ndarray, transport: Transport | None,
                timeout: float = 60.0, version: int | None = None) -> np.ndarray | None:
        """Inference: the network's outputs for ``x``; keeps no state.

        Args:
            pass_id: unique id of this pass, shared by all partitions (message keys).
            x: ``[batch, inputs]`` float32.
            transport: reaches the peers; may be None when this partition exchanges nothing.
            timeout: seconds for the whole pass.
            version: compute with the parameters after this many optimizer steps (all
                partitions of a pass must be given the same); None: the latest. A version
                this partition has not reached yet is waited for while a training step runs.

        Returns:
            ``[batch, units_last]`` float32 post-activation outputs on owners of last-layer
            neurons, else None.
        Raises:
            ValueError: bad ``x`` (before any traffic).
            WeightsChanged: ``version`` is no longer kept, or is ahead and no training step
                is running (before any traffic).
            TimeoutError: a peer's message, or ``version``, did not arrive in time.
            ExchangeError: a peer's message has the wrong shape or dtype.
        """
        batch = validate_batch(self.inputs, self._plans[-1].units, x)
        deadline = time.monotonic() + timeout
        params = self.params_at(version, deadline)
        return self._forward(pass_id, x, batch, params, transport, deadline)[2]

    def params_at(self, version: int | None, deadline: float) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """The parameters of ``version`` (None: the latest); see :meth:`forward`.

        Args:
            deadline: ``time.monotonic()`` value until which a version ahead may be waited for.
        """
        with self._state_changed:
            if version is None or not self.owned_layers:  # owning nothing, no version matters
                return self._params
            while True:
                params = self._versions.get(version)
                if params is not None:
                    return params
                if version <= self._step:
                    raise WeightsChanged(f"partition {self.index}: {WEIGHTS_CHANGED} (the pass computes with "
                                         f"optimizer step {version}; this partition is at step {self._step} "
                                         f"and keeps steps {min(self._versions)}..{self._step})")
                if not self._train_lock.locked():
                    raise WeightsChanged(f"partition {self.index}: {WEIGHTS_CHANGED} (the pass computes with "
                                         f"optimizer step {version}; this partition is at step {self._step} "
                                         f"and no training step is running)")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"partition {self.index}: optimizer step {version} was not applied "
                                       f"in time (this partition is at step {self._step})")
                self._state_changed.wait(min(remaining, 60.0))

    def train_step(self, pass_id: str, x: np.ndarray, y: np.ndarray, transport: Transport | None,
                   timeout: float = 60.0, apply: bool = True) -> StepResult:
        """One training step: forward, backward and (if ``apply``) an optimizer update of the
        local rows.

        Afterwards ``last_grads[k] = (dW_rows [n_local_k, in_k], db_rows [n_local_k])``,
        ``last_deltas[k] = dL/dz_k[:, R]`` and ``last_output_grads[k] = dL/da_k[:, R]`` (the
        sum of the partials received, inner layers only) hold for every owned layer ``k``.
        Nothing is updated if the step fails.

        Args:
            pass_id: unique id of this step, shared by all partitions (message keys).
            x: ``[batch, inputs]`` float32.
            y: ``[batch]`` int64 class indices in ``[0, units_last)``.
            transport: reaches the peers; may be None when this partition exchanges nothing.
            timeout: seconds for the whole step.
            apply: False computes gradients only.

        Returns:
            loss, outputs and correct count on owners of last-layer neurons; Nones elsewhere.
        Raises:
            ValueError: bad ``x`` or ``y`` (before any traffic).
            TimeoutError: a peer's message did not arrive in time.
            ExchangeError: a peer's message has the wrong shape or dtype.
            RuntimeError: another training step or ``load_state`` is running on this engine.
        """
        batch = validate_batch(self.inputs, self._plans[-1].units, x, y)
        if not self._train_lock.acquire(blocking=False):
            raise RuntimeError(f"partition {self.index}: another training step is running")
        try:
            deadline = time.monotonic() + timeout
            params = self._params
            full, local, outputs, logits = self._forward(pass_id, x, batch, params, transport, deadline)
            loss = correct = None
            if outputs is not None:
                loss, top = self._loss_and_top_grad(logits, outputs, y, batch)
                correct = int(np.count_nonzero(outputs.argmax(axis=1) == y))
                deltas = {len(self._plans) - 1: top}
            else:
                deltas = {}
            grads, out_grads = self._backward(pass_id, x, batch, params, full, local, deltas,
                                              transport, deadline)
            self.last_grads, self.last_deltas, self.last_output_grads = grads, deltas, out_grads
            if apply:
                self._apply(grads)
            return StepResult(loss, outputs, correct)
        finally:
            self._train_lock.release()
            with self._state_changed:  # a pass waiting for this step's version stops if it failed
                self._state_changed.notify_all()

    def _forward(self, pass_id, x, batch, params, transport, deadline):
        """Returns (full a_k per layer held, local a_k per owned layer, outputs, logits); the
        last two are None off the last layer's owners."""
        full: dict[int, np.ndarray] = {-1: x}
        local: dict[int, np.ndarray] = {}
        outputs = logits = None
        last = len(self._plans) - 1
        for plan in self._plans:
            k = plan.k
            mine = None
            if plan.owns:
                w, b = params[k]
                z = full[k - 1] @ w.T
                z += b
                # The last layer travels as logits: softmax needs the whole row.
                mine = z if k == last else activate(plan.activation, z)
            got = self._exchange(transport, (pass_id, "fwd", k),
                                 {q: mine for q in plan.fwd_send}, plan.fwd_recv,
                                 {q: (batch, plan.widths[q]) for q in plan.fwd_recv}, deadline)
            if not plan.need_full:
                if mine is not None:
                    local[k] = mine
                continue
            if plan.covers_all:
                whole = mine
            else:
                whole = np.empty((batch, plan.units), dtype=F32)
                for q, part in got.items():
                    whole[:, plan.col_sel[q]] = part
                if plan.owns:
                    whole[:, plan.local_sel] = mine
            if k == last:
                logits = whole
                outputs = activate(plan.activation, whole)
                whole = outputs
                if plan.owns:
                    mine = outputs[:, plan.local_sel]
            full[k] = whole
            if mine is not None:
                local[k] = mine
        return full, local, outputs, logits

    def _loss_and_top_grad(self, logits, outputs, y, batch):
        """Loss and dL/dz of the last layer restricted to the local rows."""
        plan = self._plans[-1]
        rows = np.arange(batch)
        if plan.activation == "softmax":
            shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
            log_norm = np.log(np.exp(shifted).sum(axis=1))
            loss = float((log_norm - shifted[rows, y]).mean())
            grad = outputs.copy()
            grad[rows, y] -= F32(1)
        else:
            diff = outputs.copy()
            diff[rows, y] -= F32(1)
            loss = float(np.square(diff, dtype=np.float64).sum() / (2 * batch))
            grad = diff
        local = grad[:, plan.local_sel] / F32(batch)
        if plan.activation != "softmax":
            d = activation_derivative(plan.activation, outputs[:, plan.local_sel])
            if d is not None:
                local *= d
        return loss, np.ascontiguousarray(local, dtype=F32)

    def _backward(self, pass_id, x, batch, params, full, local, deltas, transport, deadline):
        grads: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        out_grads: dict[int, np.ndarray] = {}
        for k in range(len(self._plans) - 1, -1, -1):
            plan = self._plans[k]
            partial = None
            if plan.owns:
                delta = deltas[k]
                grads[k] = (delta.T @ full[k - 1], delta.sum(axis=0))
                if k > 0:
                    partial = delta @ params[k][0]
            if k == 0:
                break
            prev = self._plans[k - 1]
            outgoing = {q: partial[:, sel] for q, sel in self._bwd_send[k].items()}
            got = self._exchange(transport, (pass_id, "bwd", k - 1), outgoing, prev.bwd_recv,
                                 {q: (batch, prev.n_local) for q in prev.bwd_recv}, deadline)
            if not prev.owns:
                continue
            parts = dict(got)
            if partial is not None:
                parts[self.index] = partial[:, prev.local_sel]
            # Ascending partition order, so the sum does not depend on arrival order.
            order = sorted(parts)
            total = np.array(parts[order[0]], dtype=F32, copy=True)
            for q in order[1:]:
                total += parts[q]
            out_grads[k - 1] = total
            d = activation_derivative(prev.activation, local[k - 1])
            deltas[k - 1] = total * d if d is not None else total
        return grads, out_grads

    def _exchange(self, transport, key, outgoing, expect, shapes, deadline):
        if not outgoing and not expect:
            return {}
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"partition {self.index}: step {key[0]!r} ran out of time before "
                               f"exchange {key!r}")
        if transport is None:
            raise ExchangeError(f"partition {self.index}: exchange {key!r} needs a transport")
        got = transport.exchange(key, outgoing, expect, remaining)
        missing = [q for q in expect if q not in got]
        if missing:
            raise ExchangeError(f"partition {self.index}: transport returned no message for {key!r} "
                                f"from partition(s) {missing}")
        for q in expect:
            arr = got[q]
            if arr.dtype != F32 or arr.shape != shapes[q]:
                raise ExchangeError(f"partition {self.index}: message {key!r} from partition {q} is "
                                    f"{arr.dtype} {list(arr.shape)}, expected float32 {list(shapes[q])}")
        return got

    # ----------------------------------------------------------------- optimizer and state

    def _apply(self, grads: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> None:
        cfg = self.optimizer
        t = self._step + 1
        new_params = dict(self._params)
        new_state = dict(self._opt_state)
        for k, (dw, db) in grads.items():
            w, b = self._params[k]
            state = dict(self._opt_state[k])
            w2 = _update(cfg, w, dw, state, "weight", t)
            b2 = _update(cfg, b, db, state, "bias", t)
            for arr in state.values():
                arr.flags.writeable = False
            new_params[k] = (_frozen(w2), _frozen(b2))
            new_state[k] = state
        with self._state_changed:
            self._params, self._opt_state, self._step = new_params, new_state, t
            self._versions[t] = new_params
            while len(self._versions) > self._keep:
                self._versions.popitem(last=False)
            self._state_changed.notify_all()

    def state_tensors(self) -> dict[int, dict[str, np.ndarray]]:
        """Parameters and optimizer state per owned layer, for the checkpoint store.

        Returns:
            ``{k: {"weight": [n_local, in_k], "bias": [n_local], "weight.momentum", "bias.momentum"
            | "weight.adam_m", "weight.adam_v", "bias.adam_m", "bias.adam_v"}}``, float32, first
            dimension = local rows in range order. Buffers not yet created (before the first
            update) are returned as zeros. Arrays are read-only and never modified later.
            The step counter is ``optimizer_step``, read under the same lock.
        """
        with self._state_lock:
            params, opt_state = self._params, self._opt_state
        out: dict[int, dict[str, np.ndarray]] = {}
        for k, (w, b) in params.items():
            tensors = {"weight": w, "bias": b}
            for suffix in self.optimizer.buffer_names():
                for name, ref in (("weight", w), ("bias", b)):
                    key = f"{name}.{suffix}"
                    tensors[key] = opt_state[k].get(key, _frozen(np.zeros_like(ref)))
            out[k] = tensors
        return out

    def state_snapshot(self) -> tuple[dict[int, dict[str, np.ndarray]], int]:
        """``(state_tensors(), optimizer_step)`` taken together, consistent with each other."""
        with self._state_lock:
            step = self._step
            tensors = self.state_tensors()
        return tensors, step

    def load_state(self, tensors: Mapping[int, Mapping[str, np.ndarray]], optimizer_step: int = 0) -> None:
        """Replace parameters and optimizer state, e.g. from a checkpoint.

        Args:
            tensors: as ``state_tensors`` returns, for exactly the owned layers. ``weight`` and
                ``bias`` are required; optimizer buffers are optional (missing ones start at
                zero); buffers of the other optimizer are ignored, unknown names rejected.
            optimizer_step: the optimizer step counter to resume from, ``>= 0``.

        Raises:
            ValueError: missing or extra layers, missing or unknown tensors, wrong shapes;
                the message names the layer and tensor.
            RuntimeError: a training step is running.
        """
        if not isinstance(optimizer_step, (int, np.integer)) or optimizer_step < 0:
            raise ValueError(f"optimizer_step: must be an integer >= 0 (got {optimizer_step!r})")
        known = {f"{n}.{s}" for n in ("weight", "bias") for s in ("momentum", "adam_m", "adam_v")}
        wanted = set(self.optimizer.buffer_names())
        params = self._check_params({k: (t.get("weight"), t.get("bias")) for k, t in tensors.items()})
        state: dict[int, dict[str, np.ndarray]] = {}
        for k, named in tensors.items():
            state[k] = {}
            for name, arr in named.items():
                if name in ("weight", "bias"):
                    continue
                if name not in known:
                    raise ValueError(f"state[{k}].{name}: unknown tensor")
                if name.split(".", 1)[1] not in wanted:
                    continue
                ref = params[k][0] if name.startswith("weight") else params[k][1]
                arr = np.asarray(arr)
                if arr.shape != ref.shape:
                    raise ValueError(f"state[{k}].{name}: expected shape {list(ref.shape)}, got {list(arr.shape)}")
                state[k][name] = _frozen(np.array(arr, dtype=F32, copy=True))
        if not self._train_lock.acquire(blocking=False):
            raise RuntimeError(f"partition {self.index}: cannot load state while a training step is running")
        try:
            with self._state_changed:
                self._params, self._opt_state, self._step = params, state, int(optimizer_step)
                self._versions = OrderedDict({self._step: params})
                self._state_changed.notify_all()
        finally:
            self._train_lock.release()

    def _check_params(self, params: Mapping[int, tuple[Any, Any]]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        owned = set(self.owned_layers)
        extra = sorted(set(params) - owned)
        if extra:
            raise ValueError(f"params: partition {self.index} owns no neurons of layer(s) {extra}")
        missing = sorted(owned - set(params))
        if missing:
            raise ValueError(f"params: missing layer(s) {missing} owned by partition {self.index}")
        out = {}
        for k in sorted(params):
            plan = self._plans[k]
            w, b = params[k]
            for name, arr, shape in (("weight", w, (plan.n_local, plan.fan_in)), ("bias", b, (plan.n_local,))):
                if arr is None:
                    raise ValueError(f"params[{k}].{name}: missing")
                arr = np.asarray(arr)
                if arr.shape != shape or not np.issubdtype(arr.dtype, np.floating):
                    raise ValueError(f"params[{k}].{name}: expected float32 of shape {list(shape)}, "
                                     f"got {arr.dtype} of shape {list(arr.shape)}")
            out[k] = (_frozen(np.array(w, dtype=F32, copy=True)), _frozen(np.array(b, dtype=F32, copy=True)))
        return out


def _frozen(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


def _update(cfg: OptimizerConfig, p: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray],
            name: str, t: int) -> np.ndarray:
    """New value of parameter ``p`` after one step with gradient ``g``; updates ``state`` entries
    ``{name}.{buffer}`` with new arrays."""
    if cfg.weight_decay:
        g = g + F32(cfg.weight_decay) * p
    lr = F32(cfg.learning_rate)
    if cfg.name == "sgd":
        if cfg.momentum == 0:
            return p - lr * g
        key = f"{name}.momentum"
        v = g if key not in state else F32(cfg.momentum) * state[key] + g
        v = np.array(v, dtype=F32, copy=True)
        state[key] = v
        return p - lr * v
    mk, vk = f"{name}.adam_m", f"{name}.adam_v"
    b1, b2 = F32(cfg.beta1), F32(cfg.beta2)
    m = (F32(1) - b1) * g if mk not in state else b1 * state[mk] + (F32(1) - b1) * g
    v = (F32(1) - b2) * (g * g) if vk not in state else b2 * state[vk] + (F32(1) - b2) * (g * g)
    state[mk], state[vk] = m, v
    m_hat = m / F32(1 - cfg.beta1 ** t)
    v_hat = v / F32(1 - cfg.beta2 ** t)
    return p - lr * m_hat / (np.sqrt(v_hat) + F32(cfg.eps))


class LocalTransport:
    """In-process transport: partitions are threads sharing one ``Mailbox`` per partition.

    Build a connected set with ``LocalTransport.group(n)``; give ``group[i]`` to partition
    ``i``'s engine. Sent arrays are copied (C-contiguous), as a wire would, so a receiver never
    aliases a sender's buffer. Counts what it sends.

    Attributes:
        index: the partition this transport sends from.
        mailboxes: ``{partition: Mailbox}`` shared by the group.
        messages_sent: messages sent so far.
        bytes_sent: payload bytes sent so far.
        sent_by: ``Counter`` of messages keyed by ``key[1:]`` (e.g. ``("fwd", 2)``).
    """

    def __init__(self, index: int, mailboxes: Mapping[int, Mailbox]):
        self.index = index
        self.mailboxes = mailboxes
        self.messages_sent = 0
        self.bytes_sent = 0
        self.sent_by: Counter = Counter()
        self._lock = threading.Lock()

    @classmethod
    def group(cls, n: int) -> list["LocalTransport"]:
        """``n`` transports, index 0..n-1, over a fresh shared set of mailboxes."""
        boxes = {i: Mailbox() for i in range(n)}
        return [cls(i, boxes) for i in range(n)]

    def exchange(self, key: tuple, outgoing: dict[int, np.ndarray], expect: Iterable[int],
                 timeout: float) -> dict[int, np.ndarray]:
        """See ``Transport.exchange``.

        Raises:
            ValueError: a peer that is this partition or not in the group.
            TimeoutError: naming ``key`` and the missing peers.
        """
        for peer, arr in outgoing.items():
            if peer == self.index or peer not in self.mailboxes:
                raise ValueError(f"peer: cannot send to partition {peer} from partition {self.index}")
            copy = np.array(arr, copy=True, order="C")
            self.mailboxes[peer].put(key, self.index, copy)
            with self._lock:
                self.messages_sent += 1
                self.bytes_sent += copy.nbytes
                self.sent_by[key[1:]] += 1
        return self.mailboxes[self.index].take_many(key, expect, timeout)

    def discard(self, pass_id: Any) -> int:
        """Drop this partition's leftovers of an aborted step (see ``Mailbox.discard``)."""
        return self.mailboxes[self.index].discard(pass_id)

    def reset_counters(self) -> None:
        with self._lock:
            self.messages_sent = self.bytes_sent = 0
            self.sent_by = Counter()
