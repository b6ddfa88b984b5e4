"""How a partition server reaches its peers: reused channels, one stream per peer, and the engine's
transport over gRPC.

:class:`Peers` keeps one channel per peer address and, on it, one long-lived ``ExchangeStream``
(:class:`PeerStream`) that carries every message this partition sends to that peer; it closes
both when a new lookup table no longer names the address. :class:`GrpcTransport` is the engine's
``Transport``: it queues a pass's messages on the peers' streams (no call per message, no wait
for an acknowledgement) and receives from the server's mailbox, where the peers' streams put theirs.
A streamed message is encoded by ``wire.encode_exchange`` (the protobuf bytes of an
``ExchangeRequest``, built with one copy of the tensor's raw bytes), and gRPC sends those bytes.

Authentication: a stream is signed once, when it opens (``peer_auth``: the receiving server checks
the signature, timestamp and nonce at the call's start, before reading any message); every
message it carries after that is covered by that check (and by mTLS, when the network has it).

Flow control: each stream's queue holds at most ``window_messages`` messages and
``window_bytes`` bytes (``limits.ServerLimits.peer_window_*``) not yet taken by gRPC; gRPC takes
one message at a time and HTTP/2 flow control holds it until the peer reads. A send that finds
the window full waits up to the pass's timeout, then fails with :class:`ExchangeError` naming
the peer. A queued message whose pass's timeout has passed is dropped, not sent.

Failures: a stream that ends while this server still uses it (the peer died, restarted, or
refused a message) is *broken*: the next message to that peer opens a new one, and a pass that
had already sent messages on the broken stream fails with :class:`ExchangeError` naming the peer
(:class:`~partition_server.engine.PeerLost`, ABORTED ``mpnn-error: peer-lost``: its messages may be
lost; the driver retries the pass). The receiver, seeing the stream break,
fails its own passes waiting for this partition's messages at once (``Mailbox.lost``). A peer
that does not serve ``ExchangeStream`` (UNIMPLEMENTED: an older version) or refuses a stream
beyond its limit (``mpnn-error: peer-streams``) is sent unary ``Exchange`` calls for
:data:`UNARY_FALLBACK_SECONDS`; the pass whose messages the refused stream held fails once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable, Iterable

import grpc
import numpy as np

from partition_server.api.errors import ERROR_KEY, PEER_STREAMS
from partition_server.api.lookup import LookupTable
from partition_server.api.peer_auth import PeerCredentials
from partition_server.api.protos import mpnn_pb2 as pb
from partition_server.api.protos import mpnn_pb2_grpc as pb_grpc
from partition_server.api.wire import encode_exchange, to_tensor
from partition_server.engine import ExchangeError, Mailbox, PeerLost

__all__ = ["RECONNECT_WAIT", "UNARY_FALLBACK_SECONDS", "GrpcTransport", "PeerStream", "Peers"]

RECONNECT_WAIT = 2.0  # seconds an Exchange refused UNAVAILABLE waits for its peer to (re)connect
UNARY_FALLBACK_SECONDS = 30.0  # a peer that refused a stream gets unary Exchange calls this long
STREAM_METHOD = "/mpnn.v1.Partition/ExchangeStream"
CLOSING = b""  # an empty ExchangeRequest: the last message of a stream closed on purpose
CLOSE_WAIT = 1.0  # seconds a closing stream may take to deliver what it has queued


class _Outbox:
    """The queue between the passes that send to one peer and gRPC's thread that writes the
    stream: at most ``max_messages`` messages and ``max_bytes`` bytes (one larger message alone).
    Iterating it yields the requests in order, skipping those past their deadline, until closed;
    closed with ``drain``, it ends with :data:`CLOSING`."""

    def __init__(self, max_messages: int, max_bytes: int):
        self.max_messages, self.max_bytes = max(1, max_messages), max_bytes
        self._cond = threading.Condition()
        self._items: deque[tuple[Any, int, float]] = deque()  # (request, nbytes, deadline)
        self._bytes = 0
        self._closed = False
        self._drain = False

    def put(self, request: Any, nbytes: int, timeout: float) -> bool:
        """Queue ``request`` (``nbytes`` payload), waiting up to ``timeout`` seconds for room; it is
        sent only within that time. Returns False when the outbox is closed.

        Raises:
            TimeoutError: the window stayed full for ``timeout`` seconds.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while not self._closed and self._items and (len(self._items) >= self.max_messages
                                                        or self._bytes + nbytes > self.max_bytes):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(self._items)} messages ({self._bytes} bytes) are waiting "
                                       f"to be sent, the most the window holds")
                self._cond.wait(remaining)
            if self._closed:
                return False
            self._items.append((request, nbytes, deadline))
            self._bytes += nbytes
            self._cond.notify_all()
            return True

    def close(self, *, drain: bool) -> None:
        """Stop taking messages; ``drain``: the iterator still yields those queued, else it ends now."""
        with self._cond:
            if self._closed:  # closed once already: the closing message may be on its way
                return
            self._closed, self._drain = True, drain
            if not drain:
                self._items.clear()
                self._bytes = 0
            self._cond.notify_all()

    def __iter__(self) -> "_Outbox":
        return self

    def __next__(self) -> Any:
        with self._cond:
            while True:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    if self._drain:
                        self._drain = False
                        return CLOSING  # the receiver knows the stream ended, not broke
                    raise StopIteration
                request, nbytes, deadline = self._items.popleft()
                self._bytes -= nbytes
                self._cond.notify_all()
                if time.monotonic() <= deadline:
                    return request


