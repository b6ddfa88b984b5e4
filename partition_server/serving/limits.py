"""How a partition server divides its gRPC thread pool between passes, peer streams and everything else.

Every RPC runs on one pool of ``workers`` threads, and a ``RunPass`` holds its thread for the
whole pass, waiting for the ``Exchange`` calls of its peers, which need threads of the same
pool. So inference passes are bounded below the pool size (:func:`pass_slots`): one beyond the
bound is refused at once (RESOURCE_EXHAUSTED) instead of waiting, and the threads left always
serve ``Exchange`` (and Status, health, Checkpoint and the inference API's own calls). Training
passes are not counted: an engine runs one at a time, and one thread is reserved for it.

Peer streams (``ExchangeStream``, one per sending peer) each hold a thread for their whole life,
so they get threads of their own: the pool is ``workers + stream limit`` threads, the stream
limit (:func:`peer_streams`, or ``ServerLimits.max_peer_streams``) bounds the streams open at
once (one beyond is refused RESOURCE_EXHAUSTED before any message is read, and its sender falls
back to unary ``Exchange`` calls), and the ``workers`` threads are divided as above.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, fields
from typing import Any, Mapping

__all__ = ["ByteBudget", "ServerLimits", "default_workers", "max_infer_calls", "pass_slots", "peer_streams"]


def max_infer_calls(workers: int) -> int:
    """``ModelInfer`` calls a partition's gRPC port handles at once (each waits for a whole pass):
    a quarter of ``workers``, at least 1."""
    return max(1, workers // 4)


def pass_slots(workers: int) -> int:
    """Inference ``RunPass`` calls a partition with ``workers`` pool threads runs at once.

    The pool also holds the inference API's ``ModelInfer`` calls (:func:`max_infer_calls`), one
    training pass, and a reserve (``max(2, workers // 8)``) for Exchange, Status and health.
    At least 1.
    """
    return max(1, workers - max_infer_calls(workers) - 1 - max(2, workers // 8))


def default_workers(partitions: int) -> int:
    """Pool size for ``partitions`` partitions: at least 32, and enough that every entry point
    plus one outside client can have a forward pass running at once (``pass_slots >= P + 1``)."""
    workers = 32
    while pass_slots(workers) < partitions + 1:
        workers += 8
    return workers


MIN_PEER_STREAMS = 32  # room to scale up to 17 partitions without restarting a server


def peer_streams(partitions: int) -> int:
    """Inbound peer streams a partition of ``partitions`` holds at once by default: two per peer
    (a sender that reopens a broken stream may do so before this server has seen the old one
    end), at least :data:`MIN_PEER_STREAMS`, because the limit and the threads behind it are
    fixed when the server starts while a scale-up adds peers to a running server (the pool
    starts its threads only when streams need them)."""
    return max(MIN_PEER_STREAMS, 2 * (partitions - 1))


# ---------------------------------------------------------------- what a caller can hold

MiB = 1 << 20


@dataclass(frozen=True)
class ServerLimits:
    """Every resource a caller of a partition server can hold, bounded by the server whatever the
    request asks. Each field can be set by an environment variable (:meth:`from_env`).

    Attributes:
        max_request_bytes: largest public request: a REST body as sent and after decompression,
            and a ``ModelInfer`` message (``MPNN_MAX_REQUEST_BYTES``, default 64 MiB). Peer
            messages (``mpnn.v1.Partition``) may be larger (``channels.MAX_MESSAGE_BYTES``).
        max_inflight_request_bytes: REST request bytes held at once by all requests together,
            as sent plus inflated; a request beyond it is answered 503 at once
            (``MPNN_MAX_INFLIGHT_REQUEST_BYTES``, default 128 MiB; at least ``max_request_bytes``).
        max_pass_seconds: longest a ``RunPass`` runs (and waits for its peers' messages),
            whatever deadline the caller sent (``MPNN_MAX_PASS_SECONDS``, default 120 s).
        training_lease_seconds: a training session with no training pass for this long may be
            replaced by a new one (``MPNN_TRAINING_LEASE_SECONDS``, default 30 s).
        mailbox_peer_bytes, mailbox_peer_entries: tensors one peer may have waiting in this
            partition's mailbox, for passes running here (``MPNN_MAILBOX_PEER_BYTES``, default
            512 MiB; ``MPNN_MAILBOX_PEER_ENTRIES``, default 4096).
        mailbox_early_bytes, mailbox_early_entries: of those, for passes not (yet) running here:
            a peer's message may arrive before this partition's own ``RunPass`` of the pass
            (``MPNN_MAILBOX_EARLY_BYTES``, default 64 MiB; ``MPNN_MAILBOX_EARLY_ENTRIES``, default 64).
        mailbox_early_seconds: how long such a message waits for its pass to start here before
            it is dropped (``MPNN_MAILBOX_EARLY_SECONDS``, default 30 s).
        max_peer_streams: inbound ``ExchangeStream`` calls open at once, each holding a pool
            thread (``MPNN_MAX_PEER_STREAMS``; default 0: :func:`peer_streams` of the lookup
            table's partitions when the server starts).
        peer_window_messages, peer_window_bytes: this server's own messages to one peer queued
            on its stream and not yet handed to gRPC (``MPNN_PEER_WINDOW_MESSAGES``, default 64;
            ``MPNN_PEER_WINDOW_BYTES``, default 64 MiB; one larger message is queued alone). With
            HTTP/2 flow control (gRPC's window, a few MiB at most) they bound what a slow peer
            makes a sender hold; a pass whose message finds the window full for its whole
            timeout fails.
    """

    max_request_bytes: int = 64 * MiB
    max_inflight_request_bytes: int = 128 * MiB
    max_pass_seconds: float = 120.0
    training_lease_seconds: float = 30.0
    mailbox_peer_bytes: int = 512 * MiB
    mailbox_peer_entries: int = 4096
    mailbox_early_bytes: int = 64 * MiB
    mailbox_early_entries: int = 64
    mailbox_early_seconds: float = 30.0
    max_peer_streams: int = 0
    peer_window_messages: int = 64
    peer_window_bytes: int = 64 * MiB

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
                    or value == float("inf"):
                raise ValueError(f"{f.name}: must be a finite number >= 0, got {value!r}")
        if self.max_inflight_request_bytes < self.max_request_bytes:
            raise ValueError(f"max_inflight_request_bytes ({self.max_inflight_request_bytes}) must be at least "
                             f"max_request_bytes ({self.max_request_bytes})")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "ServerLimits":
        """The defaults, overridden by ``MPNN_<FIELD>`` variables (upper case, e.g. ``MPNN_MAX_PASS_SECONDS``).

        Raises:
            ValueError: a variable that is not a number, naming it and its value.
        """
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = f"MPNN_{f.name.upper()}"
            if var in environ:
                kind = int if f.type in ("int", int) else float
                try:
                    values[f.name] = kind(environ[var])
                except ValueError:
                    raise ValueError(f"{var}: must be {'an integer' if kind is int else 'a number'}, "
                                     f"got {environ[var]!r}") from None
        return cls(**values)


class ByteBudget:
    """A count of bytes held by requests in flight, at most ``capacity``: a request takes what it
    needs before holding it (:meth:`take`, never waiting) and gives it back when done. Thread-safe.

    Args:
        capacity: bytes, >= 0.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """Bytes taken and not given back."""
        return self._held

    def take(self, nbytes: int) -> bool:
        """Take ``nbytes`` if they fit; returns whether they were taken."""
        with self._lock:
            if nbytes < 0 or self._held + nbytes > self.capacity:
                return False
            self._held += nbytes
            return True

    def give(self, nbytes: int) -> None:
        """Give back ``nbytes`` taken before."""
        with self._lock:
            self._held = max(0, self._held - nbytes)
