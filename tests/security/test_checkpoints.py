"""Attacks on checkpoints (issue 10, item 4), replayed against partition servers on loopback.

A stray client that can reach the peer port calls ``Checkpoint`` with sequences and tokens
of its own; a second trainer races the real one; someone swaps a shard on the volume for
another of the same size. Each test asserts the fix: nothing is written, later legitimate
checkpoints still work, every committed sequence is committed once, and a shard that does not
match its commit record is never loaded. Loops are bounded and every call has a deadline.
These checks hold without peer authentication (another layer of the same issue).
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import asdict

import grpc
import numpy as np
import pytest

from partition_server.api.distributor import Distribution
from partition_server.api.protos import mpnn_pb2 as pb
from partition_server.client.driver import DriverError
from partition_server.engine import OptimizerConfig
from partition_server.storage.schema import MAX_SEQUENCE
from partition_server.storage.store import ModelStore
from tests.support.dataplane import MODEL, TOL, Cluster, batch

SGD = OptimizerConfig("sgd", 0.05, momentum=0.9)
DEADLINE = 10  # seconds, per call
STRAY_CALLS = 50


def tree(root):
    """Every path under ``root`` with its size: what a stray call must leave unchanged."""
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


def stray_checkpoint(cluster, partition, **fields) -> grpc.StatusCode:
    """A Checkpoint call from a client that holds no reservation; returns its status code."""
    request = pb.CheckpointRequest(lookup_version=cluster.table.version, **fields)
    with pytest.raises(grpc.RpcError) as info:
        cluster.stub(partition).Checkpoint(request, timeout=DEADLINE)
    return info.value.code()


def train_a_little(driver, seed):
    x, y = batch(seed)
    driver.step(x, y, SGD)


@pytest.fixture
def cluster(tmp_path):
    with Cluster(tmp_path, 3, Distribution("balanced")) as c:
        yield c


def test_a_stray_checkpoint_at_the_last_sequence_writes_nothing_and_later_checkpoints_work(cluster):
    """Before: a shard appeared under 999999999999 and every later checkpoint failed
    (FAILED_PRECONDITION: the next sequence was out of range)."""
    store = ModelStore(cluster.model_dir)
    driver = cluster.driver()
    first = driver.checkpoint(store, MODEL, {"optimizer": asdict(SGD)}, run_id="run-a")
    before = tree(cluster.model_dir)
    for partition in range(3):
        assert stray_checkpoint(cluster, partition, sequence=MAX_SEQUENCE) == grpc.StatusCode.INVALID_ARGUMENT
        code = stray_checkpoint(cluster, partition, sequence=MAX_SEQUENCE, run_id="run-a",
                                reservation_token=secrets.token_hex(32))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        for absurd in (MAX_SEQUENCE + 1, 2**62, -1):
            code = stray_checkpoint(cluster, partition, sequence=absurd, run_id="run-a",
                                    reservation_token=secrets.token_hex(32))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert tree(cluster.model_dir) == before
    train_a_little(driver, 1)
    second = driver.checkpoint(store, MODEL, {"optimizer": asdict(SGD)}, run_id="run-a")
    assert second.sequence == first.sequence + 1 and store.latest().sequence == second.sequence


def test_repeated_stray_checkpoints_cannot_fill_the_disk(cluster):
    """Before: every call left a shard in a new uncommitted directory, never pruned."""
    store = ModelStore(cluster.model_dir)
    cluster.driver().checkpoint(store, MODEL, {}, run_id="run-a")
    before = tree(cluster.model_dir)
    rng = np.random.default_rng(0)
    for i in range(STRAY_CALLS):
        sequence = int(rng.integers(0, MAX_SEQUENCE + 1))
        code = stray_checkpoint(cluster, i % 3, sequence=sequence, run_id=f"stray-{i}",
                                reservation_token=secrets.token_hex(32))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert tree(cluster.model_dir) == before


def test_a_guessed_token_for_the_reserved_sequence_is_permission_denied(cluster):
    store = ModelStore(cluster.model_dir)
    reservation = store.reserve(run_id="run-a")
    directory = store.sequence_dir(reservation.sequence)
    for run_id, token in (("run-a", secrets.token_hex(32)), ("run-b", reservation.token)):
        code = stray_checkpoint(cluster, 0, sequence=reservation.sequence, run_id=run_id, reservation_token=token)
        assert code == grpc.StatusCode.PERMISSION_DENIED
    assert [p.name for p in directory.iterdir()] == ["reservation.json"]
    # The real trainer's request for the same reservation still writes.
    reply = cluster.stub(0).Checkpoint(pb.CheckpointRequest(
        lookup_version=cluster.table.version, sequence=reservation.sequence, run_id=reservation.run_id,
        reservation_token=reservation.token), timeout=DEADLINE)
    assert '"partition": 0' in reply.shard_json
    assert (directory / "shard-00000.safetensors").is_file()


def test_a_forged_shard_of_the_same_size_is_never_loaded(cluster):
    """Before: the swapped shard (same size, other weights) loaded silently."""
    store = ModelStore(cluster.model_dir)
    driver = cluster.driver()
    x_probe, _ = batch(99)
    train_a_little(driver, 2)
    good = driver.checkpoint(store, MODEL, {"optimizer": asdict(SGD)}, run_id="run-a")
    at_good, _, _ = driver.step(x_probe)
    train_a_little(driver, 3)
    newer = driver.checkpoint(store, MODEL, {"optimizer": asdict(SGD)}, run_id="run-a")
    at_newer, _, _ = driver.step(x_probe)
    assert not np.allclose(at_good, at_newer, atol=1e-6)

    shard = newer.path / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-8:] = np.full(2, 7.0, np.float32).tobytes()  # other weights; same size, header intact
    shard.write_bytes(bytes(raw))
    replies = driver.reload()
    assert [r.checkpoint_sequence for r in replies] == [good.sequence] * 3
    out, _, _ = driver.step(x_probe)
    np.testing.assert_allclose(out, at_good, **TOL)


def test_a_superseded_trainer_writes_nothing_and_the_newer_one_commits(cluster):
    """Two trainers on one network, deterministic: A reserves, B reserves and checkpoints, then A's
    servers are asked to write. Exactly one commits; A's sequence never gets a shard."""
    store = ModelStore(cluster.model_dir)
    driver_a, driver_b = cluster.driver(), cluster.driver()
    a = store.reserve(run_id="run-a")
    committed = driver_b.checkpoint(store, MODEL, {}, run_id="run-b")
    assert committed.sequence == a.sequence + 1
    request = pb.CheckpointRequest(lookup_version=cluster.table.version, sequence=a.sequence, run_id=a.run_id,
                                   reservation_token=a.token)
    with pytest.raises(DriverError) as info:
        driver_a._all("Checkpoint", [request] * 3)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "superseded" in str(info.value)
    assert [p.name for p in store.sequence_dir(a.sequence).iterdir()] == ["reservation.json"]
    assert store.sequences() == [committed.sequence]
    assert store.latest().sequence == committed.sequence