class PeerStream:
    """One ``ExchangeStream`` call to the peer at ``address``, fed by a bounded queue.

    Args:
        method: the signed ``ExchangeStream`` multi-callable of the peer's channel.
        address: the peer port, for errors.
        window_messages, window_bytes: the queue's bounds (see the module docstring).
    """

    def __init__(self, method: Any, address: str, *, window_messages: int, window_bytes: int):
        self.address = address
        self._outbox = _Outbox(window_messages, window_bytes)
        self._closing = False
        # No deadline: the stream lives as long as the channel. wait_for_ready: a stream opened
        # while the peer (re)connects waits for it instead of failing at once; its messages wait
        # in the queue, each at most its pass's timeout.
        self._call = method.future(self._outbox, wait_for_ready=True)
        self._call.add_done_callback(self._ended)

    def _ended(self, _call: Any) -> None:
        # gRPC's thread writing the stream waits in the queue: wake it, so that it ends too.
        self._outbox.close(drain=False)

    @property
    def ended(self) -> bool:
        """The call has ended (broken, refused, or closed by :meth:`close`)."""
        return self._call.done()

    def failure(self) -> str:
        """How the call ended (``CODE details``), or "open"."""
        if not self._call.done():
            return "open"
        code = self._call.code()
        return f"{code.name if code is not None else 'ended'} {self._call.details() or ''}".strip()

    def refused(self) -> bool:
        """The peer refused the stream itself: it does not serve ``ExchangeStream``, or it holds
        as many streams as it may (``mpnn-error: peer-streams``)."""
        if not self._call.done():
            return False
        code = self._call.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return True
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return any(k == ERROR_KEY and v == PEER_STREAMS for k, v in (self._call.trailing_metadata() or ()))
        return False

    def send(self, data: bytes, nbytes: int, timeout: float) -> bool:
        """Queue ``data`` (an encoded ``ExchangeRequest``, ``nbytes`` of payload) within ``timeout`` seconds. Returns False when the stream has ended
        (nothing was queued).

        Raises:
            TimeoutError: the window stayed full (the peer does not read).
        """
        if self._call.done():
            return False
        return self._outbox.put(data, nbytes, timeout)

    def close(self, wait: float = 0.0) -> None:
        """Send what is queued, end the stream, and wait up to ``wait`` seconds for the peer's reply."""
        self._closing = True
        self._outbox.close(drain=True)
        if wait > 0:
            try:
                self._call.result(timeout=wait)
            except (grpc.RpcError, grpc.FutureTimeoutError, grpc.FutureCancelledError):
                pass


