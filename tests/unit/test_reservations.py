"""Checkpoint reservations: a sequence is reserved before any shard is written, shards are
written only with the reservation, commit and load check every shard's sha256, stale
uncommitted directories are pruned and never block the next sequence, and of two racing
writers exactly one commits each sequence while the loser's shard never loads."""

import json
import logging
import os
import re
import threading

import numpy as np
import pytest

from partition_server.storage.reservation import RESERVE_ATTEMPTS
from partition_server.storage.schema import MAX_SEQUENCE
from partition_server.storage.store import (
    ForeignReservationError,
    ModelStore,
    Reservation,
    ReservationError,
    StoreError,
)
from tests.unit.test_store import FOUR, NETWORK, TWO, full_model, rows_of


def shard_layers(model, owned):
    return {k: {n: rows_of(a, owned[k]) for n, a in model[k].items()} for k in owned}


def write_shards(store, reservation, model, assignment):
    return [store.write_shard(reservation, partition=p, layers=shard_layers(model, owned), ranges=owned)
            for p, owned in assignment.items()]


def checkpoint(store, model, assignment=TWO, run_id="run-a"):
    reservation = store.reserve(run_id=run_id)
    return store.commit(reservation, write_shards(store, reservation, model, assignment), network=NETWORK)


def tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_reserve_creates_the_directory_and_a_record_naming_the_run_and_a_token(tmp_path):
    store = ModelStore(tmp_path)
    first = store.reserve(run_id="run-a")
    second = store.reserve(run_id="run-a")
    assert (first.sequence, second.sequence) == (1, 2) and first.token != second.token
    record = json.loads((store.sequence_dir(1) / "reservation.json").read_text())
    assert record["apiVersion"] == "mpnn.dev/reservation/v1"
    assert (record["sequence"], record["run"], record["token"]) == (1, "run-a", first.token)
    assert re.fullmatch(r"[0-9a-f]{64}", first.token)
    assert first.token not in repr(first)  # tokens stay out of logs
    assert store.next_sequence() == 3  # reserved sequences count, committed or not


@pytest.mark.parametrize("fields, message", [
    ({"sequence": MAX_SEQUENCE + 1}, "sequence must be in 0..999999999999, got 1000000000000"),
    ({"sequence": True}, "sequence must be an int, got True"),
    ({"run_id": ""}, "run_id must be 1..253 printable characters, got ''"),
    ({"run_id": "a\nb"}, "run_id must be 1..253 printable characters"),
    ({"token": "ab"}, "reservation token must be 64 lowercase hex digits, got '2 characters'"),
    ({"token": "A" * 64}, "reservation token must be 64 lowercase hex digits"),
])
def test_reservation_fields_from_a_request_are_validated(fields, message):
    good = {"sequence": 3, "run_id": "run-a", "token": "0" * 64}
    with pytest.raises(StoreError, match=re.escape(message)):
        Reservation.of(**{**good, **fields})


def test_an_unreserved_sequence_is_refused_and_nothing_is_created(tmp_path):
    store = ModelStore(tmp_path)
    checkpoint(store, full_model(1))
    before = tree(tmp_path)
    model = full_model(2)
    for sequence in (MAX_SEQUENCE, 2, 5):
        stray = Reservation(sequence, "run-a", "0" * 64)
        with pytest.raises(ReservationError, match=f"checkpoint sequence {sequence} is not reserved"):
            store.write_shard(stray, partition=0, layers=shard_layers(model, TWO[0]), ranges=TWO[0])
        with pytest.raises(ReservationError, match="is not reserved"):
            store.check_reservation(stray)
    assert tree(tmp_path) == before
    assert store.next_sequence() == 2
    assert checkpoint(store, model).sequence == 2


def test_another_runs_or_tokens_write_is_permission_denied_and_writes_nothing(tmp_path):
    store = ModelStore(tmp_path)
    mine = store.reserve(run_id="run-a")
    model = full_model(3)
    for forged in (Reservation(mine.sequence, "run-b", mine.token), Reservation(mine.sequence, "run-a", "f" * 64)):
        with pytest.raises(ForeignReservationError, match=f"checkpoint sequence {mine.sequence}"):
            store.write_shard(forged, partition=0, layers=shard_layers(model, TWO[0]), ranges=TWO[0])
    assert os.listdir(store.sequence_dir(mine.sequence)) == ["reservation.json"]
    infos = write_shards(store, mine, model, TWO)
    with pytest.raises(ForeignReservationError, match="reserved by run 'run-a', not 'run-b'"):
        store.commit(Reservation(mine.sequence, "run-b", mine.token), infos, network=NETWORK)
    assert store.latest() is None
    assert store.commit(mine, infos, network=NETWORK).sequence == mine.sequence


