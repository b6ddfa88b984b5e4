"""The streamed peer transport: one long-lived ``ExchangeStream`` per ordered pair of partitions.

Servers are in-process ``PartitionServer`` objects on 127.0.0.1 (``tests/support/dataplane.Cluster``):
messages flow over one stream per pair however many passes run, a stream is authenticated when it
opens and refused beyond the server's limit (its sender falls back to unary ``Exchange``), and a
broken stream fails the passes whose messages it may have lost, on both sides, with errors naming
the peer, and is reopened for the next pass.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid

import grpc
import numpy as np
import pytest

from partition_server.api.distributor import Distribution
from partition_server.api.protos import mpnn_pb2 as pb
from partition_server.api.protos import mpnn_pb2_grpc as pb_grpc
from partition_server.api.wire import to_tensor
from partition_server.client.driver import DriverError
from partition_server.engine import ExchangeError, OptimizerConfig
from partition_server.serving import reasons
from partition_server.serving.limits import ServerLimits
from partition_server.serving.peers import GrpcTransport
from tests.support.dataplane import TOL, Cluster, batch, reference, wait_until

SGD = OptimizerConfig("sgd", learning_rate=0.1, momentum=0.9)


def message(cluster: Cluster, source: int, pass_id: str = "p", layer: int = 0) -> pb.ExchangeRequest:
    return pb.ExchangeRequest(lookup_version=cluster.table.version, pass_id=pass_id, phase="fwd", layer=layer,
                              source=source, tensor=to_tensor(np.ones((2, 3), np.float32)))


class Feed:
    """A request iterator held open until :meth:`end`; counts what the client took from it."""

    def __init__(self, *requests):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        for r in requests:
            self._q.put(r)

    def put(self, request) -> None:
        self._q.put(request)

    def end(self) -> None:
        self._q.put(None)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._q.get()
        if item is None:
            raise StopIteration
        return item


def test_every_message_of_many_passes_flows_over_one_stream_per_ordered_pair(tmp_path):
    with Cluster(tmp_path, 4, Distribution("balanced")) as cluster:
        driver = cluster.driver()
        ref = reference(optimizer=SGD)
        for seed in range(4):
            x, y = batch(seed)
            want = ref.train_step(x, y)
            _, loss, _ = driver.step(x, y, SGD)
            assert loss == pytest.approx(want.loss, rel=1e-5)
        x, _ = batch(9)
        np.testing.assert_allclose(driver.step(x)[0], ref.forward(x), **TOL)
        for status in driver.status():
            assert status.messages_sent > 0
            # Three peers send to each partition, each on one stream, opened once for all passes.
            assert (status.peer_streams_opened, status.peer_streams_open) == (3, 3), status
        assert [s.peers.streams_opened for s in cluster.servers.values()] == [3, 3, 3, 3]


def test_an_unsigned_stream_is_refused_before_any_message_is_read(tmp_path):
    with Cluster(tmp_path, 2) as cluster:
        stub = pb_grpc.PartitionStub(cluster.unsigned_channel(1))
        with pytest.raises(grpc.RpcError) as info:
            stub.ExchangeStream(iter([message(cluster, 0)]), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        server = cluster.servers[1]
        assert server.peer_streams_opened == 0  # the handler never ran
        assert server.mailbox.pending() == []


def test_a_stream_beyond_the_limit_is_refused_and_its_sender_falls_back_to_unary_calls(tmp_path):
    with Cluster(tmp_path, 3, limits=ServerLimits(training_lease_seconds=0.0, max_peer_streams=1)) as cluster:
        # A signed stream holds partition 2's only stream slot.
        held = Feed()
        holder = cluster.stub(2).ExchangeStream.future(held, timeout=60)
        wait_until(lambda: cluster.servers[2].peer_streams_open == 1, what="the held stream")
        with pytest.raises(grpc.RpcError) as info:
            cluster.stub(2).ExchangeStream(iter([message(cluster, 0)]), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reasons.reason_of(info.value) == reasons.PEER_STREAMS
        assert "max_peer_streams" in info.value.details()
        assert cluster.servers[2].mailbox.pending() == []
        # Partitions 0 and 1 find their streams to 2 refused: the pass that queued messages on
        # them fails (no longer than its timeout), the next ones reach 2 by unary Exchange.
        driver = cluster.driver(timeout=5)
        x, _ = batch(1)
        outputs = None
        for _ in range(3):
            try:
                outputs = driver.step(x)[0]
                break
            except DriverError:
                continue
        np.testing.assert_allclose(outputs, reference().forward(x), **TOL)
        assert cluster.servers[0].peers.stream(cluster.table.addresses[2]) is None
        held.end()
        holder.result(timeout=10)


def test_a_stream_refused_a_message_ends_with_the_field_and_fails_the_passes_waiting_for_its_sender(tmp_path):
    with Cluster(tmp_path, 3) as cluster:
        receiver = cluster.servers[1]
        receiver.mailbox.open("waiting", ttl=60)
        taken: queue.SimpleQueue = queue.SimpleQueue()

        def take():
            try:
                taken.put(receiver.mailbox.take_many(("waiting", "fwd", 0), [0], 60))
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                taken.put(exc)

        threading.Thread(target=take, daemon=True).start()
        bad = message(cluster, 0, layer=99)
        with pytest.raises(grpc.RpcError) as info:
            cluster.stub(1).ExchangeStream(iter([message(cluster, 0, "other"), bad]), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "layer must be 0..2, got 99" in info.value.details()
        err = taken.get(timeout=10)
        assert isinstance(err, ExchangeError), err
        assert "from partition 0 may have been lost" in str(err) and "was refused a message" in str(err)


def test_a_stream_carries_one_source(tmp_path):
    with Cluster(tmp_path, 3) as cluster:
        with pytest.raises(grpc.RpcError) as info:
            cluster.stub(1).ExchangeStream(iter([message(cluster, 0, "a"), message(cluster, 2, "b")]), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "one partition's messages" in info.value.details()


def test_a_broken_stream_fails_the_pass_that_used_it_on_both_sides_and_is_reopened(tmp_path):
    with Cluster(tmp_path, 2) as cluster:
        sender, receiver = cluster.servers[0], cluster.servers[1]
        table = sender._loaded.table
        pass_id = uuid.uuid4().hex
        receiver.mailbox.open(pass_id, ttl=60)
        transport = GrpcTransport(index=0, table=table, peers=sender.peers, mailbox=sender.mailbox,
                                  count_sent=sender.count_sent)
        arr = np.ones((2, 3), np.float32)
        with pytest.raises(TimeoutError):  # sent; partition 1 sends nothing back
            transport.exchange((pass_id, "fwd", 0), {1: arr}, [1], timeout=0.2)
        np.testing.assert_array_equal(receiver.mailbox.take((pass_id, "fwd", 0), 0, 10), arr)
        address = table.addresses[1]
        stream = sender.peers.stream(address)
        stream._call.cancel()  # what a connection lost under the stream does to it
        wait_until(lambda: stream.ended, what="the stream to end")
        # The receiver saw the stream break: its pass waiting for partition 0 fails at once.
        start = time.monotonic()
        with pytest.raises(ExchangeError, match="from partition 0 may have been lost .*broke"):
            receiver.mailbox.take((pass_id, "fwd", 1), 0, 30)
        assert time.monotonic() - start < 10
        # The sender's pass that used the broken stream fails, naming the peer.
        with pytest.raises(ExchangeError, match=f"stream to partition 1 \\({address}\\) that carried earlier "
                                                f"messages of pass '{pass_id}' ended .*CANCELLED"):
            transport.exchange((pass_id, "fwd", 1), {1: arr}, [], timeout=5)
        # A new pass reopens the stream; every pass after that works.
        x, _ = batch(3)
        np.testing.assert_allclose(cluster.driver().step(x)[0], reference().forward(x), **TOL)
        assert sender.peers.streams_opened == 2
        assert sender.peers.stream(address) is not stream


def test_a_restarted_peer_is_reached_on_a_new_stream(tmp_path):
    with Cluster(tmp_path, 2) as cluster:
        x, _ = batch(4)
        want = reference().forward(x)
        np.testing.assert_allclose(cluster.driver().step(x)[0], want, **TOL)
        opened = cluster.servers[0].peers.streams_opened
        from partition_server.serving.server import PartitionServer

        old = cluster.servers[1]
        old.stop(grace=0.5)
        restarted = PartitionServer(1, cluster.name, cluster.model, cluster.lookup_path, cluster.model_dir,
                                    credentials=cluster.credentials, limits=cluster.limits)
        cluster.servers[1] = restarted
        restarted.start("127.0.0.1", 0, peer_port=cluster.ports[1])
        outputs = None
        for _ in range(3):  # a pass may find the old stream's end first
            try:
                outputs = cluster.driver(timeout=10).step(x)[0]
                break
            except DriverError:
                continue
        np.testing.assert_allclose(outputs, want, **TOL)
        assert cluster.servers[0].peers.streams_opened == opened + 1
        assert restarted.peer_streams_opened == 1


def test_a_pass_waiting_for_a_peer_whose_stream_broke_is_aborted_peer_lost_and_retryable(tmp_path):
    from partition_server.serving.retry import Retry, retry_kind

    with Cluster(tmp_path, 2) as cluster:
        x, _ = batch(5)
        pass_id = uuid.uuid4().hex
        # Partition 1 alone runs the pass: it waits for partition 0's activations.
        running = cluster.stub(1).RunPass.future(pb.PassRequest(lookup_version=cluster.table.version,
                                                                pass_id=pass_id, inputs=to_tensor(x)), timeout=60)
        wait_until(lambda: pass_id in cluster.servers[1].mailbox._open, what="the pass to start")
        # A stream from partition 0 carries a message, then breaks (its sender is gone).
        feed = Feed(message(cluster, 0, "another pass"))
        stream = cluster.stub(1).ExchangeStream.future(feed, timeout=60)
        wait_until(lambda: cluster.servers[1].mailbox.held(0)[1] == 1, what="the streamed message")
        stream.cancel()
        with pytest.raises(grpc.RpcError) as info:
            running.result(timeout=30)
        err = info.value
        assert err.code() == grpc.StatusCode.ABORTED
        assert reasons.reason_of(err) == reasons.PEER_LOST
        assert "from partition 0 may have been lost (its stream to partition 1 broke)" in err.details()
        assert retry_kind(err.code(), err) is Retry.PEER_LOST


def test_a_stream_closed_with_its_closing_message_loses_nothing(tmp_path):
    with Cluster(tmp_path, 2) as cluster:
        receiver = cluster.servers[1]
        receiver.mailbox.open("running", ttl=60)
        cluster.stub(1).ExchangeStream(iter([message(cluster, 0, "running"), pb.ExchangeRequest()]), timeout=10)
        np.testing.assert_array_equal(receiver.mailbox.take(("running", "fwd", 0), 0, 5), np.ones((2, 3)))
        with pytest.raises(TimeoutError):  # waits for more, not failed as lost
            receiver.mailbox.take(("running", "fwd", 1), 0, 0.2)
        # Ending without it is a break.
        cluster.stub(1).ExchangeStream(iter([message(cluster, 0, "other")]), timeout=10)
        with pytest.raises(ExchangeError, match="from partition 0 may have been lost .*broke"):
            receiver.mailbox.take(("running", "fwd", 1), 0, 30)


def test_a_request_starts_no_thread_per_partition_or_message(tmp_path, monkeypatch):
    """An entry point's pass reaches its peers on the channels that carry the peer streams, so
    gRPC starts no polling thread per call; only the call to its own partition still may (with
    one unary call per message and a channel of its own per partition it was 40 per request)."""
    with Cluster(tmp_path, 4, Distribution("balanced")) as cluster:
        x, _ = batch(6)
        inference = cluster.servers[0].inference
        for _ in range(3):  # warm: streams, channels, pool threads
            inference.infer(x)
        started = []
        start = threading.Thread.start
        monkeypatch.setattr(threading.Thread, "start", lambda self, *a, **k: (started.append(self.name),
                                                                              start(self, *a, **k))[1])
        requests = 20
        for _ in range(requests):
            np.testing.assert_allclose(inference.infer(x), reference().forward(x), **TOL)
        monkeypatch.undo()
        assert len(started) <= 2 * requests, started
        assert sorted(cluster.servers[0].peers.addresses()) == sorted(cluster.table.addresses)
