"""The communication plan: who sends what to whom, per layer, computed once per lookup table.

Partition ``p`` owns the rows ``R_{k,p}`` of each layer ``k`` (the union of its ranges in the
lookup table), concatenated in range order. From the table alone it follows, for each layer,
which columns of the full activation each owner fills, who must hold the full ``a_k`` (the
owners of layer ``k+1``, or the last layer's own owners, since softmax needs the whole row),
and so whom this partition sends to and receives from in the forward all-gather and the
backward reduce-scatter: at most one message per (layer, peer, phase).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["CommunicationPlan", "LayerPlan"]


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

    Attributes:
        rows: this partition's half-open row ranges, ascending; ``n_local`` rows in all.
        owns: whether ``n_local > 0``; ``local_sel`` selects its columns of the full ``a_k``.
        covers_all: this partition owns the whole layer.
        widths, col_sel: per owner of the layer, its row count and its columns of ``a_k``.
        need_full: this partition must hold the full ``a_k``.
        fwd_send, fwd_recv: peers of the forward all-gather of ``a_k``.
        bwd_recv: peers that send partials of ``dL/da_k`` (owners of layer ``k+1``).
    """

    def __init__(self, *, index: int, k: int, units: int, fan_in: int, activation: str, table: Any,
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


class CommunicationPlan:
    """One partition's plan for every layer of the network.

    Args:
        index: this partition.
        inputs: input features of layer 0.
        layers: per layer, an object with ``units`` and ``activation``.
        table: lookup table whose ``layer_units`` match ``layers``.

    Attributes:
        layers: one :class:`LayerPlan` per layer.
        bwd_send: per layer ``k`` (index 0 is empty), the columns of this partition's partial
            of ``dL/da_{k-1}`` that go to each other owner of layer ``k-1``:
            ``{peer: selector}``, empty when this partition owns nothing of layer ``k``.
    """

    def __init__(self, index: int, *, inputs: int, layers: Sequence[Any], table: Any):
        units = [int(layer.units) for layer in layers]
        fan_ins = [int(inputs)] + units[:-1]
        last = len(layers) - 1
        self.layers = [LayerPlan(index=index, k=k, units=units[k], fan_in=fan_ins[k],
                                 activation=layers[k].activation, table=table, last=k == last)
                       for k in range(len(layers))]
        self.bwd_send: list[dict[int, Any]] = [{}]
        for k in range(1, len(layers)):
            prev = self.layers[k - 1]
            self.bwd_send.append({q: sel for q, sel in prev.col_sel.items() if q != index}
                                 if self.layers[k].owns else {})

    def owned_layers(self) -> list[int]:
        """Layers where this partition owns at least one neuron, ascending."""
        return [p.k for p in self.layers if p.owns]

    def shapes(self) -> dict[int, tuple[int, int]]:
        """``{k: (n_local_k, in_k)}`` for the owned layers: the shape of the local weight rows."""
        return {p.k: (p.n_local, p.fan_in) for p in self.layers if p.owns}

    def messages_per_pass(self) -> dict[str, int]:
        """Messages this partition sends per pass: ``{"fwd": n, "bwd": n}`` (bwd only in training)."""
        return {"fwd": sum(len(p.fwd_send) for p in self.layers),
                "bwd": sum(len(s) for s in self.bwd_send)}
