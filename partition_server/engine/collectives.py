"""The engine's exchanges: one checked message exchange, and the log-depth collectives built on it.

:class:`Collectives` holds ``_exchange`` (send this partition's messages of one key, receive the
expected ones, check their dtype and shape), Bruck's all-gather (``_allgather_log``) and its mirror,
the reduce-scatter (``_reduce_scatter_log``); :class:`~partition_server.engine.passes.PartitionEngine`
inherits them, and they use its ``index`` and communication plan.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from partition_server.engine.transport import ExchangeError

__all__ = ["Collectives"]

F32 = np.float32


class Collectives:
    """Exchanges and collectives of one partition's engine (mixed into ``PartitionEngine``)."""

    def _allgather_log(self, transport, pass_id, plan, mine, batch, deadline):
        """Bruck's all-gather of layer ``plan.k``: ``{partition: its block of a_k}`` for every
        other partition, in ``ceil(log2 P)`` rounds. Block offset ``o`` is partition
        ``(index + o) mod P``; after round ``s`` the offsets ``0 .. 2^(s+1)-1`` are held."""
        P, i = self._plan.partitions, self.index
        held = [mine]  # by offset
        for s, (d, n) in enumerate(self._plan.rounds):
            src, dst = (i + d) % P, (i - d) % P
            widths = [plan.widths[(src + o) % P] for o in range(n)]
            out = held[0] if n == 1 else np.concatenate(held[:n], axis=1)
            got = self._exchange(transport, (pass_id, f"fwd.{s}", plan.k), {dst: out}, [src],
                                 {src: (batch, sum(widths))}, deadline)[src]
            held.extend(_split_columns(got, widths))
        return {(i + o) % P: block for o, block in enumerate(held) if o}

    def _reduce_scatter_log(self, transport, pass_id, prev, partial, batch, deadline):
        """The mirror of :meth:`_allgather_log` for ``dL/da_{k-1}`` (``prev`` is layer ``k-1``):
        this partition's columns of the sum of every partition's ``partial``, in
        ``ceil(log2 P)`` rounds, partial sums travelling to ``index + 2^s`` in reverse round
        order. The order of the additions is fixed by the rounds, not by arrival."""
        P, i = self._plan.partitions, self.index
        acc = [np.array(partial[:, prev.col_sel[(i + o) % P]], dtype=F32, order="C") for o in range(P)]
        for s in range(len(self._plan.rounds) - 1, -1, -1):
            d, n = self._plan.rounds[s]
            src, dst = (i - d) % P, (i + d) % P
            widths = [prev.widths[(i + o) % P] for o in range(n)]
            out = acc[d] if n == 1 else np.concatenate(acc[d:d + n], axis=1)
            got = self._exchange(transport, (pass_id, f"bwd.{s}", prev.k), {dst: out}, [src],
                                 {src: (batch, sum(widths))}, deadline)[src]
            for o, piece in enumerate(_split_columns(got, widths)):
                acc[o] += piece
        return acc[0]

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


def _split_columns(arr: np.ndarray, widths: Sequence[int]) -> list[np.ndarray]:
    """``arr`` cut into consecutive column blocks of ``widths`` (views)."""
    out, at = [], 0
    for w in widths:
        out.append(arr[:, at:at + w])
        at += w
    return out