def test_a_superseded_reservation_writes_nothing_and_its_shards_never_commit(tmp_path):
    """Two trainers on one network: the one that reserved later wins; the other one's servers refuse."""
    store = ModelStore(tmp_path)
    old = store.reserve(run_id="run-a")
    new = store.reserve(run_id="run-b")
    model_a, model_b = full_model(4), full_model(5)
    with pytest.raises(ReservationError, match=f"sequence {old.sequence} of run 'run-a' is superseded by "
                                               f"sequence {new.sequence}"):
        write_shards(store, old, model_a, TWO)
    assert os.listdir(store.sequence_dir(old.sequence)) == ["reservation.json"]
    committed = store.commit(new, write_shards(store, new, model_b, TWO), network=NETWORK)
    assert store.latest().sequence == committed.sequence == new.sequence
    np.testing.assert_array_equal(store.latest().read_layer(0, "weight"), model_b[0]["weight"])


def test_racing_reservations_get_distinct_sequences(tmp_path, monkeypatch):
    store = ModelStore(tmp_path)
    # Deterministic: both drivers computed the same next sequence before either created it.
    monkeypatch.setattr(ModelStore, "next_sequence", lambda self: 1)
    a, b = store.reserve(run_id="run-a"), store.reserve(run_id="run-b")
    assert (a.sequence, b.sequence) == (1, 2)
    monkeypatch.undo()
    # And with real threads released together: every sequence is reserved exactly once.
    barrier = threading.Barrier(8)
    got: list[Reservation] = []

    def reserve(i):
        barrier.wait()
        got.append(store.reserve(run_id=f"run-{i}"))

    threads = [threading.Thread(target=reserve, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sequences = sorted(r.sequence for r in got)
    assert len(set(sequences)) == 8 and sequences[0] >= 3
    for r in got:
        record = json.loads((store.sequence_dir(r.sequence) / "reservation.json").read_text())
        assert (record["run"], record["token"]) == (r.run_id, r.token)


def test_two_writers_of_one_shard_the_first_wins_and_the_loser_never_commits_or_loads(tmp_path):
    store = ModelStore(tmp_path)
    good = checkpoint(store, full_model(6))
    reservation = store.reserve(run_id="run-a")
    winner, loser = full_model(7), full_model(8)
    infos = write_shards(store, reservation, winner, TWO)
    shard = store.sequence_dir(reservation.sequence) / "shard-00000.safetensors"
    kept = shard.read_bytes()
    with pytest.raises(ReservationError, match="partition 0 already wrote its shard of checkpoint 2"):
        store.write_shard(reservation, partition=0, layers=shard_layers(loser, TWO[0]), ranges=TWO[0])
    assert shard.read_bytes() == kept

    # A loser that slips its same-size shard in by other means before the commit: the commit refuses.
    other = ModelStore(tmp_path / "elsewhere")
    r = other.reserve(run_id="x")
    other.write_shard(r, partition=0, layers=shard_layers(loser, TWO[0]), ranges=TWO[0])
    forged = (other.sequence_dir(r.sequence) / "shard-00000.safetensors").read_bytes()
    assert len(forged) == len(kept) and forged != kept
    shard.write_bytes(forged)
    with pytest.raises(StoreError, match=r"shard-00000.safetensors has sha256 [0-9a-f]{64}, its ShardInfo says"):
        store.commit(reservation, infos, network=NETWORK)
    assert store.latest().sequence == good.sequence
    shard.write_bytes(kept)
    committed = store.commit(reservation, infos, network=NETWORK)
    assert store.latest().sequence == committed.sequence


def test_a_forged_same_size_shard_after_the_commit_is_never_loaded(tmp_path, caplog):
    store = ModelStore(tmp_path)
    good_model = full_model(9)
    good = checkpoint(store, good_model, FOUR)
    newer = checkpoint(store, full_model(10), FOUR)
    shard = newer.path / "shard-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-4:] = bytes(4)  # other weights, same size: the header still parses
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"shard file shard-00001.safetensors has sha256 [0-9a-f]{64}, "
                                         r"the commit record says [0-9a-f]{64}"):
        store.get(newer.sequence)
    with caplog.at_level(logging.WARNING, logger="partition_server.storage.store"):
        latest = store.latest()
    assert latest.sequence == good.sequence
    np.testing.assert_array_equal(latest.read_layer(0, "weight"), good_model[0]["weight"])
    assert f"checkpoint {newer.sequence} under" in caplog.text and "cannot be loaded and is skipped" in caplog.text
    assert "sha256" in caplog.text
    # A checkpoint whose shards are all forged leaves nothing to load.
    shard = good.path / "shard-00002.safetensors"
    shard.write_bytes(b"\0" * shard.stat().st_size)
    assert store.latest() is None


def test_stray_directories_never_block_the_next_sequence(tmp_path):
    store = ModelStore(tmp_path)
    checkpoint(store, full_model(11))
    # What an older server left for a stray Checkpoint(sequence=999999999999): a shard, no reservation.
    stray = store.sequence_dir(MAX_SEQUENCE)
    stray.mkdir()
    (stray / "shard-00000.safetensors").write_bytes(b"x")
    (store.checkpoints_dir / "000000000002").mkdir()  # an abandoned mkdir in the way
    assert store.next_sequence() == 2
    ckpt = checkpoint(store, full_model(12))
    assert ckpt.sequence == 3 and store.latest().sequence == 3
    assert sorted(os.listdir(store.checkpoints_dir / "000000000002")) == []  # stepped over, never adopted


def test_reserve_refuses_past_the_last_sequence_and_after_too_many_leftovers(tmp_path):
    store = ModelStore(tmp_path)
    last = store.sequence_dir(MAX_SEQUENCE)
    last.mkdir(parents=True)
    (last / "reservation.json").write_text("{}")
    with pytest.raises(StoreError, match="the next one, 1000000000000, exceeds 999999999999"):
        store.reserve(run_id="run-a")
    assert sorted(os.listdir(store.checkpoints_dir)) == [last.name]
    other = ModelStore(tmp_path / "other")
    for s in range(1, RESERVE_ATTEMPTS + 1):
        (other.checkpoints_dir / f"{s:012d}").mkdir(parents=True)
    with pytest.raises(StoreError, match="1000 directories from 1 on already exist"):
        other.reserve(run_id="run-a")


def test_prune_stale_removes_old_uncommitted_directories_only(tmp_path):
    store = ModelStore(tmp_path)
    committed = checkpoint(store, full_model(13))
    abandoned = store.reserve(run_id="run-a")
    store.write_shard(abandoned, partition=0, layers=shard_layers(full_model(14), TWO[0]), ranges=TWO[0])
    torn = store.sequence_dir(9)
    torn.mkdir()
    (torn / "commit.json").write_text("{")
    leftover = store.sequence_dir(12)
    leftover.mkdir()
    (leftover / "shard-00000.safetensors").write_bytes(b"x")
    live = store.reserve(run_id="run-b")
    old = 1_000_000.0
    for directory in (store.sequence_dir(abandoned.sequence), leftover):
        for path in [directory, *directory.iterdir()]:
            os.utime(path, (old, old))
    now = old + 3600
    assert store.prune_stale(grace_s=3601, now=now) == []  # within the grace period
    assert store.prune_stale(grace_s=3600, now=now) == [abandoned.sequence, 12]
    assert sorted(os.listdir(store.checkpoints_dir)) == sorted(
        [committed.path.name, torn.name, store.sequence_dir(live.sequence).name])
    assert store.latest().sequence == committed.sequence
    with pytest.raises(StoreError, match="grace_s must be a number of seconds >= 0, got -1"):
        store.prune_stale(grace_s=-1)


def test_commit_refuses_a_shard_named_after_another_partition(tmp_path):
    store = ModelStore(tmp_path)
    reservation = store.reserve(run_id="run-a")
    infos = [i.to_dict() for i in write_shards(store, reservation, full_model(15), TWO)]
    infos[1]["file"] = "shard-00007.safetensors"
    with pytest.raises(StoreError, match="shard of partition 1 names file 'shard-00007.safetensors', "
                                         "expected 'shard-00001.safetensors'"):
        store.commit(reservation, infos, network=NETWORK)
