"""The receiving side of the peers' exchanges: ``Exchange`` and ``ExchangeStream`` of ``mpnn.v1.Partition``.

:class:`ExchangeHandlers` validates every peer message (lookup version, phase, source, layer,
tensor) and puts it in the server's mailbox, where the engine's transport (``peers``) takes it;
:class:`~partition_server.serving.server.PartitionServer` inherits the handlers, and they work on
its state (``index``, ``model``, ``limits``, ``mailbox``, the loaded partition and the inbound
stream counters).
"""

from __future__ import annotations

import grpc
import numpy as np

from partition_server.api.protos import mpnn_pb2 as pb
from partition_server.api.wire import from_tensor
from partition_server.engine import MailboxFull, is_phase
from partition_server.serving import reasons

__all__ = ["ExchangeHandlers"]


class _Refused(Exception):
    """A peer message refused with ``code`` and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class ExchangeHandlers:
    """The peer-message RPCs of ``mpnn.v1.Partition``, mixed into the partition server."""

    def _check_exchange(self, request: pb.ExchangeRequest) -> tuple[tuple, np.ndarray]:
        """Validate one peer message: ``(key, array)``, or :class:`_Refused` naming the field."""
        loaded = self._loaded
        if loaded is None:
            raise _Refused(grpc.StatusCode.UNAVAILABLE, f"partition {self.index}: no model loaded")
        if request.lookup_version != loaded.table.version:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION,
                           f"partition {self.index}: lookup version {request.lookup_version or '(none)'} does "
                           f"not match the served {loaded.table.version}")
        if not is_phase(request.phase):
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"phase must be fwd or bwd, got {request.phase!r} (fwd.N and bwd.N name round N "
                           f"of a log-depth collective)")
        partitions, layers = loaded.table.num_partitions, len(self.model.layers)
        if not 0 <= request.source < partitions or request.source == self.index:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"source must be a peer partition 0..{partitions - 1} "
                                                             f"other than {self.index}, got {request.source}")
        if not 0 <= request.layer < layers:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"layer must be 0..{layers - 1}, got {request.layer}")
        try:
            arr = from_tensor(request.tensor, "tensor", "float32")
        except ValueError as exc:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        return (request.pass_id, request.phase, request.layer), arr

    def _deliver(self, request: pb.ExchangeRequest) -> None:
        """Validate ``request`` and put it in the mailbox. Raises :class:`_Refused`."""
        key, arr = self._check_exchange(request)
        # The server's own bound, not the caller's deadline: a pass running here ends by
        # max_pass_seconds; the mailbox keeps a message for a pass not running here far shorter.
        ttl = 2 * self.limits.max_pass_seconds + 10.0
        try:
            self.mailbox.put(key, request.source, arr, ttl)
        except ValueError as exc:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except MailboxFull as exc:
            raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"partition {self.index}: {exc}") from None

    def Exchange(self, request: pb.ExchangeRequest, context: grpc.ServicerContext) -> pb.ExchangeReply:
        try:
            self._deliver(request)
        except _Refused as exc:
            context.abort(exc.code, exc.message)
        return pb.ExchangeReply()

    def ExchangeStream(self, request_iterator, context: grpc.ServicerContext) -> pb.ExchangeReply:
        """Every message of one sending peer, as they come (see ``peers``): each is validated and
        put in the mailbox as :meth:`Exchange` does; the first refused one ends the stream with its
        status; the sender ends it with an empty message (a stream ending without one broke). A
        stream that breaks (its sender died or cancelled it) or is refused a message
        marks the sender's messages to passes here as lost (``Mailbox.lost``), so those passes
        fail at once. Holds one pool thread while open; beyond ``peer_stream_limit`` streams,
        RESOURCE_EXHAUSTED (``mpnn-error: peer-streams``) before any message is read."""
        with self._streams_lock:
            if self.peer_streams_open >= self.peer_stream_limit:
                refuse = True
            else:
                refuse = False
                self.peer_streams_open += 1
                self.peer_streams_opened += 1
                self._inbound.add(context)
        if refuse:
            reasons.abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"partition {self.index}: {self.peer_stream_limit} peer streams are open, the most it "
                          f"holds (max_peer_streams); send unary Exchange calls", reason=reasons.PEER_STREAMS)
        source: int | None = None
        closed = False  # the sender ended the stream with the closing (empty) message
        try:
            for request in request_iterator:
                if request.ByteSize() == 0:
                    closed = True
                    break
                if source is not None and request.source != source:
                    refused = _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"source: a stream carries one partition's messages; it began with "
                                       f"{source}, got {request.source}")
                else:
                    try:
                        self._deliver(request)
                        refused = None
                    except _Refused as exc:
                        refused = exc
                if source is None and 0 <= request.source != self.index:
                    source = request.source
                if refused is not None:
                    if source is not None:
                        self.mailbox.lost(source, f"its stream to partition {self.index} was refused a message: "
                                                  f"{refused.code.name} {refused.message}")
                    context.abort(refused.code, refused.message)
        except grpc.RpcError:
            pass  # the sender cancelled, or its connection broke
        finally:
            with self._streams_lock:
                self.peer_streams_open -= 1
                self._inbound.discard(context)
        # Without the closing message the stream broke (a cancelled call may also just end the
        # iterator): what the sender had in flight may be lost.
        if not closed and source is not None:
            self.mailbox.lost(source, f"its stream to partition {self.index} broke")
        return pb.ExchangeReply()