class Peers:
    """One channel per peer address, reused across calls, and one :class:`PeerStream` on it;
    :meth:`retain` closes the ones a new lookup table no longer names. Every call is signed with
    ``credentials`` (``peer_auth``).

    Args:
        window_messages, window_bytes: each stream's queue bounds (``ServerLimits.peer_window_*``).

    Attributes:
        streams_opened: streams opened so far (a broken one reopened counts again).
    """

    def __init__(self, credentials: PeerCredentials, *, window_messages: int = 64, window_bytes: int = 64 << 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.credentials = credentials
        self.window_messages, self.window_bytes = window_messages, window_bytes
        self._peers: dict[str, tuple[grpc.Channel, pb_grpc.PartitionStub]] = {}
        self._streams: dict[str, PeerStream] = {}
        self._unary_until: dict[str, float] = {}
        self._clock = clock
        self._lock = threading.Lock()
        self.streams_opened = 0

    def _stub(self, address: str) -> pb_grpc.PartitionStub:
        if address not in self._peers:
            channel = self.credentials.channel(address)
            self._peers[address] = (channel, pb_grpc.PartitionStub(channel))
        return self._peers[address][1]

    def channel(self, address: str) -> grpc.Channel:
        """The signed channel to ``address``, opening it once (a closed one is opened again)."""
        with self._lock:
            self._stub(address)
            return self._peers[address][0]

    def stub(self, address: str) -> pb_grpc.PartitionStub:
        """The ``mpnn.v1.Partition`` stub for ``address`` (``host:port``), opening its channel once."""
        with self._lock:
            return self._stub(address)

    def stream(self, address: str) -> PeerStream | None:
        """The open stream to ``address``, opening one when there is none or it has ended; None
        while that peer is sent unary ``Exchange`` calls instead (it refused a stream)."""
        with self._lock:
            until = self._unary_until.get(address)
            if until is not None:
                if self._clock() < until:
                    return None
                del self._unary_until[address]
            stream = self._streams.get(address)
            if stream is not None and stream.ended:
                del self._streams[address]
                if stream.refused():
                    self._unary_until[address] = self._clock() + UNARY_FALLBACK_SECONDS
                    return None
                stream = None
            if stream is None:
                self._stub(address)
                # Messages arrive encoded (wire.encode_exchange: one copy of the tensor's bytes).
                method = self._peers[address][0].stream_unary(STREAM_METHOD, request_serializer=None,
                                                              response_deserializer=pb.ExchangeReply.FromString)
                stream = PeerStream(method, address,
                                    window_messages=self.window_messages, window_bytes=self.window_bytes)
                self._streams[address] = stream
                self.streams_opened += 1
            return stream

    def streams_open(self) -> int:
        """Streams open now (not ended)."""
        with self._lock:
            return sum(not s.ended for s in self._streams.values())

    def addresses(self) -> list[str]:
        """Addresses with an open channel."""
        with self._lock:
            return list(self._peers)

    def retain(self, addresses: Iterable[str]) -> list[str]:
        """Close the streams and channels to every address not in ``addresses``; returns those addresses.

        A pass still running under the previous table loses its calls to them (its partitions
        no longer serve that table anyway).
        """
        keep = set(addresses)
        with self._lock:
            gone = [a for a in self._peers if a not in keep]
            streams = [self._streams.pop(a) for a in gone if a in self._streams]
            channels = [self._peers.pop(a)[0] for a in gone]
            for a in gone:
                self._unary_until.pop(a, None)
        self._close(streams, channels, wait=0.0)
        return gone

    def close(self) -> None:
        """End every stream (delivering what is queued, briefly) and close every channel."""
        with self._lock:
            streams = list(self._streams.values())
            channels = [channel for channel, _ in self._peers.values()]
            self._streams.clear()
            self._peers.clear()
        self._close(streams, channels, wait=CLOSE_WAIT)

    @staticmethod
    def _close(streams: list[PeerStream], channels: list[grpc.Channel], wait: float) -> None:
        for stream in streams:
            stream.close()
        deadline = time.monotonic() + wait
        for stream in streams:
            stream.close(wait=max(0.0, deadline - time.monotonic()))
        for channel in channels:
            channel.close()


class GrpcTransport:
    """The engine's transport over gRPC for one pass under one lookup table.

    Args:
        index: this partition's index (the messages' ``source``).
        table: the lookup table the pass runs under (peer addresses, its version).
        peers: the channels and streams to the peers.
        mailbox: where the peers' messages to this partition arrive.
        count_sent: called with the payload bytes of every message sent, and keywords ``peer``
            (its index) and ``phase`` (traffic counters).
    """

    def __init__(self, *, index: int, table: LookupTable, peers: Peers, mailbox: Mailbox,
                 count_sent: Callable[..., None]):
        self.index = index
        self.table = table
        self.peers = peers
        self.mailbox = mailbox
        self.count_sent = count_sent
        self._used: dict[int, PeerStream] = {}  # peer -> the stream that carried this pass's messages

    def exchange(self, key: tuple, outgoing: dict[int, np.ndarray], expect, timeout: float) -> dict[int, np.ndarray]:
        """Send ``outgoing`` (peer → float32 array) under ``key`` ``(pass_id, phase, layer)``, then
        take the messages of the peers in ``expect`` from the mailbox.

        Raises:
            ExchangeError: a peer's stream broke after carrying this pass's messages, its window
                stayed full for ``timeout`` seconds, a unary ``Exchange`` call failed, or a peer's
                stream to this partition broke while this pass waited for it; the message names
                the peer.
            TimeoutError: an expected message did not arrive within ``timeout`` seconds.
        """
        pass_id, phase, layer = key
        calls = []
        for peer, arr in outgoing.items():
            address = self.table.addresses[peer]
            data, nbytes = encode_exchange(lookup_version=self.table.version, pass_id=pass_id, phase=phase,
                                           layer=layer, source=self.index, array=arr)
            if not self._stream_send(key, peer, address, data, nbytes, timeout):
                request = pb.ExchangeRequest(lookup_version=self.table.version, pass_id=pass_id, phase=phase,
                                             layer=layer, source=self.index, tensor=to_tensor(arr))
                stub = self.peers.stub(address)
                calls.append((peer, request, stub.Exchange.future(request, timeout=timeout)))
            self.count_sent(nbytes, peer=peer, phase=phase)
        for peer, request, call in calls:
            self._await_unary(key, peer, request, call, timeout)
        return self.mailbox.take_many(key, expect, timeout)

    def _stream_send(self, key: tuple, peer: int, address: str, data: bytes, nbytes: int, timeout: float) -> bool:
        """Queue the encoded message ``data`` on the stream to ``peer``; False when that peer gets
        unary calls."""
        for _ in range(2):  # a stream found ended is replaced once, if it carried nothing of this pass
            stream = self.peers.stream(address)
            if stream is None:
                return False
            used = self._used.get(peer)
            if used is not None and used is not stream:
                raise PeerLost(f"partition {self.index}: the stream to partition {peer} ({address}) that "
                               f"carried earlier messages of pass {key[0]!r} ended ({used.failure()}); "
                               f"they may be lost", peer)
            try:
                if stream.send(data, nbytes, timeout):
                    self._used[peer] = stream
                    return True
            except TimeoutError as exc:
                raise ExchangeError(f"partition {self.index}: sending {key!r} to partition {peer} ({address}): "
                                    f"{exc} for {timeout:g} s (the peer does not read)") from exc
        raise PeerLost(f"partition {self.index}: sending {key!r} to partition {peer} ({address}) failed: "
                       f"its stream ended ({stream.failure()})", peer)

    def _await_unary(self, key: tuple, peer: int, request: pb.ExchangeRequest, call: Any, timeout: float) -> None:
        try:
            try:
                call.result()
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                # A peer that restarted moments ago: this channel may still wait out its reconnect
                # backoff (at most a second). Once more, waiting for the connection, briefly.
                stub = self.peers.stub(self.table.addresses[peer])
                stub.Exchange(request, timeout=min(timeout, RECONNECT_WAIT), wait_for_ready=True)
        except grpc.RpcError as exc:
            raise ExchangeError(f"partition {self.index}: sending {key!r} to partition {peer} "
                                f"({self.table.addresses[peer]}) failed: {exc.code().name} {exc.details()}") from exc
