"""The communication plan: who sends what to whom, per layer, computed once per lookup table.

Partition ``p`` owns the rows ``R_{k,p}`` of each layer ``k`` (the union of its ranges in the
lookup table), concatenated in range order. From the table alone it follows, for each layer,
which columns of the full activation each owner fills, who must hold the full ``a_k`` (the
owners of layer ``k+1``, or the last layer's own owners, since softmax needs the whole row),
and so whom this partition sends to and receives from in the forward all-gather and the
backward reduce-scatter: at most one message per (layer, peer, phase).

At ``P >= log_from`` (default 8), a layer that every partition owns and every partition must
hold uses a log-depth collective instead of the direct exchange: Bruck's all-gather forward
(``ceil(log2 P)`` rounds; at round ``s`` partition ``i`` sends the blocks it holds to
``i - 2^s`` and receives as many from ``i + 2^s``; for a power of two it is as deep as
recursive doubling) and its mirror image backward, a reduce-scatter that sends partial sums
to ``i + 2^s`` in reverse round order. Each partition then sends ``ceil(log2 P)`` messages per
layer and phase instead of ``P - 1``, with the same bytes; round ``s`` travels under the phase
``"fwd.s"`` or ``"bwd.s"``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["CommunicationPlan", "LOG_FROM", "LayerPlan", "bruck_rounds", "is_phase"]

LOG_FROM = 8  # partitions from which the log-depth collectives replace the direct exchange


def bruck_rounds(partitions: int) -> list[tuple[int, int]]:
    """``[(distance, blocks)]`` per round of Bruck's all-gather over ``partitions``: at round ``s``
    the distance is ``2^s`` and ``min(2^s, P - 2^s)`` blocks travel."""
    rounds, d = [], 1
    while d < partitions:
        rounds.append((d, min(d, partitions - d)))
        d *= 2
    return rounds


def is_phase(phase: str) -> bool:
    """Whether ``phase`` names a phase of an exchange: ``fwd``/``bwd`` (direct) or
    ``fwd.s``/``bwd.s`` (round ``s`` of a log-depth collective, ``0 <= s < 64``)."""
    head, dot, rnd = phase.partition(".")
    if head not in ("fwd", "bwd"):
        return False
    return not dot or (rnd.isdigit() and len(rnd) <= 2 and int(rnd) < 64 and str(int(rnd)) == rnd)


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


class LayerPlan:
    """Everything about one layer, seen from one partition, that does not change between passes.

    Args:
        index: this partition.
        k: the layer.
        units: the layer's neurons.
        fan_in: the layer's inputs.
        activation: the layer's activation name.
        table: lookup table (``ranges``, ``partitions_in_layer``).
        last: whether ``k`` is the last layer.
        log_from: partition count from which an eligible layer uses the log-depth all-gather.

    Attributes:
        rows: this partition's half-open row ranges, ascending; ``n_local`` rows in all.
        owns: whether ``n_local > 0``; ``local_sel`` selects its columns of the full ``a_k``.
        covers_all: this partition owns the whole layer.
        widths, col_sel: per owner of the layer, its row count and its columns of ``a_k``.
        need_full: this partition must hold the full ``a_k``.
        all_own: ``P >= log_from`` and every partition owns rows of this layer.
        fwd_log: the forward exchange is the log-depth all-gather (``all_own``, and every
            partition must hold ``a_k``).
        fwd_send, fwd_recv: peers of the forward all-gather of ``a_k``.
        bwd_recv: peers that send partials of ``dL/da_k`` (owners of layer ``k+1``).
    """

    def __init__(self, *, index: int, k: int, units: int, fan_in: int, activation: str, table: Any,
                 last: bool, log_from: int = LOG_FROM):
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
        every = list(range(table.num_partitions))
        # Log-depth all-gather: every partition owns rows and holds the whole layer.
        self.all_own = table.num_partitions >= max(2, log_from) and sorted(owners) == every
        self.fwd_log = self.all_own and sorted(holders) == every
        self.fwd_send = [q for q in holders if q != index] if self.owns else []
        self.fwd_recv = [q for q in owners if q != index] if self.need_full else []
        # Backward into this layer: partials of dL/da_k come from the owners of layer k+1.
        self.bwd_recv = ([q for q in table.partitions_in_layer(k + 1) if q != index]
                         if self.owns and not last else [])


class CommunicationPlan:
    """One partition's plan for every layer of the network.

    Args:
        index: this partition.
        inputs: input features of layer 0.
        layers: per layer, an object with ``units`` and ``activation``.
        table: lookup table whose ``layer_units`` match ``layers``.
        log_from: partition count from which eligible layers use the log-depth collectives.

    Attributes:
        layers: one :class:`LayerPlan` per layer.
        bwd_send: per layer ``k`` (index 0 is empty), the columns of this partition's partial
            of ``dL/da_{k-1}`` that go to each other owner of layer ``k-1``:
            ``{peer: selector}``, empty when this partition owns nothing of layer ``k``.
        bwd_log: per layer ``k`` (index 0 is False), whether the backward exchange into layer
            ``k-1`` is the log-depth reduce-scatter.
        rounds: :func:`bruck_rounds` of the table's partition count.
    """

    def __init__(self, index: int, *, inputs: int, layers: Sequence[Any], table: Any, log_from: int = LOG_FROM):
        units = [int(layer.units) for layer in layers]
        fan_ins = [int(inputs)] + units[:-1]
        last = len(layers) - 1
        self.layers = [LayerPlan(index=index, k=k, units=units[k], fan_in=fan_ins[k],
                                 activation=layers[k].activation, table=table, last=k == last,
                                 log_from=log_from)
                       for k in range(len(layers))]
        self.partitions = table.num_partitions
        self.rounds = bruck_rounds(self.partitions)
        self.bwd_send: list[dict[int, Any]] = [{}]
        # Log-depth reduce-scatter into layer k-1: every partition owns rows of k and of k-1.
        self.bwd_log: list[bool] = [False]
        for k in range(1, len(layers)):
            prev = self.layers[k - 1]
            self.bwd_send.append({q: sel for q, sel in prev.col_sel.items() if q != index}
                                 if self.layers[k].owns else {})
            self.bwd_log.append(self.layers[k].all_own and self.layers[k - 1].all_own)

    def owned_layers(self) -> list[int]:
        """Layers where this partition owns at least one neuron, ascending."""
        return [p.k for p in self.layers if p.owns]

    def shapes(self) -> dict[int, tuple[int, int]]:
        """``{k: (n_local_k, in_k)}`` for the owned layers: the shape of the local weight rows."""
        return {p.k: (p.n_local, p.fan_in) for p in self.layers if p.owns}

    def messages_per_pass(self) -> dict[str, int]:
        """Messages this partition sends per pass: ``{"fwd": n, "bwd": n}`` (bwd only in training)."""
        rounds = len(self.rounds)
        return {"fwd": sum(rounds if p.fwd_log else len(p.fwd_send) for p in self.layers),
                "bwd": sum(rounds if log else len(s) for s, log in zip(self.bwd_send, self.bwd_log))}
