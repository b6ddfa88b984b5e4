"""How a partition server reaches its peers: reused channels, and the engine's transport over gRPC.

:class:`Peers` keeps one channel per peer address and closes those a new lookup table no longer
names. :class:`GrpcTransport` is the engine's ``Transport``: it sends a pass's messages with one
``Exchange`` call per (layer, peer, phase) and receives from the server's mailbox, where the
peers' ``Exchange`` calls put theirs.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable

import grpc
import numpy as np

from partition_server.api.lookup import LookupTable
from partition_server.api.peer_auth import PeerCredentials
from partition_server.api.protos import mpnn_pb2 as pb
from partition_server.api.protos import mpnn_pb2_grpc as pb_grpc
from partition_server.api.wire import to_tensor
from partition_server.engine import ExchangeError, Mailbox

__all__ = ["RECONNECT_WAIT", "GrpcTransport", "Peers"]

RECONNECT_WAIT = 2.0  # seconds an Exchange refused UNAVAILABLE waits for its peer to (re)connect


class Peers:
    """One channel per peer address, reused across calls; :meth:`retain` closes the ones a new
    lookup table no longer names. Every call is signed with ``credentials`` (``peer_auth``)."""

    def __init__(self, credentials: PeerCredentials) -> None:
        self.credentials = credentials
        self._peers: dict[str, tuple[grpc.Channel, pb_grpc.PartitionStub]] = {}
        self._lock = threading.Lock()

    def stub(self, address: str) -> pb_grpc.PartitionStub:
        """The ``mpnn.v1.Partition`` stub for ``address`` (``host:port``), opening its channel once."""
        with self._lock:
            if address not in self._peers:
                channel = self.credentials.channel(address)
                self._peers[address] = (channel, pb_grpc.PartitionStub(channel))
            return self._peers[address][1]

    def addresses(self) -> list[str]:
        """Addresses with an open channel."""
        with self._lock:
            return list(self._peers)

    def retain(self, addresses: Iterable[str]) -> list[str]:
        """Close the channels to every address not in ``addresses``; returns those addresses.

        A pass still running under the previous table loses its calls to them (its partitions
        no longer serve that table anyway).
        """
        keep = set(addresses)
        with self._lock:
            gone = [a for a in self._peers if a not in keep]
            channels = [self._peers.pop(a)[0] for a in gone]
        for channel in channels:
            channel.close()
        return gone

    def close(self) -> None:
        """Close every channel."""
        with self._lock:
            channels = [channel for channel, _ in self._peers.values()]
            self._peers.clear()
        for channel in channels:
            channel.close()


class GrpcTransport:
    """The engine's transport over gRPC for one lookup table.

    Args:
        index: this partition's index (the messages' ``source``).
        table: the lookup table the pass runs under (peer addresses, its version).
        peers: the channels to the peers.
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

    def exchange(self, key: tuple, outgoing: dict[int, np.ndarray], expect, timeout: float) -> dict[int, np.ndarray]:
        """Send ``outgoing`` (peer → float32 array) under ``key`` ``(pass_id, phase, layer)``, then
        take the messages of the peers in ``expect`` from the mailbox.

        Raises:
            ExchangeError: a peer refused or failed an ``Exchange`` call.
            TimeoutError: an expected message did not arrive within ``timeout`` seconds.
        """
        pass_id, phase, layer = key
        calls = []
        requests: dict[int, pb.ExchangeRequest] = {}
        for peer, arr in outgoing.items():
            tensor = to_tensor(arr)
            request = pb.ExchangeRequest(lookup_version=self.table.version, pass_id=pass_id, phase=phase,
                                         layer=layer, source=self.index, tensor=tensor)
            stub = self.peers.stub(self.table.addresses[peer])
            calls.append((peer, stub.Exchange.future(request, timeout=timeout)))
            requests[peer] = request
            self.count_sent(len(tensor.data), peer=peer, phase=phase)
        for peer, call in calls:
            try:
                try:
                    call.result()
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    # A peer that restarted moments ago: this channel may still wait out its reconnect
                    # backoff (at most a second). Once more, waiting for the connection, briefly.
                    stub = self.peers.stub(self.table.addresses[peer])
                    stub.Exchange(requests[peer], timeout=min(timeout, RECONNECT_WAIT), wait_for_ready=True)
            except grpc.RpcError as exc:
                raise ExchangeError(f"partition {self.index}: sending {key!r} to partition {peer} "
                                    f"({self.table.addresses[peer]}) failed: {exc.code().name} {exc.details()}") from exc
        return self.mailbox.take_many(key, expect, timeout)