def test_two_trainers_racing_commit_each_sequence_once_and_only_intact_checkpoints_load(cluster):
    """Not deterministic in who wins, but every interleaving must satisfy the assertions."""
    store = ModelStore(cluster.model_dir)
    drivers = {"run-a": cluster.driver(), "run-b": cluster.driver()}
    results: dict[str, list] = {run: [] for run in drivers}
    barrier = threading.Barrier(2)

    def trainer(run):
        for _ in range(3):
            barrier.wait(timeout=60)
            try:
                results[run].append(drivers[run].checkpoint(store, MODEL, {"run_id": run}, run_id=run).sequence)
            except DriverError as e:
                assert e.code == grpc.StatusCode.FAILED_PRECONDITION, e
                results[run].append(None)

    threads = [threading.Thread(target=trainer, args=(run,)) for run in drivers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    won = [s for seqs in results.values() for s in seqs if s is not None]
    assert len(won) >= 3  # of each pair of racing reservations, the newer one is never superseded
    assert len(won) == len(set(won)) and sorted(won) == store.sequences()
    for sequence in won:
        ckpt = store.get(sequence)  # every shard matches the record
        run = next(r for r, seqs in results.items() if sequence in seqs)
        assert ckpt.meta["run_id"] == run
    replies = drivers["run-a"].reload()
    assert {r.checkpoint_sequence for r in replies} == {max(won)}
