"""The partition server's gRPC contract: status codes, health, Status, lookup reloads,
deadlines, and checkpoints that survive a dead writer and a new assignment.

Servers are in-process ``PartitionServer`` objects on 127.0.0.1 (``tests/support/dataplane.Cluster``),
called through real gRPC stubs.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import asdict

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from partition_server.api.distributor import Distribution
from partition_server.client.driver import DriverError
from partition_server.engine import OptimizerConfig
from partition_server.api.protos import mpnn_pb2 as pb
from partition_server.testing import ReferenceNetwork
from partition_server.storage.store import ModelStore
from partition_server.serving import reasons
from partition_server.serving.retry import Retry, retry_kind
from partition_server.api.wire import to_tensor
from tests.support.dataplane import INPUTS, MODEL, TOL, UNITS, Cluster, batch, build_table, reference, wait_until

SGD = OptimizerConfig("sgd", learning_rate=0.1, momentum=0.9)


def pass_request(table, x, y=None, version=None, session="") -> pb.PassRequest:
    req = pb.PassRequest(lookup_version=table.version if version is None else version,
                         pass_id=uuid.uuid4().hex, train=y is not None, inputs=to_tensor(x), session=session)
    if y is not None:
        req.labels.CopyFrom(to_tensor(y))
    return req


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


@pytest.fixture
def cluster4(tmp_path):
    with Cluster(tmp_path, 4, Distribution("balanced")) as c:
        yield c


# ---------------------------------------------------------------- status codes


@pytest.mark.parametrize("make, field, detail", [
    (lambda x, y: (x[:, :-1], None), "inputs", "shape must be [*, 10], got [9, 9]"),
    (lambda x, y: (x.reshape(-1), None), "inputs", "shape must be [*, 10], got [90]"),
    (lambda x, y: (x.astype(np.float64), None), "inputs", "dtype must be float32, got float64"),
    (lambda x, y: (x, y.astype(np.int32)), "labels", "dtype must be int64, got int32"),
    (lambda x, y: (x, y[:-1]), "labels", "shape must be [9], got [8]"),
], ids=["columns", "rank", "inputs-dtype", "labels-dtype", "labels-shape"])
def test_bad_pass_is_invalid_argument_naming_the_field(cluster4, make, field, detail):
    x, y = batch(0)
    bad_x, bad_y = make(x, y)
    stub = cluster4.stub(2)
    session = cluster4.driver().open_training(SGD)
    err = rpc_error(stub.RunPass, pass_request(cluster4.table, bad_x, bad_y, session=session), timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"{field}: ")
    assert detail in err.details()
    # Rejected before any traffic: nobody sent anything.
    assert sum(s.messages_sent for s in cluster4.servers.values()) == 0


def test_out_of_range_label_is_invalid_argument(cluster4):
    x, y = batch(0)
    y[3] = UNITS[-1]
    session = cluster4.driver().open_training(SGD)
    err = rpc_error(cluster4.stub(0).RunPass, pass_request(cluster4.table, x, y, session=session), timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "y: labels must be in [0, 5), got 5" in err.details()


def test_tensor_bytes_that_do_not_fit_the_shape_are_invalid_argument(cluster4):
    x, _ = batch(0)
    req = pass_request(cluster4.table, x)
    req.inputs.data = req.inputs.data[:-4]
    err = rpc_error(cluster4.stub(1).RunPass, req, timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "inputs: 356 bytes do not fit shape [9, 10] of float32 (360 bytes)"


def test_exchange_rejects_bad_phase_and_duplicates(cluster4):
    stub = cluster4.stub(1)
    req = pb.ExchangeRequest(lookup_version=cluster4.table.version, pass_id="s", phase="sideways", layer=0,
                             source=0, tensor=to_tensor(np.zeros((2, 3), np.float32)))
    err = rpc_error(stub.Exchange, req, timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "phase must be fwd or bwd, got 'sideways'" in err.details()
    req.phase = "fwd"
    stub.Exchange(req, timeout=10)
    err = rpc_error(stub.Exchange, req, timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "duplicate message" in err.details()


def test_exchanges_of_a_pass_that_never_runs_expire(cluster4):
    from partition_server.engine import Mailbox

    now = [0.0]
    server = cluster4.servers[1]
    server.mailbox = Mailbox(clock=lambda: now[0])

    def exchange(pass_id: str) -> None:
        cluster4.stub(1).Exchange(pb.ExchangeRequest(
            lookup_version=cluster4.table.version, pass_id=pass_id, phase="fwd", layer=0, source=0,
            tensor=to_tensor(np.zeros((9, 3), np.float32))), timeout=5)

    for i in range(3):
        exchange(f"ghost{i}")
    assert len(server.mailbox.pending()) == 3
    now[0] = 29.0  # the caller's deadline does not matter: a pass not running here is kept 30 s
    exchange("later")
    assert len(server.mailbox.pending()) == 4
    now[0] = 31.0
    exchange("latest")
    assert [key[0] for key, _ in server.mailbox.pending()] == ["later", "latest"]


def test_stale_lookup_version_is_failed_precondition(cluster4):
    x, _ = batch(0)
    stale = "sha256:" + "0" * 64
    for call in (lambda s: s.RunPass(pass_request(cluster4.table, x, version=stale), timeout=10),
                 lambda s: s.Exchange(pb.ExchangeRequest(lookup_version=stale, pass_id="a", phase="fwd",
                                                         tensor=to_tensor(x)), timeout=10),
                 lambda s: s.Checkpoint(pb.CheckpointRequest(lookup_version=stale, sequence=1), timeout=10)):
        err = rpc_error(call, cluster4.stub(3))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert stale in err.details() and cluster4.table.version in err.details()
    assert not (cluster4.model_dir / "checkpoints").exists()


# ---------------------------------------------------------------- health and Status


def test_health_service_reports_serving(cluster4):
    for i in range(4):
        health = health_pb2_grpc.HealthStub(cluster4.channel(i))
        for service in ("", "mpnn.v1.Partition"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, (i, service)
        err = rpc_error(health.Check, health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert err.code() == grpc.StatusCode.NOT_FOUND


def test_status_reports_neurons_and_parameters(cluster4):
    # balanced over [12, 7, 5]: layer 0 3/3/3/3, layer 1 2/2/2/1, layer 2 2/1/1/1.
    neurons = [7, 6, 6, 5]
    parameters = [3 * 11 + 2 * 13 + 2 * 8, 3 * 11 + 2 * 13 + 8, 3 * 11 + 2 * 13 + 8, 3 * 11 + 13 + 8]
    replies = cluster4.driver().status()
    assert [r.partition for r in replies] == [0, 1, 2, 3]
    assert [r.neurons for r in replies] == neurons
    assert [r.parameters for r in replies] == parameters == [75, 67, 67, 54]
    for r in replies:
        assert r.ready and r.lookup_version == cluster4.table.version
        assert (r.weights_source, r.checkpoint_sequence) == ("init", -1)
        assert (r.messages_sent, r.bytes_sent) == (0, 0)


# ---------------------------------------------------------------- deadlines


def test_pass_whose_peer_never_starts_is_deadline_exceeded(tmp_path):
    # layers/2: partition 1 owns layers 1-2 and waits for a_0 from partition 0, which is not running.
    with Cluster(tmp_path, 2, Distribution("layers", layers=((0,), (1, 2))), start=[1]) as cluster:
        x, _ = batch(0)
        err = rpc_error(cluster.stub(1).RunPass, pass_request(cluster.table, x), timeout=1.5)
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The driver names a partition and the status instead of hanging.
        with pytest.raises(DriverError, match=r"partition \d \(127\.0\.0\.1:\d+\) RunPass: "):
            cluster.driver(timeout=1.5).step(x)


def test_pass_whose_peers_never_answer_is_deadline_exceeded_and_the_cluster_recovers(tmp_path):
    ref = reference()
    with Cluster(tmp_path, 3, Distribution("balanced")) as cluster:
        x, _ = batch(0)
        # Only partition 0 is asked; its peers are up but never run the pass.
        err = rpc_error(cluster.stub(0).RunPass, pass_request(cluster.table, x), timeout=1.0)
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The abandoned pass leaves nothing that confuses the next one.
        out, _, _ = cluster.driver().step(x)
        np.testing.assert_allclose(out, ref.forward(x), **TOL)


def test_forward_passes_beyond_the_limit_are_refused_at_once_and_training_passes_are_not(cluster4):
    """Passes hold pool threads that Exchange needs: past pass_limit, a forward pass is refused."""
    server = cluster4.servers[0]
    assert 1 <= server.pass_limit < server.workers
    for _ in range(server.pass_limit):
        assert server._pass_slots.acquire(blocking=False)  # as if pass_limit passes were running
    try:
        x, y = batch(0)
        err = rpc_error(cluster4.stub(0).RunPass, pass_request(cluster4.table, x), timeout=30)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"{server.pass_limit} forward passes are running" in err.details()
        # Training passes are one at a time per engine and are not counted.
        _, loss, _ = cluster4.driver().step(x, y, SGD)
        assert loss is not None
    finally:
        for _ in range(server.pass_limit):
            server._pass_slots.release()
    out, _, _ = cluster4.driver().step(x)
    assert out.shape == (x.shape[0], UNITS[-1])


class _CancelledContext:
    """A servicer context whose call was cancelled before the handler ran."""

    def __init__(self):
        self.aborted = None

    def add_callback(self, callback):
        return False

    def time_remaining(self):
        return 2.0

    def abort(self, code, details):
        self.aborted = (code, details)
        raise RuntimeError("aborted")


def test_a_pass_cancelled_before_it_starts_is_cancelled_at_once(cluster4):
    x, _ = batch(0)
    context = _CancelledContext()
    with pytest.raises(RuntimeError, match="aborted"):
        cluster4.servers[0].RunPass(pass_request(cluster4.table, x), context)
    assert context.aborted[0] == grpc.StatusCode.CANCELLED, context.aborted


def test_a_dropped_weights_version_is_aborted_with_the_reason_in_trailing_metadata(cluster4):
    """WeightsChanged is ABORTED plus ``mpnn-error: weights-changed``; clients read the metadata."""
    x, _ = batch(0)
    request = pass_request(cluster4.table, x)
    request.weights_version = 1000  # ahead of every partition, and no training step is running
    err = rpc_error(cluster4.stub(0).RunPass, request, timeout=10)
    assert err.code() == grpc.StatusCode.ABORTED
    assert (reasons.ERROR_KEY, reasons.WEIGHTS_CHANGED) in tuple(err.trailing_metadata())
    assert "weights changed during the pass; retry" in err.details()  # the human message stays
    assert reasons.reason_of(err) == reasons.WEIGHTS_CHANGED
    # Through the driver, the reason survives as the DriverError's cause; the entry point retries it.
    with pytest.raises(DriverError) as info:
        cluster4.driver().step(x, weights_version=1000)
    assert info.value.code == grpc.StatusCode.ABORTED
    assert retry_kind(info.value.code, info.value) is Retry.WEIGHTS_CHANGED
    # Other ABORTED failures carry no reason, whatever their text: they are not retried as such.
    plain = DriverError(f"partition 0: {err.details()}", grpc.StatusCode.ABORTED)
    assert reasons.reason_of(plain) is None and retry_kind(plain.code, plain) is None


def test_inference_during_training_computes_with_one_weights_version(tmp_path):
    """A pass overlapping a training step uses the same parameter version on every partition."""
    optimizer = OptimizerConfig("sgd", learning_rate=0.5, momentum=0.9)
    with Cluster(tmp_path, 3, Distribution("balanced")) as cluster:
        driver = cluster.driver()
        # Partition 2 applies each update late: a wide window where the partitions disagree.
        engine = cluster.servers[2]._loaded.engine
        apply = engine._apply
        engine._apply = lambda grads: (time.sleep(0.03), apply(grads))
        probe = np.random.default_rng(5).normal(size=(4, INPUTS)).astype(np.float32)
        history = [cluster.params()]
        outputs: list[np.ndarray] = []
        errors: list[Exception] = []
        done = threading.Event()

        def infer(entry: int) -> None:
            while not done.is_set():
                try:
                    outputs.append(cluster.servers[entry].inference.infer(probe, timeout=30))
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return

        clients = [threading.Thread(target=infer, args=(i,)) for i in (0, 1)]
        for t in clients:
            t.start()
        try:
            for step in range(20):
                x, y = batch(100 + step)
                driver.step(x, y, optimizer)
                history.append(cluster.params())
        finally:
            done.set()
            for t in clients:
                t.join(60)
        assert not errors, errors
        assert len(outputs) >= 20
        expected = [ReferenceNetwork(MODEL.inputs, MODEL.layers, params).forward(probe) for params in history]
        mixed = [o for o in outputs if min(float(np.abs(o - e).max()) for e in expected) > 1e-4]
        assert not mixed, f"{len(mixed)} of {len(outputs)} passes match no parameter version"


# ---------------------------------------------------------------- lookup reloads


def test_lookup_change_reloads_and_keeps_the_weights(tmp_path):
    ref = reference(optimizer=SGD)
    with Cluster(tmp_path, 4, Distribution("balanced"), poll_seconds=0.1) as cluster:
        driver = cluster.driver()
        for s in range(3):
            x, y = batch(10 + s)
            ref.train_step(x, y)
            driver.step(x, y, SGD)
        ckpt = driver.checkpoint(ModelStore(cluster.model_dir), MODEL, {"optimizer": asdict(SGD)})
        x, _ = batch(99)
        before, _, _ = driver.step(x)
        np.testing.assert_allclose(before, ref.forward(x), **TOL)
        assert not np.allclose(before, reference().forward(x), atol=1e-3)  # trained, not init

        # Same ports, another assignment: partition 3 now owns nothing.
        new = build_table(cluster.table.addresses, Distribution("layers", layers=((1,), (0,), (2,), ())))
        assert new.version != cluster.table.version
        cluster.write_lookup(new)
        wait_until(lambda: all(r.lookup_version == new.version for r in driver.status()),
                   what="every server to load the new lookup")

        replies = cluster.driver(new).status()
        assert [r.neurons for r in replies] == [7, 12, 5, 0]
        assert [r.parameters for r in replies] == [7 * 13, 12 * 11, 5 * 8, 0]
        assert {(r.weights_source, r.checkpoint_sequence) for r in replies} == {("checkpoint", ckpt.sequence)}
        after, _, _ = cluster.driver(new).step(x)
        np.testing.assert_allclose(after, before, **TOL)
        # The old version is now stale everywhere.
        with pytest.raises(DriverError, match="FAILED_PRECONDITION"):
            driver.step(x)
        # Training continues under the new table with the checkpoint's momentum buffers.
        x2, y2 = batch(50)
        want = ref.train_step(x2, y2)
        _, loss, _ = cluster.driver(new).step(x2, y2, SGD)
        assert loss == pytest.approx(want.loss, rel=1e-5)
        for k in range(len(UNITS)):
            np.testing.assert_allclose(cluster.tensor(k, "weight"), ref.params[k][0], **TOL)


def test_a_reload_closes_the_channels_to_addresses_that_left_the_lookup(tmp_path):
    with Cluster(tmp_path, 3, Distribution("balanced")) as cluster:
        x, y = batch(0)
        cluster.driver().step(x, y, SGD)
        server = cluster.servers[0]
        old = cluster.table.addresses
        assert sorted(server.peers.addresses()) == sorted(old[1:])
        gone = server.peers.stub(old[2])
        # Scaled down to 2 partitions: partition 2's address is no longer in the table.
        table = build_table(old[:2], Distribution("balanced"))
        cluster.write_lookup(table)
        for i in (0, 1):
            cluster.servers[i].load()
        assert server.peers.addresses() == [old[1]]
        with pytest.raises(ValueError, match="closed channel"):
            gone.Status(pb.StatusRequest(), timeout=1)
        # The kept channel still works under the new table (no checkpoint: the seeded weights).
        out, _, _ = cluster.driver(table).step(x)
        np.testing.assert_allclose(out, reference().forward(x), **TOL)


def test_invalid_lookup_file_keeps_the_last_valid_table(tmp_path, caplog):
    with Cluster(tmp_path, 2, Distribution("balanced"), poll_seconds=0.05) as cluster:
        driver = cluster.driver()
        x, _ = batch(3)
        want, _, _ = driver.step(x)
        bad = cluster.table.to_dict()
        # A hole: layer 0's runs start at neuron 1, so neuron 0 has no owner.
        bad["patterns"].append({"starts": [1, UNITS[0] // 2], "owners": [0, 1]})
        bad["layers"]["pattern"][0] = len(bad["patterns"]) - 1
        bad["version"] = "sha256:" + "1" * 64
        cluster.lookup_path.write_text(json.dumps(bad))
        # Both watchers see the new version, fail to load it, and say so ...
        wait_until(lambda: {r.partition for r in caplog.records if r.getMessage() == "reload failed"} == {0, 1},
                   what="both servers to reject the bad lookup")
        # ... and keep serving the last valid table.
        assert {r.lookup_version for r in driver.status()} == {cluster.table.version}
        out, _, _ = driver.step(x)
        np.testing.assert_array_equal(out, want)


# ---------------------------------------------------------------- checkpoints and servers


def test_uncommitted_checkpoint_is_ignored_and_weights_move_to_a_new_assignment(tmp_path):
    ref = reference(optimizer=SGD)
    x_probe, _ = batch(77)
    with Cluster(tmp_path, 4, Distribution("balanced")) as cluster:
        driver = cluster.driver()
        store = ModelStore(cluster.model_dir)
        for s in range(3):
            x, y = batch(20 + s)
            ref.train_step(x, y)
            driver.step(x, y, SGD)
        ckpt = driver.checkpoint(store, MODEL, {"optimizer": asdict(SGD)})
        n = ckpt.sequence
        at_n = ReferenceNetwork(MODEL.inputs, MODEL.layers, ref.params, SGD)
        at_n.state = [dict(s) for s in ref.state]
        at_n.optimizer_step = ref.optimizer_step
        out_n, _, _ = driver.step(x_probe)
        np.testing.assert_allclose(out_n, at_n.forward(x_probe), **TOL)

        for s in range(3):  # move on past N
            x, y = batch(30 + s)
            driver.step(x, y, SGD)
        moved, _, _ = driver.step(x_probe)
        assert not np.allclose(moved, out_n, atol=1e-4)

        # The writer of N+1 dies after every shard but before the commit record.
        dead = store.reserve(run_id="dead")
        assert dead.sequence == n + 1
        for i in range(4):
            cluster.stub(i).Checkpoint(pb.CheckpointRequest(
                lookup_version=cluster.table.version, sequence=dead.sequence, run_id=dead.run_id,
                reservation_token=dead.token), timeout=10)
        shards = sorted(p.name for p in store.sequence_dir(n + 1).iterdir())
        assert shards == ["reservation.json"] + [f"shard-{i:05d}.safetensors" for i in range(4)]
        assert store.latest().sequence == n

        replies = driver.reload()
        assert [r.checkpoint_sequence for r in replies] == [n] * 4
        assert {r.weights_source for r in replies} == {"checkpoint"}
        out, _, _ = driver.step(x_probe)
        np.testing.assert_allclose(out, out_n, **TOL)
        ports = cluster.ports

    # Same volume, a new table: 2 partitions owning whole layers, on the same ports.
    with Cluster(tmp_path, 2, Distribution("layers", layers=((0, 2), (1,))), ports=ports[:2]) as cluster:
        driver = cluster.driver()
        replies = driver.status()
        assert [(r.weights_source, r.checkpoint_sequence) for r in replies] == [("checkpoint", n)] * 2
        assert [r.neurons for r in replies] == [17, 7]
        out, _, _ = driver.step(x_probe)
        np.testing.assert_allclose(out, out_n, **TOL)
        for k in range(len(UNITS)):
            np.testing.assert_allclose(cluster.tensor(k, "weight.momentum"), at_n.state[k]["weight.momentum"], **TOL)
        # And training resumes exactly, momentum included.
        x, y = batch(40)
        want = at_n.train_step(x, y)
        _, loss, _ = driver.step(x, y, SGD)
        assert loss == pytest.approx(want.loss, rel=1e-5)
        for k in range(len(UNITS)):
            np.testing.assert_allclose(cluster.tensor(k, "weight"), at_n.params[k][0], **TOL)
            np.testing.assert_allclose(cluster.tensor(k, "bias"), at_n.params[k][1], **TOL)
        # The next checkpoint takes a fresh number; the dead writer's leftovers stay out of it.
        again = driver.checkpoint(store, MODEL, {"optimizer": asdict(SGD)})
        assert again.sequence == n + 2 and store.latest().sequence == n + 2
        assert sorted(s.file for s in again.shards) == ["shard-00000.safetensors", "shard-00001.safetensors"]
        assert len(list(store.sequence_dir(n + 1).iterdir())) == 5  # untouched, never committed
        for k in range(len(UNITS)):
            np.testing.assert_allclose(again.read_layer(k, "weight"), at_n.params[k][0], **TOL)


def test_partial_shards_of_a_dead_writer_are_ignored_at_startup(tmp_path):
    with Cluster(tmp_path, 2, Distribution("balanced")) as cluster:
        driver = cluster.driver()
        x, y = batch(5)
        driver.step(x, y, SGD)
        ckpt = driver.checkpoint(ModelStore(cluster.model_dir), MODEL, {})
        want, _, _ = driver.step(batch(6)[0])
        driver.step(x, y, SGD)
        # Only partition 0 got to write its shard of the next checkpoint.
        dead = ModelStore(cluster.model_dir).reserve(run_id="dead")
        cluster.stub(0).Checkpoint(pb.CheckpointRequest(
            lookup_version=cluster.table.version, sequence=dead.sequence, run_id=dead.run_id,
            reservation_token=dead.token), timeout=10)
    with Cluster(tmp_path, 3, Distribution("count", counts=(20, 1, 3))) as cluster:
        replies = cluster.driver().status()
        assert {(r.weights_source, r.checkpoint_sequence) for r in replies} == {("checkpoint", ckpt.sequence)}
        out, _, _ = cluster.driver().step(batch(6)[0])
        np.testing.assert_allclose(out, want, **TOL)


def test_checkpoint_rpc_writes_only_own_rows(cluster4):
    store = ModelStore(cluster4.model_dir)
    reservation = store.reserve(run_id="run-a")
    cluster4.stub(1).Checkpoint(pb.CheckpointRequest(
        lookup_version=cluster4.table.version, sequence=reservation.sequence, run_id=reservation.run_id,
        reservation_token=reservation.token), timeout=10)
    from safetensors.numpy import load_file
    files = sorted(store.sequence_dir(reservation.sequence).iterdir())
    assert [f.name for f in files] == ["reservation.json", "shard-00001.safetensors"]
    files = files[1:]
    tensors = load_file(str(files[0]))
    # balanced/4 partition 1: layer 0 rows 3-5, layer 1 rows 2-3, layer 2 row 2; SGD momentum buffers too.
    assert tensors["layers.0.weight"].shape == (3, INPUTS)
    assert tensors["layers.1.weight"].shape == (2, 12)
    assert tensors["layers.2.bias"].shape == (1,)
    assert set(tensors) == {f"layers.{k}.{n}" for k in range(3)
                            for n in ("weight", "bias", "weight.momentum", "bias.momentum")}
    np.testing.assert_array_equal(tensors["layers.0.weight"], reference().params[0][0][3:6])
    np.testing.assert_array_equal(tensors["layers.1.weight"], reference().params[1][0][2:4])
