"""The checkpoint store: layout, commit record, coverage, reads under another assignment,
torn and dead writers, PyTorch import/export, and checkpoints written before the rename."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from partition_server.storage.store import (
    CHECKPOINT_SCHEMA,
    COMMIT_RECORD,
    LEGACY_CHECKPOINT_SCHEMA,
    LEGACY_COMMIT_RECORD,
    Checkpoint,
    CheckpointNotFoundError,
    ModelStore,
    Reservation,
    ReservationError,
    ShardInfo,
    StoreError,
    read_torch_rows,
)
from partition_server.storage.reservation import create_reservation, has_reservation, read_reservation
from tests.support import legacy_checkpoint as legacy

NETWORK = {"inputs": 6, "layers": [{"units": 10, "activation": "relu"},
                                   {"units": 7, "activation": "relu"},
                                   {"units": 3, "activation": "softmax"}]}
UNITS = [10, 7, 3]
INPUTS = [6, 10, 7]

# Four partitions, interleaved ranges (not the balanced cut) so that reloading
# under another assignment has to stitch rows from several shards.
FOUR = {
    0: {0: [(0, 2), (8, 10)], 1: [(0, 1)], 2: [(0, 1)]},
    1: {0: [(2, 5)], 1: [(1, 4)]},
    2: {0: [(5, 6)], 1: [(4, 5)], 2: [(1, 3)]},
    3: {0: [(6, 8)], 1: [(5, 7)]},
}
# Two partitions, whole layers.
TWO = {0: {0: [(0, 10)]}, 1: {1: [(0, 7)], 2: [(0, 3)]}}


def full_model(seed, momentum=True):
    """layer -> name -> whole-layer array, the single-process truth."""
    rng = np.random.default_rng(seed)
    model = {}
    for k, (units, inputs) in enumerate(zip(UNITS, INPUTS)):
        model[k] = {"weight": rng.standard_normal((units, inputs)).astype(np.float32),
                    "bias": rng.standard_normal(units).astype(np.float32)}
        if momentum:
            model[k]["weight.momentum"] = rng.standard_normal((units, inputs)).astype(np.float32)
            model[k]["bias.momentum"] = rng.standard_normal(units).astype(np.float32)
    return model


def rows_of(array, ranges):
    return np.concatenate([array[s:e] for s, e in ranges])


def res(store, sequence, run_id="test"):
    """The reservation of ``sequence``: the one on disk, else a new one for exactly that sequence."""
    directory = store.sequence_dir(sequence)
    if has_reservation(directory):
        return read_reservation(directory, sequence)
    reservation = create_reservation(store.checkpoints_dir, sequence, run_id=run_id)
    assert reservation.sequence == sequence
    return reservation


def write_all(store, sequence, model, assignment, meta=None, commit=True):
    reservation = res(store, sequence)
    infos = []
    for partition, owned in assignment.items():
        layers = {k: {n: rows_of(a, owned[k]) for n, a in model[k].items()} for k in owned}
        infos.append(store.write_shard(reservation, partition=partition, layers=layers, ranges=owned))
    if commit:
        return store.commit(reservation, infos, network=NETWORK, meta=meta), infos
    return None, infos


def test_layout_and_commit_record(tmp_path):
    store = ModelStore(tmp_path)
    ckpt, infos = write_all(store, 5, full_model(0), FOUR, meta={"lookupVersion": "sha256:ab", "loss": 0.5})
    sequence_dir = tmp_path / "checkpoints" / "000000000005"
    assert sorted(os.listdir(sequence_dir)) == ["commit.json", "reservation.json"] + [f"shard-{p:05d}.safetensors" for p in range(4)]
    record = json.loads((sequence_dir / "commit.json").read_text())
    assert COMMIT_RECORD == "commit.json"
    assert record["apiVersion"] == CHECKPOINT_SCHEMA == "mpnn.dev/checkpoint/v2"
    assert record["sequence"] == 5 and "step" not in record and record["network"] == NETWORK
    assert record["meta"] == {"lookupVersion": "sha256:ab", "loss": 0.5}
    assert [s["partition"] for s in record["shards"]] == [0, 1, 2, 3]
    assert record["shards"][0]["layers"][0]["ranges"] == [[0, 2], [8, 10]]
    assert len(record["shards"][0]["sha256"]) == 64
    assert ckpt.sequence == 5 and ckpt.schema == CHECKPOINT_SCHEMA and ckpt.record_path == sequence_dir / "commit.json"
    # ShardInfo survives JSON.
    assert ShardInfo.from_dict(json.loads(json.dumps(infos[2].to_dict()))) == infos[2]
    # Shard keys are layers.{k}.{name}, holding only the partition's rows.
    with safe_open(str(sequence_dir / "shard-00001.safetensors"), framework="numpy") as f:
        assert sorted(f.keys()) == ["layers.0.bias", "layers.0.bias.momentum", "layers.0.weight",
                                    "layers.0.weight.momentum", "layers.1.bias", "layers.1.bias.momentum",
                                    "layers.1.weight", "layers.1.weight.momentum"]
        assert list(f.get_slice("layers.0.weight").get_shape()) == [3, 6]
        assert f.metadata()["sequence"] == "5" and "step" not in f.metadata()
    ckpt.verify()


def test_round_trip_four_partitions(tmp_path):
    store = ModelStore(tmp_path)
    model = full_model(1)
    write_all(store, 1, model, FOUR)
    ckpt = store.latest()
    assert ckpt is not None and ckpt.sequence == 1
    for partition, owned in FOUR.items():
        for k, ranges in owned.items():
            for name in model[k]:
                np.testing.assert_array_equal(ckpt.read_rows(k, name, ranges), rows_of(model[k][name], ranges))
    for k in range(3):
        np.testing.assert_array_equal(ckpt.read_layer(k, "weight"), model[k]["weight"])
        assert ckpt.tensor_names(k) == ["bias", "bias.momentum", "weight", "weight.momentum"]


def test_reload_under_different_assignment(tmp_path):
    store = ModelStore(tmp_path)
    model = full_model(2)
    write_all(store, 3, model, FOUR)
    ckpt = store.get(3)
    for partition, owned in TWO.items():
        for k, ranges in owned.items():
            for name in ("weight", "bias", "weight.momentum"):
                got = ckpt.read_rows(k, name, ranges)
                np.testing.assert_array_equal(got, rows_of(model[k][name], ranges))
    # Arbitrary ranges straddling shard boundaries, in the requested order.
    got = ckpt.read_rows(0, "weight", [(1, 3), (4, 9)])
    np.testing.assert_array_equal(got, np.concatenate([model[0]["weight"][1:3], model[0]["weight"][4:9]]))
    assert ckpt.read_rows(2, "bias", []).shape == (0,)

    # And back: a checkpoint written under TWO reloads under FOUR.
    model2 = full_model(3)
    write_all(store, 4, model2, TWO)
    latest = store.latest()
    assert latest.sequence == 4
    for partition, owned in FOUR.items():
        for k, ranges in owned.items():
            np.testing.assert_array_equal(latest.read_rows(k, "weight", ranges), rows_of(model2[k]["weight"], ranges))


def test_missing_optimizer_state_is_a_key_error(tmp_path):
    store = ModelStore(tmp_path)
    write_all(store, 0, full_model(4, momentum=False), TWO)
    ckpt = store.latest()
    assert ckpt.has(1, "weight") and not ckpt.has(1, "weight.momentum")
    with pytest.raises(KeyError, match="no tensor 'weight.momentum' for layer 1"):
        ckpt.read_rows(1, "weight.momentum", [(0, 7)])
    with pytest.raises(StoreError, match="exceeds the layer's 7 units"):
        ckpt.read_rows(1, "weight", [(0, 8)])
    with pytest.raises(StoreError, match="layer must be in 0..2"):
        ckpt.read_rows(3, "weight", [(0, 1)])


def test_writer_dies_before_commit_record(tmp_path):
    store = ModelStore(tmp_path)
    model = full_model(5)
    write_all(store, 10, model, FOUR)
    # Sequence 20: every shard written, but nobody committed.
    write_all(store, 20, full_model(6), FOUR, commit=False)
    # Sequence 30: a commit record write interrupted half-way (only its temp file exists).
    write_all(store, 30, full_model(7), TWO, commit=False)
    (tmp_path / "checkpoints/000000000030/.commit.json.x1y2.tmp").write_text('{"apiVersion": "mpnn.dev/chec')
    # Sequence 40: a garbage commit.json (not JSON) is also no checkpoint.
    (tmp_path / "checkpoints/000000000040").mkdir()
    (tmp_path / "checkpoints/000000000040/commit.json").write_text("{")

    ckpt = store.latest()
    assert ckpt.sequence == 10
    np.testing.assert_array_equal(ckpt.read_layer(1, "bias"), model[1]["bias"])
    assert store.sequences() == [10, 40]
    with pytest.raises(CheckpointNotFoundError, match="checkpoint 20"):
        store.get(20)
    with pytest.raises(StoreError, match="not valid JSON"):
        store.get(40)
    # The uncommitted directories are left in place.
    assert (tmp_path / "checkpoints/000000000020/shard-00003.safetensors").exists()


def test_empty_store(tmp_path):
    store = ModelStore(tmp_path / "nothing-here")
    assert store.latest() is None and store.sequences() == []
    with pytest.raises(CheckpointNotFoundError):
        store.get(0)


@pytest.mark.parametrize(
    "assignment,message",
    [
        # neuron 0:9 owned by nobody
        ({0: {0: [(0, 9)], 1: [(0, 7)], 2: [(0, 3)]}}, "neurons 0:9 owned by no partition"),
        # neurons 1:3-4 owned twice
        ({0: {0: [(0, 10)], 1: [(0, 5)]}, 1: {1: [(3, 7)], 2: [(0, 3)]}}, "neurons 1:3-4 owned twice"),
        # layer 2 missing entirely
        ({0: {0: [(0, 10)], 1: [(0, 7)]}}, "neurons 2:0-2 owned by no partition"),
    ],
)
def test_commit_refuses_gaps_and_overlaps(tmp_path, assignment, message):
    store = ModelStore(tmp_path)
    good = full_model(8)
    write_all(store, 1, good, TWO)
    with pytest.raises(StoreError, match=message):
        write_all(store, 2, full_model(9), assignment)
    assert not (tmp_path / "checkpoints/000000000002/commit.json").exists()
    latest = store.latest()
    assert latest.sequence == 1
    np.testing.assert_array_equal(latest.read_layer(0, "weight"), good[0]["weight"])


def test_commit_refuses_other_inconsistencies(tmp_path):
    store = ModelStore(tmp_path)
    model = full_model(10)
    _, infos = write_all(store, 1, model, TWO, commit=False)
    with pytest.raises(StoreError, match=r"network.layers\[1\].units"):
        store.commit(res(store, 1), infos, network={"inputs": 6, "layers": [{"units": 10}, {"units": 0}, {"units": 3}]})
    with pytest.raises(StoreError, match=r"layer 0 weight has shape \[10, 6\], expected \[10, 5\]"):
        store.commit(res(store, 1), infos, network={"inputs": 5, "layers": NETWORK["layers"]})
    with pytest.raises(StoreError, match="JSON-serializable"):
        store.commit(res(store, 1), infos, network=NETWORK, meta={"bad": object()})
    with pytest.raises(StoreError, match="partition.*more than one shard"):
        store.commit(res(store, 1), [infos[0], infos[0]], network=NETWORK)
    os.remove(tmp_path / "checkpoints/000000000001/shard-00001.safetensors")
    with pytest.raises(StoreError, match="shard-00001.safetensors of partition 1 does not exist"):
        store.commit(res(store, 1), infos, network=NETWORK)
    assert store.latest() is None


def test_commit_refuses_inconsistent_optimizer_state(tmp_path):
    store = ModelStore(tmp_path)
    model = full_model(11)
    infos = [store.write_shard(res(store, 1), partition=0, layers={0: {n: model[0][n] for n in ("weight", "bias")}},
                               ranges={0: [(0, 10)]}),
             store.write_shard(res(store, 1), partition=1, layers={k: model[k] for k in (1, 2)}, ranges=TWO[1])]
    # Layers 1 and 2 have momentum, layer 0 not: fine, state is per layer.
    ckpt = store.commit(res(store, 1), infos, network=NETWORK)
    assert ckpt.has(2, "bias.momentum") and not ckpt.has(0, "bias.momentum")

    split = {0: {0: [(0, 5)]}, 1: {0: [(5, 10)], 1: [(0, 7)], 2: [(0, 3)]}}
    infos = [store.write_shard(res(store, 2), partition=0, layers={0: {n: model[0][n][:5] for n in ("weight", "bias")}},
                               ranges=split[0]),
             store.write_shard(res(store, 2), partition=1,
                               layers={0: {n: a[5:] for n, a in model[0].items()}, 1: model[1], 2: model[2]},
                               ranges=split[1])]
    with pytest.raises(StoreError, match="layer 0 tensors differ between shards"):
        store.commit(res(store, 2), infos, network=NETWORK)


def test_committed_checkpoints_are_immutable(tmp_path):
    store = ModelStore(tmp_path)
    _, infos = write_all(store, 1, full_model(12), TWO)
    with pytest.raises(StoreError, match="already committed"):
        store.write_shard(res(store, 1), partition=0, layers={0: full_model(13)[0]}, ranges={0: [(0, 10)]})
    with pytest.raises(StoreError, match="already committed"):
        store.commit(res(store, 1), infos, network=NETWORK)


def test_write_shard_shape_errors_name_the_field(tmp_path):
    store = ModelStore(tmp_path)
    reservation = store.reserve(run_id="test")
    w, b = np.zeros((4, 6), np.float32), np.zeros(4, np.float32)
    with pytest.raises(StoreError, match=r"layers\[0\]\['bias'\] has shape \[4\]: first dimension must be 5"):
        store.write_shard(reservation, partition=0, layers={0: {"weight": np.zeros((5, 6), np.float32), "bias": b}},
                          ranges={0: [(0, 5)]})
    with pytest.raises(StoreError, match=r"layers\[0\]\['weight.momentum'\] has shape \[3, 6\]"):
        store.write_shard(reservation, partition=0, layers={0: {"weight": w, "bias": b, "weight.momentum": w[:3]}},
                          ranges={0: [(0, 4)]})
    with pytest.raises(StoreError, match=r"layers\[0\] has no 'bias'"):
        store.write_shard(reservation, partition=0, layers={0: {"weight": w}}, ranges={0: [(0, 4)]})
    with pytest.raises(StoreError, match=r"layers\[0\]\['weight'\] must be a 2-D array"):
        store.write_shard(reservation, partition=0, layers={0: {"weight": b, "bias": b}}, ranges={0: [(0, 4)]})
    with pytest.raises(StoreError, match=r"ranges\[0\]\[1\] = \(2, 4\) overlaps"):
        store.write_shard(reservation, partition=0, layers={0: {"weight": w, "bias": b}}, ranges={0: [(0, 3), (2, 4)]})
    with pytest.raises(StoreError, match=r"ranges\[0\]\[0\] = \(3, 3\) is empty"):
        store.write_shard(reservation, partition=0, layers={0: {"weight": w, "bias": b}}, ranges={0: [(3, 3)]})
    with pytest.raises(StoreError, match=r"layers has layer keys \[0\] but ranges has \[0, 1\]"):
        store.write_shard(reservation, partition=0, layers={0: {"weight": w, "bias": b}}, ranges={0: [(0, 4)], 1: [(0, 1)]})
    with pytest.raises(StoreError, match="sequence must be in 0..999999999999, got -1"):
        Reservation.of(sequence=-1, run_id="test", token=reservation.token)
    # Nothing but the reservation was left behind by the refused writes.
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["000000000001", "checkpoints", "reservation.json"]


def test_torch_export_import_round_trip(tmp_path):
    store = ModelStore(tmp_path / "store")
    model = full_model(14)
    ckpt, _ = write_all(store, 7, model, FOUR)
    out = ckpt.export_torch(tmp_path / "export" / "model.safetensors")
    with safe_open(str(out), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(f"layers.{k}.{n}" for k in range(3) for n in ("weight", "bias"))
        for k in range(3):
            np.testing.assert_array_equal(f.get_tensor(f"layers.{k}.weight"), model[k]["weight"])
            assert f.get_tensor(f"layers.{k}.weight").shape == (UNITS[k], INPUTS[k])
    assert not [p for p in out.parent.iterdir() if p.name != "model.safetensors"]  # no temp files left

    for k in range(3):
        for ranges in ([(0, UNITS[k])], [(1, 2)], FOUR[2].get(k, [(0, 1)])):
            w, b = read_torch_rows(out, k, ranges, expect_inputs=INPUTS[k], expect_units=UNITS[k])
            assert w.dtype == np.float32 and b.dtype == np.float32
            np.testing.assert_array_equal(w, rows_of(model[k]["weight"], ranges))
            np.testing.assert_array_equal(b, rows_of(model[k]["bias"], ranges))


def test_torch_import_errors_name_the_key(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"layers.0.weight": np.zeros((4, 3), np.float64), "layers.0.bias": np.ones(4, np.float16),
               "layers.1.weight": np.zeros((2, 4), np.int32), "layers.1.bias": np.zeros(2, np.float32)}, str(path))
    w, b = read_torch_rows(path, 0, [(1, 3)], expect_inputs=3, expect_units=4)
    assert w.dtype == b.dtype == np.float32 and w.shape == (2, 3) and b.tolist() == [1.0, 1.0]
    with pytest.raises(StoreError, match=r"layers.0.weight has shape \[4, 3\], the network needs \[4, 5\]"):
        read_torch_rows(path, 0, [(0, 4)], expect_inputs=5, expect_units=4)
    with pytest.raises(StoreError, match=r"layers.0.weight has shape \[4, 3\], the network needs \[6, 3\]"):
        read_torch_rows(path, 0, [(0, 4)], expect_inputs=3, expect_units=6)
    with pytest.raises(StoreError, match="key layers.2.weight is missing"):
        read_torch_rows(path, 2, [(0, 1)], expect_inputs=2, expect_units=1)
    with pytest.raises(StoreError, match="layers.1.weight has dtype I32"):
        read_torch_rows(path, 1, [(0, 2)], expect_inputs=4, expect_units=2)
    with pytest.raises(StoreError, match="exceeds the layer's 4 units"):
        read_torch_rows(path, 0, [(0, 5)], expect_inputs=3, expect_units=4)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(StoreError, match="junk.safetensors: cannot open"):
        read_torch_rows(tmp_path / "junk.safetensors", 0, [(0, 1)], expect_inputs=3, expect_units=4)


def test_verify_detects_tampering(tmp_path):
    store = ModelStore(tmp_path)
    ckpt, _ = write_all(store, 1, full_model(15), TWO)
    shard = tmp_path / "checkpoints/000000000001/shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="shard-00000.safetensors sha256"):
        ckpt.verify()


def test_prune_keeps_newest_and_latest(tmp_path):
    store = ModelStore(tmp_path)
    for sequence in (1, 2, 3, 4):
        write_all(store, sequence, full_model(sequence), TWO)
    write_all(store, 5, full_model(5), TWO, commit=False)
    assert store.prune(keep=2) == [1, 2]
    assert store.sequences() == [3, 4]
    assert not (tmp_path / "checkpoints/000000000001").exists()
    assert (tmp_path / "checkpoints/000000000005").exists()  # uncommitted dirs are left alone
    # A corrupt newest commit record: the latest loadable one (4) must survive keep=1.
    (tmp_path / "checkpoints/000000000006").mkdir()
    (tmp_path / "checkpoints/000000000006/commit.json").write_text("nope")
    assert store.latest().sequence == 4
    assert store.prune(keep=1) == [3]
    assert store.latest().sequence == 4
    with pytest.raises(StoreError, match="keep must be in 1"):
        store.prune(keep=0)


def test_next_sequence_skips_torn_and_dead_directories(tmp_path):
    store = ModelStore(tmp_path)
    assert store.next_sequence() == 1
    write_all(store, 1, full_model(1), FOUR)
    write_all(store, 2, full_model(2), FOUR, commit=False)   # a writer died before the commit record
    (tmp_path / "checkpoints/000000000003").mkdir()
    (tmp_path / "checkpoints/000000000003/commit.json").write_text("{")  # a torn commit record
    assert store.latest().sequence == 1
    assert store.next_sequence() == 4
    model = full_model(4)
    write_all(store, store.next_sequence(), model, TWO)
    assert store.latest().sequence == 4
    np.testing.assert_array_equal(store.latest().read_layer(0, "weight"), model[0]["weight"])


def test_a_truncated_shard_makes_the_checkpoint_unloadable_and_the_previous_one_loads(tmp_path):
    store = ModelStore(tmp_path)
    older = full_model(1)
    write_all(store, 1, older, FOUR)
    write_all(store, 2, full_model(2), FOUR)
    shard = tmp_path / "checkpoints/000000000002/shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(StoreError, match="shard-00001.safetensors has 40 bytes, the commit record says"):
        store.get(2)
    assert store.latest().sequence == 1
    np.testing.assert_array_equal(store.latest().read_layer(0, "weight"), older[0]["weight"])


def test_a_corrupt_shard_of_the_right_size_is_a_store_error_naming_the_file(tmp_path):
    store = ModelStore(tmp_path)
    ckpt, _ = write_all(store, 1, full_model(1), FOUR)
    shard = tmp_path / "checkpoints/000000000001/shard-00002.safetensors"
    shard.write_bytes(b"\xff" * shard.stat().st_size)
    with pytest.raises(StoreError, match="cannot read shard .*shard-00002.safetensors"):
        ckpt.read_layer(2, "weight")


def test_a_second_committer_cannot_replace_a_commit_record(tmp_path, monkeypatch):
    store = ModelStore(tmp_path)
    _, infos = write_all(store, 1, full_model(1), FOUR, commit=False)
    first = store.commit(res(store, 1), infos, network=NETWORK, meta={"writer": "a"})
    # The other writer passed the "already committed?" check before the first one wrote.
    monkeypatch.setattr("pathlib.Path.exists", lambda self: False)
    with pytest.raises(StoreError, match="committed by another writer"):
        store.commit(res(store, 1), infos, network=NETWORK, meta={"writer": "b"})
    monkeypatch.undo()
    assert store.get(1).meta == first.meta == {"writer": "a"}


# ---------------------------------------------------------------- checkpoints written before the rename


def test_a_checkpoint_written_before_the_rename_loads_and_counts(tmp_path):
    """The checked-in checkpoint was written by the pre-rename store: ``manifest.json`` (schema
    v1, number under "step") and shards; next to it a dead writer's directory without a record."""
    root = tmp_path / "model"
    shutil.copytree(legacy.DATA, root)
    store = ModelStore(root)
    assert store.sequences() == [legacy.SEQUENCE]
    # The committed one counts; the dead writer's directory does not, but is never reused.
    assert store.next_sequence() == legacy.SEQUENCE + 1
    ckpt = store.latest()
    assert ckpt is not None and ckpt.sequence == legacy.SEQUENCE
    assert ckpt.schema == LEGACY_CHECKPOINT_SCHEMA == "mpnn.dev/checkpoint/v1"
    assert ckpt.record_path.name == LEGACY_COMMIT_RECORD == "manifest.json"
    assert ckpt.network == legacy.NETWORK and ckpt.meta == legacy.META
    ckpt.verify()
    model = legacy.legacy_model()
    for k in range(2):
        assert ckpt.tensor_names(k) == ["bias", "bias.momentum", "weight", "weight.momentum"]
        for name, array in model[k].items():
            np.testing.assert_array_equal(ckpt.read_layer(k, name), array)
    # Read under another assignment than it was written with: rows from both shards.
    np.testing.assert_array_equal(ckpt.read_rows(0, "weight", [(0, 2)]), model[0]["weight"][:2])
    with pytest.raises(CheckpointNotFoundError):
        store.get(legacy.DEAD_SEQUENCE)
    # Exported and re-imported like any checkpoint.
    w, b = read_torch_rows(ckpt.export_torch(tmp_path / "legacy.safetensors"), 1, [(0, 2)],
                           expect_inputs=4, expect_units=2)
    np.testing.assert_array_equal(w, model[1]["weight"])

    # Nothing is written into an old directory: it has no reservation.
    forged = Reservation(legacy.SEQUENCE, "test", "0" * 64)
    with pytest.raises(ReservationError, match=f"sequence {legacy.SEQUENCE} is not reserved"):
        store.write_shard(forged, partition=0, layers={0: model[0], 1: model[1]}, ranges={0: [(0, 4)], 1: [(0, 2)]})
    reservation = store.reserve(run_id="test")
    assert reservation.sequence == legacy.DEAD_SEQUENCE + 1  # the dead writer's directory is stepped over
    shard = store.write_shard(reservation, partition=0, layers={0: model[0], 1: model[1]},
                              ranges={0: [(0, 4)], 1: [(0, 2)]})
    with pytest.raises(ReservationError, match="not reserved"):
        store.commit(forged, [shard], network=legacy.NETWORK)

    # The next checkpoint is written in the new form and is the latest; pruning removes the old one whole.
    newer = store.commit(reservation, [shard], network=legacy.NETWORK)
    assert newer.record_path.name == COMMIT_RECORD and newer.schema == CHECKPOINT_SCHEMA
    assert store.sequences() == [legacy.SEQUENCE, legacy.DEAD_SEQUENCE + 1]
    assert store.latest().sequence == legacy.DEAD_SEQUENCE + 1
    assert store.prune(keep=1) == [legacy.SEQUENCE]
    assert not store.sequence_dir(legacy.SEQUENCE).exists()
    assert store.next_sequence() == legacy.DEAD_SEQUENCE + 2


