"""lookup.json (schema mpnn.dev/lookup/v1): shape, content hash, validation, size."""

from __future__ import annotations

import copy
import hashlib
import json
import re

import pytest

from partition_server.api.distributor import Distribution, Range, distribute
from partition_server.api.lookup import (
    CONFIGMAP_LIMIT,
    SCHEMA,
    LookupTable,
    LookupTableError,
    loopback_addresses,
    service_addresses,
)

MiB = 1_048_576


def R(p: int, a: int, b: int) -> Range:
    return Range(p, a, b)


def table(units=(10, 7, 3), P=3, dist=Distribution(), name="digits", namespace="default", port=50051):
    assignment = distribute(list(units), P, dist)
    return LookupTable.build(name, list(units), assignment, service_addresses(name, namespace, P, port))


# --------------------------------------------------------------------------- schema


def test_schema_fields_exactly():
    doc = table().to_dict()
    assert list(doc) == ["apiVersion", "network", "version", "partitions", "layers"]
    assert doc["apiVersion"] == SCHEMA == "mpnn.dev/lookup/v1"
    assert doc["network"] == "digits"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", doc["version"])
    assert doc["partitions"] == [
        {"index": 0, "address": "digits-0.digits.default.svc.cluster.local:50051"},
        {"index": 1, "address": "digits-1.digits.default.svc.cluster.local:50051"},
        {"index": 2, "address": "digits-2.digits.default.svc.cluster.local:50051"},
    ]
    assert doc["layers"] == [
        {"units": 10, "owners": [{"partition": 0, "start": 0, "end": 4},
                                 {"partition": 1, "start": 4, "end": 7},
                                 {"partition": 2, "start": 7, "end": 10}]},
        {"units": 7, "owners": [{"partition": 0, "start": 0, "end": 3},
                                {"partition": 1, "start": 3, "end": 5},
                                {"partition": 2, "start": 5, "end": 7}]},
        {"units": 3, "owners": [{"partition": 0, "start": 0, "end": 1},
                                {"partition": 1, "start": 1, "end": 2},
                                {"partition": 2, "start": 2, "end": 3}]},
    ]
    for layer in doc["layers"]:
        assert set(layer) == {"units", "owners"}
        for o in layer["owners"]:
            assert set(o) == {"partition", "start", "end"}


