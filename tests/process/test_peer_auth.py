"""The peer port admits only calls signed with the network's key; the public port has no peer service."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from partition_server.api.distributor import Distribution
from partition_server.api.peer_auth import (MAC_HEADER, NONCE_HEADER, TS_HEADER, PeerCredentials, SignedChannel,
                                            SigningInterceptor, generate_key)
from partition_server.api.protos import mpnn_pb2 as pb
from partition_server.api.protos import mpnn_pb2_grpc as pb_grpc
from partition_server.api.wire import to_tensor
from tests.support.dataplane import Cluster

ATTACK = pb.OptimizerConfig(name="sgd", learning_rate=1e6)


def _poison(cluster: Cluster, channel: grpc.Channel, i: int) -> grpc.RpcError:
    """A training RunPass with a huge learning rate on ``channel``; returns the refusal."""
    x = np.ones((4, cluster.model.inputs), np.float32)
    y = np.zeros(4, np.int64)
    request = pb.PassRequest(lookup_version=cluster.table.version, pass_id="attack", train=True,
                             inputs=to_tensor(x), labels=to_tensor(y), optimizer=ATTACK)
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.PartitionStub(channel).RunPass(request, timeout=5)
    return err.value


def _weights(cluster: Cluster) -> list[np.ndarray]:
    return [cluster.tensor(k, "weight").copy() for k in range(len(cluster.model.layers))]


def test_unsigned_and_wrongly_signed_calls_are_unauthenticated_and_change_nothing(tmp_path):
    with Cluster(tmp_path, 2, Distribution("balanced")) as cluster:
        before = _weights(cluster)
        address = cluster.table.addresses[0]
        other_key = PeerCredentials(cluster.name, generate_key()).channel(address)
        other_network = PeerCredentials("another", cluster.credentials.key).channel(address)
        # Signed with the right key, but for partition 1: no use against partition 0.
        for_partition_1 = SignedChannel(grpc.insecure_channel(address), SigningInterceptor(
            cluster.credentials.key, network=cluster.name, audience=cluster.table.addresses[1]))
        try:
            for channel in (cluster.unsigned_channel(0), other_key, other_network, for_partition_1):
                err = _poison(cluster, channel, 0)
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
                assert err.details().startswith("peer port: ")
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.PartitionStub(cluster.unsigned_channel(0)).Checkpoint(
                    pb.CheckpointRequest(sequence=999999999999), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            for channel in (other_key, other_network, for_partition_1):
                channel.close()
        for want, got in zip(before, _weights(cluster)):
            np.testing.assert_array_equal(want, got)
        assert cluster.servers[0].store.latest() is None  # no checkpoint written
        # The network's own calls go through.
        assert len(cluster.driver().status()) == 2


def test_a_replayed_call_is_refused(tmp_path):
    with Cluster(tmp_path, 1, Distribution("balanced")) as cluster:
        signer = SigningInterceptor(cluster.credentials.key, network=cluster.name, audience=cluster.table.addresses[0])
        metadata = signer.metadata("/mpnn.v1.Partition/Status")
        stub = pb_grpc.PartitionStub(cluster.unsigned_channel(0))
        stub.Status(pb.StatusRequest(), metadata=metadata, timeout=5)  # the first time: admitted
        with pytest.raises(grpc.RpcError) as err:
            stub.Status(pb.StatusRequest(), metadata=metadata, timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "replayed" in err.value.details()
        # Stale and future timestamps are refused even with a new nonce.
        for skew in (-120.0, 120.0):
            late = SigningInterceptor(cluster.credentials.key, network=cluster.name,
                                      audience=cluster.table.addresses[0], clock=lambda s=skew: time.time() + s)
            with pytest.raises(grpc.RpcError) as err:
                stub.Status(pb.StatusRequest(), metadata=late.metadata("/mpnn.v1.Partition/Status"), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "timestamp" in err.value.details()
        # A signature made for another method does not carry over.
        forged = dict(signer.metadata("/mpnn.v1.Partition/Status"))
        with pytest.raises(grpc.RpcError) as err:
            stub.Reload(pb.ReloadRequest(), metadata=[(k, forged[k]) for k in (TS_HEADER, NONCE_HEADER, MAC_HEADER)],
                        timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_public_port_serves_health_and_inference_but_not_the_peer_service(tmp_path):
    with Cluster(tmp_path, 1, Distribution("balanced")) as cluster:
        channel = grpc.insecure_channel(f"127.0.0.1:{cluster.servers[0].port}")
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.PartitionStub(channel).Status(pb.StatusRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            channel.close()
        # The peer port's health needs the key too.
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(cluster.unsigned_channel(0)).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
