"""How an engine reaches its peers: the ``Transport`` protocol and the error a bad message raises.

The engine is transport-agnostic. It calls ``Transport.exchange`` with keys
``(pass_id, "fwd", k)`` (the carried tensor is ``a_k``, or the logits ``z_k`` of the last
layer) and ``(pass_id, "bwd", k)`` (the carried tensor is a partial of ``dL/da_k``, sent by
owners of layer ``k+1``): one message per (layer, peer, phase) per pass. The log-depth
collectives (``P >= 8``, :mod:`.plan`) send one message per round instead, under the phases
``"fwd.s"`` and ``"bwd.s"`` (round ``s``), a block of several partitions' columns each. The partition server
implements it over gRPC; ``partition_server.testing.LocalTransport`` runs partitions as threads
of one process.
"""

from __future__ import annotations

from typing import Iterable, Protocol

import numpy as np

__all__ = ["ExchangeError", "Transport"]


class Transport(Protocol):
    """How an engine reaches its peers."""

    def exchange(self, key: tuple, outgoing: dict[int, np.ndarray], expect: Iterable[int],
                 timeout: float) -> dict[int, np.ndarray]:
        """Send ``outgoing[peer]`` to each peer (concurrently), then wait for one array from
        each partition in ``expect`` under the same ``key``.

        Args:
            key: ``(pass_id, phase, layer)``.
            outgoing: ``{peer: [batch, width] float32}``.
            expect: the partitions to receive from.
            timeout: seconds.

        Returns:
            ``{partition: array}`` for the partitions in ``expect``.
        Raises:
            TimeoutError: the deadline passed; the message names the missing peers.
        """
        ...


class ExchangeError(RuntimeError):
    """A peer's message does not fit: wrong shape or dtype (e.g. partitions were given
    batches of different sizes), or the transport returned an incomplete set."""