def test_version_is_sha256_of_canonical_json_of_the_rest():
    doc = table().to_dict()
    body = {k: v for k, v in doc.items() if k != "version"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert doc["version"] == "sha256:" + hashlib.sha256(canonical).hexdigest()


def test_to_json_is_the_dict():
    t = table()
    assert json.loads(t.to_json()) == t.to_dict()
    assert json.loads(t.to_json(indent=None)) == t.to_dict()
    assert t.to_json().endswith("\n")


# --------------------------------------------------------------------------- version


def test_version_stable_for_equal_content():
    a, b = table(), table()
    assert a.version == b.version
    assert a == b
    # key order and formatting of the JSON do not matter
    doc = a.to_dict()
    shuffled = {k: doc[k] for k in reversed(list(doc))}
    shuffled["layers"] = [{"owners": [dict(reversed(list(o.items()))) for o in l["owners"]], "units": l["units"]}
                          for l in doc["layers"]]
    assert LookupTable.from_dict(shuffled).version == a.version


def test_version_independent_of_range_order_and_fragmentation():
    units = [6]
    addrs = ["a:1", "b:1"]
    a = LookupTable.build("n", units, [[R(0, 0, 3), R(1, 3, 6)]], addrs)
    b = LookupTable.build("n", units, [[R(1, 3, 6), R(0, 0, 2), R(0, 2, 3)]], addrs)
    assert a.version == b.version
    assert b.owners(0) == [R(0, 0, 3), R(1, 3, 6)]


def test_version_changes_with_an_address():
    a = table()
    addrs = list(a.addresses)
    addrs[1] = "digits-1.digits.default.svc.cluster.local:50052"
    b = LookupTable.build("digits", a.layer_units, [list(r) for r in a.owners_by_layer], addrs)
    assert b.version != a.version
    assert table(port=50052).version != a.version
    assert table(namespace="prod").version != a.version


def test_version_changes_with_a_range():
    addrs = ["a:1", "b:1"]
    a = LookupTable.build("n", [10, 4], [[R(0, 0, 5), R(1, 5, 10)], [R(0, 0, 4)]], addrs)
    b = LookupTable.build("n", [10, 4], [[R(0, 0, 6), R(1, 6, 10)], [R(0, 0, 4)]], addrs)
    c = LookupTable.build("n", [10, 4], [[R(0, 0, 5), R(1, 5, 10)], [R(1, 0, 4)]], addrs)
    assert len({a.version, b.version, c.version}) == 3


def test_version_changes_with_strategy_outcome():
    assert table(dist=Distribution("count", counts=(10, 7, 3))).version != table().version


# --------------------------------------------------------------------------- accessors


def test_accessors():
    t = table(units=(10, 2), P=3)
    assert t.num_partitions == 3 and t.num_layers == 2
    assert t.owner_of(0, 0) == 0 and t.owner_of(0, 3) == 0 and t.owner_of(0, 4) == 1 and t.owner_of(0, 9) == 2
    assert t.owner_of(1, 1) == 1
    with pytest.raises(IndexError):
        t.owner_of(1, 2)
    assert t.ranges(0, 1) == [R(1, 4, 7)]
    assert t.ranges(1, 2) == []
    assert t.partitions_in_layer(1) == [0, 1]
    assert [t.neuron_count(p) for p in range(3)] == [5, 4, 3]


# --------------------------------------------------------------------------- build / from_dict validation


def test_build_rejects_gap_and_overlap():
    with pytest.raises(LookupTableError) as ei:
        LookupTable.build("n", [6], [[R(0, 0, 2), R(1, 3, 6)]], ["a:1", "b:1"])
    assert ei.value.field == "layers"
    with pytest.raises(LookupTableError) as ei:
        LookupTable.build("n", [6], [[R(0, 0, 4), R(1, 3, 6)]], ["a:1", "b:1"])
    assert ei.value.field == "layers"


def test_build_rejects_owner_without_address():
    with pytest.raises(LookupTableError) as ei:
        LookupTable.build("n", [6], [[R(0, 0, 3), R(2, 3, 6)]], ["a:1", "b:1"])
    assert ei.value.field == "partitions"


def test_round_trip():
    t = table(units=(100, 33, 10), P=7)
    assert LookupTable.from_dict(t.to_dict()) == t
    assert LookupTable.from_dict(json.loads(t.to_json())) == t


def _mutated(fn):
    doc = copy.deepcopy(table().to_dict())
    fn(doc)
    return doc


def test_from_dict_rejects_tampered_version():
    doc = _mutated(lambda d: d.update(version="sha256:" + "0" * 64))
    with pytest.raises(LookupTableError) as ei:
        LookupTable.from_dict(doc)
    assert ei.value.field == "version"


def test_from_dict_rejects_tampered_content():
    # A changed address under the old version: content no longer matches its hash.
    doc = _mutated(lambda d: d["partitions"][0].update(address="evil:1"))
    with pytest.raises(LookupTableError) as ei:
        LookupTable.from_dict(doc)
    assert ei.value.field == "version"


def _move_boundary(d):
    d["layers"][0]["owners"][0]["end"] = 5
    d["layers"][0]["owners"][1]["start"] = 5


def test_from_dict_rejects_moved_range_under_old_version():
    with pytest.raises(LookupTableError) as ei:
        LookupTable.from_dict(_mutated(_move_boundary))
    assert ei.value.field == "version"


@pytest.mark.parametrize("mutate", [
    lambda d: d["layers"][0]["owners"][0].update(end=3),            # gap 0:3
    lambda d: d["layers"][0]["owners"][1].update(start=3),          # overlap 0:3
    lambda d: d["layers"][1]["owners"].pop(),                       # gap at the end
    lambda d: d["layers"][2].update(units=4),                       # units not covered
    lambda d: d["layers"][2]["owners"].append({"partition": 0, "start": 3, "end": 5}),  # outside
])
def test_from_dict_rejects_gaps_and_overlaps(mutate):
    with pytest.raises(LookupTableError) as ei:
        LookupTable.from_dict(_mutated(mutate))
    assert ei.value.field == "layers"


@pytest.mark.parametrize("api", ["mpnn.dev/lookup/v2", "v1", None])
def test_from_dict_rejects_wrong_api_version(api):
    with pytest.raises(LookupTableError) as ei:
        LookupTable.from_dict(_mutated(lambda d: d.update(apiVersion=api)))
    assert ei.value.field == "apiVersion" and ei.value.value == api


def test_from_dict_rejects_missing_api_version():
    with pytest.raises(LookupTableError) as ei:
        LookupTable.from_dict(_mutated(lambda d: d.pop("apiVersion")))
    assert ei.value.field == "apiVersion"


def test_from_dict_rejects_misnumbered_partitions():
    with pytest.raises(LookupTableError) as ei:
        LookupTable.from_dict(_mutated(lambda d: d["partitions"].reverse()))
    assert ei.value.field == "partitions[0].index"


def test_from_dict_rejects_owner_without_address():
    with pytest.raises(LookupTableError) as ei:
        LookupTable.from_dict(_mutated(lambda d: d["partitions"].pop()))
    assert ei.value.field == "partitions"


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("layers"),
    lambda d: d.pop("network"),
    lambda d: d.pop("version"),
    lambda d: d["partitions"][0].pop("address"),
    lambda d: d["layers"][0]["owners"][0].pop("start"),
    lambda d: d["layers"][0].update(units="many"),
])
def test_from_dict_rejects_missing_fields(mutate):
    with pytest.raises(LookupTableError) as ei:
        LookupTable.from_dict(_mutated(mutate))
    assert ei.value.field == "lookup"


