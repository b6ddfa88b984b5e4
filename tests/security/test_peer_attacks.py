"""Attacks on the peer service ``mpnn.v1.Partition``, by a caller that is not this network's
trainer or servers, or by an authenticated peer that is buggy or hostile: these bounds hold
without peer authentication (which, where configured, refuses such callers first).

Issue 10's "Before": a stray training Step with a huge learning rate overwrote the served weights
and left its optimizer on the engine; a training Step with a long deadline held the training lock
and the real trainer got ABORTED; 30 unsolicited 10 MiB Exchange tensors were kept (+364 MiB)
for as long as the caller's deadline asked.
"""

from __future__ import annotations

import re
import threading
import uuid

import grpc
import numpy as np
import pytest

from partition_server.api.channels import CHANNEL_OPTIONS
from partition_server.api.distributor import Distribution
from partition_server.api.protos import mpnn_pb2 as pb
from partition_server.api.protos import mpnn_pb2_grpc as pb_grpc
from partition_server.api.wire import to_tensor
from partition_server.client.driver import DriverError
from partition_server.engine import OptimizerConfig
from partition_server.serving import reasons
from partition_server.serving.limits import ServerLimits
from tests.security.conftest import LEGIT_SECONDS, MiB, infer, peak_rss, reset_peak, under_attack
from tests.support.dataplane import Cluster, batch

RSS_BOUND = 200 * MiB
HUGE_LR = pb.OptimizerConfig(name="sgd", learning_rate=1e6, momentum=0.0, beta1=0.9, beta2=0.999, eps=1e-8)


def stub(target, i: int) -> pb_grpc.PartitionStub:
    """A peer that holds the network's key (a compromised or buggy one): every bound below must
    hold for it too. Callers without the key are refused before any of this (see the next test)."""
    return pb_grpc.PartitionStub(target.dep.credentials.channel(target.dep.table.addresses[i]))


def unsigned_stub(target, i: int) -> pb_grpc.PartitionStub:
    return pb_grpc.PartitionStub(grpc.insecure_channel(target.dep.table.addresses[i], options=CHANNEL_OPTIONS))


def test_peer_calls_without_the_key_are_unauthenticated_and_change_nothing(target):
    before = infer(target)
    peer = unsigned_stub(target, 0)
    calls = [(peer.RunPass, stray_train(target, optimizer=HUGE_LR)),
             (peer.Checkpoint, pb.CheckpointRequest(lookup_version=target.dep.table.version, sequence=999999999999)),
             (peer.Reload, pb.ReloadRequest()),
             (peer.OpenTraining, pb.OpenTrainingRequest(session="x" * 32, optimizer=HUGE_LR)),
             (peer.Exchange, pb.ExchangeRequest(lookup_version=target.dep.table.version, pass_id="p", phase="fwd",
                                                layer=0, source=1, tensor=to_tensor(np.zeros((4, 4), np.float32)))),
             (peer.Status, pb.StatusRequest())]
    for call, request in calls:
        assert refused(call, request, timeout=10).code() == grpc.StatusCode.UNAUTHENTICATED
    np.testing.assert_array_equal(infer(target), before)
    assert not any(p.name.isdigit() and int(p.name) >= 999999999999
                   for p in (target.dep.model_dir / "checkpoints").glob("*"))


def stray_train(target, *, session: str = "", optimizer: pb.OptimizerConfig | None = None) -> pb.PassRequest:
    rng = np.random.default_rng(0)
    req = pb.PassRequest(lookup_version=target.dep.table.version, pass_id=uuid.uuid4().hex, train=True,
                         inputs=to_tensor(rng.random((32, 64), dtype=np.float32)),
                         labels=to_tensor(rng.integers(0, 10, 32)), session=session)
    if optimizer is not None:
        req.optimizer.CopyFrom(optimizer)
    return req


def refused(call, request, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, **kwargs)
    return info.value


def test_a_stray_training_pass_changes_no_weights(target):
    before = infer(target)
    for i in range(target.dep.net.partitions):   # one per partition, as in the issue
        peer = stub(target, i)
        err = refused(peer.RunPass, stray_train(target, optimizer=HUGE_LR), timeout=30)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "optimizer: fixed per training session" in err.details()
        for session in ("", "f" * 32):
            err = refused(peer.RunPass, stray_train(target, session=session), timeout=30)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
            assert reasons.reason_of(err) == reasons.TRAINING_SESSION
    after = infer(target)
    np.testing.assert_array_equal(after, before)   # predictions before = after: nothing was applied


