"""The two passes of one partition: forward and backward on its local rows.

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
- One message per (layer, peer, phase) per pass, never one per neuron; at ``P >= 8``
  layers that every partition owns use log-depth collectives instead (Bruck's all-gather and
  its mirror reduce-scatter, :mod:`.plan`): ``ceil(log2 P)`` messages per layer and phase, the
  same bytes.

Who exchanges with whom is the communication plan (:mod:`.plan`); the messages go
through a :class:`~.transport.Transport` (keys ``(pass_id, "fwd", k)`` and
``(pass_id, "bwd", k)``); the parameters a pass reads are a version of
:mod:`.versions`; updates are :mod:`.optimizers`; activations are :mod:`.activations`.

Training loss: with a softmax last layer, softmax cross-entropy on the logits,
mean over the batch. With any other last activation, ``sum((a - onehot(y))^2) /
(2 B)`` (squared error against one-hot targets, summed over units, mean over the
batch). Labels ``y`` are class indices in both cases.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from partition_server.api.manifest import ACTIVATIONS
from partition_server.engine.activations import activate, activation_derivative
from partition_server.engine.batch import validate_batch
from partition_server.engine.collectives import Collectives
from partition_server.engine.optimizers import OptimizerConfig, apply_gradients
from partition_server.engine.plan import LOG_FROM, CommunicationPlan
from partition_server.engine.transport import Transport
from partition_server.engine.versions import Params, VersionedParameters, check_params, check_state, frozen

__all__ = ["PartitionEngine", "StepResult"]

F32 = np.float32


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


class PartitionEngine(Collectives):
    """One partition's share of the network: its rows of every layer, and their optimizer state.

    Args:
        index: this partition's index.
        inputs: input features of layer 0.
        layers: per layer, an object with ``units`` (int) and ``activation`` (one of
            ``api.manifest.ACTIVATIONS``; softmax only on the last layer), e.g.
            ``manifest.LayerSpec``.
        table: lookup table (``owners``, ``ranges``, ``partitions_in_layer``, ``layer_units``,
            ``num_partitions``).
        params: ``{k: (W_rows [n_local_k, in_k], b_rows [n_local_k])}`` for exactly the layers
            where this partition owns neurons, rows concatenated in range order. Copied and
            stored as float32.
        optimizer: optimizer of the local rows.
        keep_versions: (keyword-only) how many parameter versions ``forward`` can choose from
            (the latest and the ones before it, by optimizer step).
        adopt: (keyword-only) take float32 C-contiguous ``params`` as they are, marked
            read-only, instead of copying them (the caller hands them over: one copy of the
            rows in memory, e.g. rows just generated or read from a checkpoint).
        log_from: (keyword-only) partition count from which layers that every partition owns
            use the log-depth collectives (default 8; every partition of a network must be
            given the same).

    Raises:
        ValueError: layers that disagree with the table, a bad activation, or params of the
            wrong layers or shapes; the message names the field.

    Thread safety: ``forward`` may run concurrently with anything (it reads a consistent
    snapshot of the parameters); ``train_step`` and ``load_state`` are exclusive and raise
    ``RuntimeError`` if another one is running. Parameters are replaced, never modified in
    place; optimizer buffers are updated in place by ``train_step``'s update, and ``state_tensors``
    copies them between updates (never during one), so the arrays it returns stay valid.

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
                 optimizer: OptimizerConfig | None = None, *, keep_versions: int = 4, adopt: bool = False,
                 log_from: int = LOG_FROM):
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
        self._plan = CommunicationPlan(index, inputs=self.inputs, layers=layers, table=table, log_from=log_from)
        self._plans = self._plan.layers
        self._bwd_send = self._plan.bwd_send
        self._versions = VersionedParameters(self._check_params(params, adopt), index=index, keep=keep_versions)
        self._train_lock = threading.Lock()
        # Held while the optimizer buffers change (in place) and while a checkpoint copies them:
        # only that, so a checkpoint neither waits for a step's exchanges nor looks like a step.
        self._state_lock = threading.Lock()
        self.last_grads: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.last_deltas: dict[int, np.ndarray] = {}
        self.last_output_grads: dict[int, np.ndarray] = {}
        # Called with ("forward" | "backward" | "update", seconds) after each phase, failed ones
        # too; the server's metrics set it. None: nothing is timed.
        self.phase_observer: Callable[[str, float], None] | None = None

    def _timed(self, phase: str, fn: Callable[..., Any], *args: Any) -> Any:
        if self.phase_observer is None:
            return fn(*args)
        began = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.phase_observer(phase, time.perf_counter() - began)

    # ----------------------------------------------------------------- introspection

    @property
    def num_layers(self) -> int:
        """How many layers the network has."""
        return len(self._plans)

    @property
    def owned_layers(self) -> list[int]:
        """Layers where this partition owns at least one neuron, ascending."""
        return self._plan.owned_layers()

    @property
    def optimizer_step(self) -> int:
        """Optimizer updates applied so far (Adam's ``t``); saved with checkpoints."""
        return self._versions.step

    def local_rows(self, layer: int) -> list[tuple[int, int]]:
        """This partition's half-open row ranges of ``layer``, ascending (empty if none)."""
        return list(self._plans[layer].rows)

    def messages_per_pass(self) -> dict[str, int]:
        """Messages this partition sends per pass: ``{"fwd": n, "bwd": n}`` (bwd only in training)."""
        return self._plan.messages_per_pass()

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
        return self._timed("forward", self._forward, pass_id, x, batch, params, transport, deadline)[2]

    def params_at(self, version: int | None, deadline: float) -> Params:
        """The parameters of ``version`` (None: the latest); see :meth:`forward`.

        Args:
            version: optimizer step, or None.
            deadline: ``time.monotonic()`` value until which a version ahead may be waited for.

        Returns:
            ``{k: (W_rows [n_local_k, in_k], b_rows [n_local_k])}``, read-only float32.
        Raises:
            WeightsChanged: ``version`` is no longer kept, or is ahead and no training step runs.
            TimeoutError: ``version`` is ahead and was not reached by ``deadline``.
        """
        return self._versions.at(version, deadline, owns_rows=bool(self.owned_layers),
                                 training=self._train_lock.locked)

    def train_step(self, pass_id: str, x: np.ndarray, y: np.ndarray, transport: Transport | None,
                   timeout: float = 60.0, apply: bool = True) -> StepResult:
        """One training step: forward, backward and (if ``apply``) an optimizer update of the
        local rows.

        Afterwards ``last_grads[k] = (dW_rows [n_local_k, in_k], db_rows [n_local_k])``,
        ``last_deltas[k] = dL/dz_k[:, R]`` and ``last_output_grads[k] = dL/da_k[:, R]`` (the
        sum of the partials received, inner layers only) hold for every owned layer ``k``.
        Nothing is updated if the step fails before its update; an update that fails part way
        (out of memory) may leave some optimizer buffers advanced: recover from a checkpoint.

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
            params = self._versions.params
            full, local, outputs, logits = self._timed("forward", self._forward, pass_id, x, batch, params,
                                                       transport, deadline)
            loss = correct = None
            if outputs is not None:
                loss, top = self._loss_and_top_grad(logits, outputs, y, batch)
                correct = int(np.count_nonzero(outputs.argmax(axis=1) == y))
                deltas = {len(self._plans) - 1: top}
            else:
                deltas = {}
            grads, out_grads = self._timed("backward", self._backward, pass_id, x, batch, params, full, local,
                                           deltas, transport, deadline)
            self.last_grads, self.last_deltas, self.last_output_grads = grads, deltas, out_grads
            if apply:
                self._timed("update", self._apply, grads)
            return StepResult(loss, outputs, correct)
        finally:
            self._train_lock.release()
            self._versions.wake()  # a pass waiting for this step's version stops if it failed

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
            if plan.fwd_log:
                got = self._allgather_log(transport, pass_id, plan, mine, batch, deadline)
            else:
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
            if self._plan.bwd_log[k]:
                total = self._reduce_scatter_log(transport, pass_id, prev, partial, batch, deadline)
                out_grads[k - 1] = total
                d = activation_derivative(prev.activation, local[k - 1])
                deltas[k - 1] = total * d if d is not None else total
                continue
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

    # ----------------------------------------------------------------- optimizer and state

    def _apply(self, grads: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> None:
        with self._state_lock:
            t = self._versions.step + 1
            params, opt_state, _ = self._versions.snapshot()
            new_params, new_state = apply_gradients(self.optimizer, grads, params=params, opt_state=opt_state, t=t)
            self._versions.commit(new_params, new_state, t)

    def state_tensors(self) -> dict[int, dict[str, np.ndarray]]:
        """Parameters and optimizer state per owned layer, for the checkpoint store.

        Returns:
            ``{k: {"weight": [n_local, in_k], "bias": [n_local], "weight.momentum", "bias.momentum"
            | "weight.adam_m", "weight.adam_v", "bias.adam_m", "bias.adam_v"}}``, float32, first
            dimension = local rows in range order. Buffers not yet created (before the first
            update) are returned as zeros. Arrays are read-only and never modified later.
            The step counter is ``optimizer_step``, read under the same lock.
        """
        return self.state_snapshot()[0]

    def state_snapshot(self) -> tuple[dict[int, dict[str, np.ndarray]], int]:
        """``(state_tensors(), optimizer_step)`` taken together, consistent with each other."""
        # The training step updates the optimizer buffers in place: copy them between updates.
        with self._state_lock:
            params, opt_state, step = self._versions.snapshot()
            out: dict[int, dict[str, np.ndarray]] = {}
            for k, (w, b) in params.items():
                tensors = {"weight": w, "bias": b}
                for suffix in self.optimizer.buffer_names():
                    for name, ref in (("weight", w), ("bias", b)):
                        buf = opt_state[k].get(f"{name}.{suffix}")
                        tensors[f"{name}.{suffix}"] = frozen(np.zeros_like(ref) if buf is None else buf.copy())
                out[k] = tensors
        return out, step

    def load_state(self, tensors: Mapping[int, Mapping[str, np.ndarray]], optimizer_step: int = 0, *,
                   adopt: bool = False) -> None:
        """Replace parameters and optimizer state, e.g. from a checkpoint.

        Args:
            tensors: as ``state_tensors`` returns, for exactly the owned layers. ``weight`` and
                ``bias`` are required; optimizer buffers are optional (missing ones start at
                zero); buffers of the other optimizer are ignored, unknown names rejected.
            optimizer_step: the optimizer step counter to resume from, ``>= 0``.
            adopt: take float32 C-contiguous tensors as they are (marked read-only) instead of
                copying them; the caller hands them over.

        Raises:
            ValueError: missing or extra layers, missing or unknown tensors, wrong shapes;
                the message names the layer and tensor.
            RuntimeError: a training step is running.
        """
        if not isinstance(optimizer_step, (int, np.integer)) or optimizer_step < 0:
            raise ValueError(f"optimizer_step: must be an integer >= 0 (got {optimizer_step!r})")
        params = self._check_params({k: (t.get("weight"), t.get("bias")) for k, t in tensors.items()}, adopt)
        state = check_state(tensors, params, wanted=self.optimizer.buffer_names(), adopt=adopt)
        if not self._train_lock.acquire(blocking=False):
            raise RuntimeError(f"partition {self.index}: cannot load state while a training step is running")
        try:
            self._versions.replace(params, state, int(optimizer_step))
        finally:
            self._train_lock.release()

    def _check_params(self, params: Mapping[int, tuple[Any, Any]], adopt: bool = False) -> Params:
        return check_params(params, index=self.index, shapes=self._plan.shapes(), adopt=adopt)