def test_from_dict_rejects_non_object():
    with pytest.raises(LookupTableError) as ei:
        LookupTable.from_dict([1, 2])
    assert ei.value.field == "lookup"


# --------------------------------------------------------------------------- load


def test_load_from_file(tmp_path):
    t = table(units=(64, 32, 10), P=4)
    path = tmp_path / "lookup.json"
    path.write_text(t.to_json())
    loaded = LookupTable.load(path)
    assert loaded == t and loaded.version == t.version
    assert LookupTable.load(str(path)) == t


def test_load_missing_or_malformed(tmp_path):
    with pytest.raises(LookupTableError) as ei:
        LookupTable.load(tmp_path / "absent.json")
    assert ei.value.field == "lookup"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LookupTableError) as ei:
        LookupTable.load(bad)
    assert ei.value.field == "lookup"


def test_load_rejects_tampered_file(tmp_path):
    doc = table().to_dict()
    doc["layers"][0]["owners"][0]["end"] = 5
    doc["layers"][0]["owners"][1]["start"] = 5
    path = tmp_path / "lookup.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(LookupTableError) as ei:
        LookupTable.load(path)
    assert ei.value.field == "version"


# --------------------------------------------------------------------------- addresses


def test_service_addresses():
    assert service_addresses("digits", "default", 3, 50051) == [
        "digits-0.digits.default.svc.cluster.local:50051",
        "digits-1.digits.default.svc.cluster.local:50051",
        "digits-2.digits.default.svc.cluster.local:50051",
    ]
    assert service_addresses("net", "ml", 2, 7000, cluster_domain="corp.internal") == [
        "net-0.net.ml.svc.corp.internal:7000",
        "net-1.net.ml.svc.corp.internal:7000",
    ]
    assert service_addresses("net", "ml", 0, 1) == []


def test_loopback_addresses():
    assert loopback_addresses([5000, 5001]) == ["127.0.0.1:5000", "127.0.0.1:5001"]


# --------------------------------------------------------------------------- size


@pytest.mark.parametrize("P", [64, 512])
def test_ten_million_neurons_fit_in_a_configmap(P):
    units = [1_000_000] * 10
    name = "n" * 52  # the longest valid network name, so addresses are as long as they get
    t = LookupTable.build(name, units, distribute(units, P, Distribution()),
                          service_addresses(name, "a-long-namespace-name", P, 50051))
    assert CONFIGMAP_LIMIT == MiB
    for text in (t.to_json(), t.to_json(indent=None)):
        assert len(text.encode()) < MiB
    assert sum(len(t.owners(k)) for k in range(10)) == 10 * P
    assert all(t.neuron_count(p) == 10 * (1_000_000 // P + (p < 1_000_000 % P)) for p in (0, P - 1))
    assert LookupTable.from_dict(json.loads(t.to_json(indent=None))).version == t.version


def test_ten_million_neurons_by_count_fit_in_a_configmap():
    units = [1_000_000] * 10
    counts = tuple([40_000] * 250)
    t = LookupTable.build("big", units, distribute(units, 250, Distribution("count", counts=counts)),
                          service_addresses("big", "default", 250, 50051))
    assert len(t.to_json().encode()) < MiB