def test_stray_training_calls_do_not_abort_the_trainers_run(target):
    x, y = (target.x.repeat(8, axis=0), np.arange(32) % 10)
    target.trainer.step(x, y)          # the trainer's run holds the session from here on
    done = threading.Event()
    outcomes: list[grpc.StatusCode] = []

    def attacker() -> None:
        peer = stub(target, 1)
        while not done.is_set() and len(outcomes) < 200:
            err = refused(peer.RunPass, stray_train(target), timeout=600)   # a long deadline, as in the issue
            outcomes.append(err.code())
            hijack = pb.OpenTrainingRequest(session=uuid.uuid4().hex, optimizer=HUGE_LR)
            outcomes.append(refused(peer.OpenTraining, hijack, timeout=30).code())

    thread = threading.Thread(target=attacker, daemon=True)
    thread.start()
    try:
        losses = [target.trainer.step(x, y)[1] for _ in range(15)]   # raises DriverError if ABORTED
    finally:
        done.set()
        thread.join(60)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert outcomes and set(outcomes) == {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION}


def test_unsolicited_exchanges_are_capped_per_peer(target):
    pid = target.pid(1)
    peer = stub(target, 1)
    tensor = to_tensor(np.zeros((256, 10 * MiB // 1024), np.float32))   # 10 MiB
    before = reset_peak(pid)
    codes: list[grpc.StatusCode] = []

    def flood() -> None:
        for _ in range(30):
            req = pb.ExchangeRequest(lookup_version=target.dep.table.version, pass_id=uuid.uuid4().hex,
                                     phase="fwd", layer=0, source=0, tensor=tensor)
            try:
                peer.Exchange(req, timeout=600)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())

    _, legit = under_attack(target, flood, entry=1)
    grown = peak_rss(pid) - before
    assert codes.count(grpc.StatusCode.OK) == 6      # 64 MiB for passes not running there, per peer
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 24
    assert grown < RSS_BOUND, f"partition 1's peak RSS grew by {grown / MiB:.0f} MiB"
    assert max(legit) < LEGIT_SECONDS, legit
    print(f"exchange flood 30 x 10 MiB: peak RSS +{grown / MiB:.0f} MiB, legit max {max(legit):.2f} s")
    for source, layer in ((1, 0), (4, 0), (-1, 0), (0, 3), (0, -1)):   # itself, no such partition or layer
        req = pb.ExchangeRequest(lookup_version=target.dep.table.version, pass_id="x", phase="fwd", layer=layer,
                                 source=source, tensor=to_tensor(np.zeros((1, 1), np.float32)))
        assert refused(peer.Exchange, req, timeout=30).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_server_caps_a_pass_deadline_whatever_the_caller_asks(tmp_path):
    # A pass that this partition alone runs waits for peers that never send: it ends at the
    # server's max_pass_seconds (here 2 s), not at the caller's hour.
    with Cluster(tmp_path, 2, Distribution("balanced"), limits=ServerLimits(max_pass_seconds=2.0)) as cluster:
        x, _ = batch(0)
        req = pb.PassRequest(lookup_version=cluster.table.version, pass_id=uuid.uuid4().hex, inputs=to_tensor(x))
        err = refused(cluster.stub(0).RunPass, req, timeout=3600)
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # the server's bound, not the client's
        assert re.search(r"timed out after (1\.9\d*|2(\.0\d*)?)s", err.details()), err.details()
        assert cluster.servers[0].mailbox.pending() == []


def test_a_dead_trainers_session_lapses_after_the_lease_and_only_then(tmp_path):
    x, y = batch(0)
    with Cluster(tmp_path, 2, Distribution("balanced"), limits=ServerLimits(training_lease_seconds=1.0)) as cluster:
        first, second = cluster.driver(), cluster.driver()
        first.step(x, y)                      # then "dies" without closing its session
        with pytest.raises(DriverError) as info:
            second.open_training(OptimizerConfig(), wait=0.0)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and info.value.reason == reasons.TRAINING_SESSION
        second.step(x, y)                     # waits until the first session has been idle 1 s
        with pytest.raises(DriverError) as info:
            first.step(x, y)                  # the first trainer's session is gone: refused, nothing applied
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