def test_legacy_and_new_records_are_read_by_their_own_keys(tmp_path):
    store = ModelStore(tmp_path)
    write_all(store, 1, full_model(1), TWO)
    write_all(store, 2, full_model(2), TWO)
    directory = store.sequence_dir(2)
    record = json.loads((directory / COMMIT_RECORD).read_text())
    # A record in the new schema must say "sequence": "step" means the optimizer step only.
    del record["sequence"]
    record["step"] = 2
    (directory / COMMIT_RECORD).write_text(json.dumps(record))
    with pytest.raises(StoreError, match="commit.json: sequence must be an int, got None"):
        store.get(2)
    assert store.latest().sequence == 1
    # The same record in the legacy form, under the legacy name, loads.
    (directory / COMMIT_RECORD).unlink()
    (directory / LEGACY_COMMIT_RECORD).write_text(json.dumps({**record, "apiVersion": LEGACY_CHECKPOINT_SCHEMA}))
    assert store.sequences() == [1, 2] and store.latest().sequence == 2
    assert store.get(2).record_path == directory / LEGACY_COMMIT_RECORD
    # A torn legacy record is skipped like a torn new one.
    (directory / LEGACY_COMMIT_RECORD).write_text("{")
    assert store.latest().sequence == 1 and store.next_sequence() == 3
    with pytest.raises(StoreError, match="apiVersion must be mpnn.dev/checkpoint/v2"):
        Checkpoint(directory, {**record, "apiVersion": "mpnn.dev/checkpoint/v9"})
