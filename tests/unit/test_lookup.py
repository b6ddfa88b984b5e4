"""lookup.json: schema mpnn.dev/lookup/v2 (written) and v1 (still read): shape, content hash,
validation, gzip, owner resolution, and size at the paper's scale."""

from __future__ import annotations

import base64
import copy
import gzip
import hashlib
import json
import random
import re

import pytest

from partition_server.api.distributor import Distribution, Range, Runs, distribute
from partition_server.api.lookup import (
    COMPRESS_ABOVE,
    CONFIGMAP_LIMIT,
    GZ_KEY,
    KEY,
    SCHEMA,
    SCHEMA_V1,
    SCHEMA_V2,
    LookupTable,
    LookupTableError,
    loopback_addresses,
    read_version,
    service_addresses,
)

MiB = 1_048_576
KiB = 1024


def R(p: int, a: int, b: int) -> Range:
    return Range(p, a, b)


def table(units=(10, 7, 3), P=3, dist=Distribution(), name="digits", namespace="default", port=50051,
          schema=SCHEMA):
    assignment = distribute(list(units), P, dist)
    return LookupTable.build(name, list(units), assignment, service_addresses(name, namespace, P, port), schema)


def big(units, P, dist=Distribution(), name="big"):
    return LookupTable.build(name, units, distribute(units, P, dist), service_addresses(name, "default", P, 50051))


def nbytes(t: LookupTable) -> int:
    return len(t.to_json().encode())


# --------------------------------------------------------------------------- schema v2


def test_schema_fields_exactly():
    doc = table().to_dict()
    assert list(doc) == ["apiVersion", "network", "version", "partitions", "patterns", "layers"]
    assert doc["apiVersion"] == SCHEMA == SCHEMA_V2 == "mpnn.dev/lookup/v2"
    assert doc["network"] == "digits"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", doc["version"])
    assert doc["partitions"] == [
        "digits-0.digits.default.svc.cluster.local:50051",
        "digits-1.digits.default.svc.cluster.local:50051",
        "digits-2.digits.default.svc.cluster.local:50051",
    ]
    # Every balanced layer is the same even cut over 3 partitions: one pattern for all.
    assert doc["patterns"] == [{"even": 3}]
    assert doc["layers"] == {"units": [10, 7, 3], "pattern": [0, 0, 0]}


def test_runs_patterns_are_parallel_arrays_stored_once():
    addrs = ["a:1", "b:1", "c:1"]
    t = LookupTable.build("n", [6, 6, 9, 6], [[R(2, 0, 4), R(0, 4, 6)], [R(2, 0, 4), R(0, 4, 6)],
                                              [R(2, 0, 4), R(0, 4, 9)], [R(1, 0, 6)]], addrs)
    doc = t.to_dict()
    # Layers 0-2 share starts and owners (the end is the layer's units): one pattern.
    assert doc["patterns"] == [{"starts": [0, 4], "owners": [2, 0]}, {"starts": [0], "owners": [1]}]
    assert doc["layers"] == {"units": [6, 6, 9, 6], "pattern": [0, 0, 0, 1]}
    assert t.owners(2) == [R(2, 0, 4), R(0, 4, 9)]
    assert LookupTable.from_dict(doc) == t


def test_even_pattern_is_the_balanced_cut_also_with_fewer_units_than_partitions():
    t = table(units=(8, 2, 3), P=4)
    doc = t.to_dict()
    assert doc["patterns"] == [{"even": 4}, {"even": 2}, {"even": 3}]
    assert t.owners(1) == [R(0, 0, 1), R(1, 1, 2)]
    assert LookupTable.from_dict(doc) == t


def test_version_is_sha256_of_canonical_json_of_the_rest():
    for t in (table(), table(schema=SCHEMA_V1), table(dist=Distribution("count", counts=(12, 5, 3)))):
        doc = t.to_dict()
        body = {k: v for k, v in doc.items() if k != "version"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        assert doc["version"] == "sha256:" + hashlib.sha256(canonical).hexdigest()


def test_to_json_is_the_dict():
    t = table()
    assert json.loads(t.to_json()) == t.to_dict()
    assert json.loads(t.to_json(indent=2)) == t.to_dict()
    assert t.to_json().endswith("\n") and t.to_json(indent=2).endswith("\n")
    assert " " not in t.to_json()


def test_indented_json_keeps_integer_arrays_on_one_line():
    text = table(dist=Distribution("count", counts=(12, 5, 3))).to_json(indent=2)
    assert '"units": [10, 7, 3]' in text
    assert all(len(line) < 200 for line in text.splitlines())


# --------------------------------------------------------------------------- version


def test_version_stable_for_equal_content():
    a, b = table(), table()
    assert a.version == b.version and a == b
    doc = a.to_dict()
    shuffled = {k: doc[k] for k in reversed(list(doc))}  # key order does not matter
    shuffled["layers"] = dict(reversed(list(doc["layers"].items())))
    assert LookupTable.from_dict(shuffled).version == a.version


def test_version_independent_of_range_order_and_fragmentation():
    units, addrs = [6], ["a:1", "b:1"]
    a = LookupTable.build("n", units, [[R(0, 0, 3), R(1, 3, 6)]], addrs)
    b = LookupTable.build("n", units, [[R(1, 3, 6), R(0, 0, 2), R(0, 2, 3)]], addrs)
    c = LookupTable.build("n", units, [Runs(6, [0, 3], [0, 1])], addrs)
    assert a.version == b.version == c.version
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


def test_v1_and_v2_versions_are_each_in_their_own_schema():
    v1, v2 = table(schema=SCHEMA_V1), table()
    assert v1.version != v2.version and v1.schema == SCHEMA_V1
    assert LookupTable.from_dict(v1.to_dict()) == v1


# --------------------------------------------------------------------------- accessors


def test_accessors():
    t = table(units=(10, 2), P=3)
    assert t.num_partitions == 3 and t.num_layers == 2
    assert t.owner_of(0, 0) == 0 and t.owner_of(0, 3) == 0 and t.owner_of(0, 4) == 1 and t.owner_of(0, 9) == 2
    assert t.owner_of(1, 1) == 1
    for layer, unit in ((1, 2), (0, -1), (2, 0)):
        with pytest.raises(IndexError):
            t.owner_of(layer, unit)
    assert t.ranges(0, 1) == [R(1, 4, 7)]
    assert t.ranges(1, 2) == []
    assert t.partitions_in_layer(1) == [0, 1]
    assert [t.neuron_count(p) for p in range(3)] == [5, 4, 3]
    assert t.range_texts(0) == ["0:0-3", "1:0"] and t.range_texts(2) == ["0:7-9"]
    assert isinstance(t.runs(0), Runs) and t.runs(0).units == 10


def test_identical_layers_share_one_runs_object_after_loading():
    t = LookupTable.from_dict(json.loads(big([1000] * 50, 7).to_json()))
    assert len({id(r) for r in t.owners_by_layer}) == 1


# --------------------------------------------------------------------------- build / from_dict validation


def test_build_rejects_gap_and_overlap():
    for ranges in ([R(0, 0, 2), R(1, 3, 6)], [R(0, 0, 4), R(1, 3, 6)]):
        with pytest.raises(LookupTableError) as ei:
            LookupTable.build("n", [6], [ranges], ["a:1", "b:1"])
        assert ei.value.field == "layers"


def test_build_rejects_owner_without_address():
    with pytest.raises(LookupTableError) as ei:
        LookupTable.build("n", [6], [[R(0, 0, 3), R(2, 3, 6)]], ["a:1", "b:1"])
    assert ei.value.field == "partitions"


def test_round_trip():
    for t in (table(units=(100, 33, 10), P=7), table(units=(100, 33, 10), P=7, schema=SCHEMA_V1),
              table(units=(5, 9), P=3, dist=Distribution("ids", ids=(("0:0-1", "1:4-8"), ("0:2-4",), ("1:0-3",))))):
        assert LookupTable.from_dict(t.to_dict()) == t
        assert LookupTable.from_dict(json.loads(t.to_json())) == t
        assert LookupTable.from_dict(json.loads(t.to_json(indent=2))) == t


def _mutated(fn, t=None):
    doc = copy.deepcopy((t or table(dist=Distribution("count", counts=(12, 5, 3)))).to_dict())
    fn(doc)
    return doc


def test_version_is_over_the_canonical_form_not_the_bytes():
    """A document encoded differently (a pattern stored twice) holds the same content: it loads
    under the same version, and is written back canonical."""
    t = table(units=(10, 10, 3, 3), P=2, dist=Distribution("count", counts=(12, 14)))
    doc = copy.deepcopy(t.to_dict())
    assert doc["layers"]["pattern"] == [0, 1, 2, 2] and doc["patterns"][2] == {"starts": [0], "owners": [1]}
    doc["patterns"].append({"starts": [0], "owners": [1]})  # the same as pattern 2
    doc["layers"]["pattern"][3] = 3
    loaded = LookupTable.from_dict(doc)
    assert loaded == t and loaded.to_dict() == t.to_dict()


def test_from_dict_rejects_tampered_version():
    with pytest.raises(LookupTableError) as ei:
        LookupTable.from_dict(_mutated(lambda d: d.update(version="sha256:" + "0" * 64)))
    assert ei.value.field == "version"


@pytest.mark.parametrize("mutate", [
    lambda d: d["partitions"].__setitem__(0, "evil:1"),        # a changed address
    lambda d: d["patterns"][1]["starts"].__setitem__(1, 3),    # a moved boundary
    lambda d: d["patterns"][2]["owners"].__setitem__(0, 1),    # another owner
])
def test_from_dict_rejects_changed_content_under_the_old_version(mutate):
    with pytest.raises(LookupTableError) as ei:
        LookupTable.from_dict(_mutated(mutate))
    assert ei.value.field == "version"


@pytest.mark.parametrize("mutate", [
    lambda d: d["patterns"][1]["starts"].__setitem__(0, 1),          # does not start at 0
    lambda d: d["patterns"][1]["starts"].__setitem__(1, 0),          # not increasing
    lambda d: d["patterns"][1]["starts"].__setitem__(1, 7),          # past the units
    lambda d: d["patterns"][1]["owners"].pop(),                      # arrays of different lengths
    lambda d: d["patterns"][1]["owners"].__setitem__(1, 0),          # unmerged runs of one owner
    lambda d: d["patterns"][1]["owners"].__setitem__(1, -1),         # a negative owner
    lambda d: d["patterns"].__setitem__(0, {"even": 11}),            # even cut over more than the units
    lambda d: d["layers"]["units"].__setitem__(2, 0),                # an empty layer
])
def test_from_dict_rejects_invalid_runs(mutate):
    with pytest.raises(LookupTableError) as ei:
        LookupTable.from_dict(_mutated(mutate))
    assert ei.value.field.startswith("layers")


@pytest.mark.parametrize("api", ["mpnn.dev/lookup/v3", "v2", None])
def test_from_dict_rejects_wrong_api_version(api):
    with pytest.raises(LookupTableError) as ei:
        LookupTable.from_dict(_mutated(lambda d: d.update(apiVersion=api)))
    assert ei.value.field == "apiVersion" and ei.value.value == api


def test_from_dict_rejects_missing_api_version():
    with pytest.raises(LookupTableError) as ei:
        LookupTable.from_dict(_mutated(lambda d: d.pop("apiVersion")))
    assert ei.value.field == "apiVersion"


def test_from_dict_rejects_owner_without_address():
    with pytest.raises(LookupTableError) as ei:
        LookupTable.from_dict(_mutated(lambda d: d["partitions"].pop()))
    assert ei.value.field == "partitions"


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("layers"), "lookup"),
    (lambda d: d.pop("network"), "lookup"),
    (lambda d: d.pop("version"), "lookup"),
    (lambda d: d.pop("patterns"), "lookup"),
    (lambda d: d["layers"].pop("pattern"), "lookup"),
    (lambda d: d["layers"]["units"].__setitem__(0, "many"), "layers.units[0]"),
    (lambda d: d["layers"]["pattern"].__setitem__(0, 7), "layers.pattern[0]"),
    (lambda d: d["layers"]["pattern"].pop(), "layers.pattern"),
    (lambda d: d["partitions"].__setitem__(0, {"index": 0}), "partitions"),
    (lambda d: d["patterns"].__setitem__(0, {"starts": [0]}), "patterns[0]"),
    (lambda d: d["patterns"].append({"even": 2}), "patterns"),  # used by no layer
])
def test_from_dict_rejects_missing_or_mistyped_fields(mutate, field):
    with pytest.raises(LookupTableError) as ei:
        LookupTable.from_dict(_mutated(mutate))
    assert ei.value.field == field


def test_from_dict_rejects_non_object():
    with pytest.raises(LookupTableError) as ei:
        LookupTable.from_dict([1, 2])
    assert ei.value.field == "lookup"


# --------------------------------------------------------------------------- v1 still loads

# A v1 table as the v1 writer published it (digits, 4 partitions, balanced).
V1_DOC = {
    "apiVersion": "mpnn.dev/lookup/v1", "network": "digits",
    "version": "sha256:ec4f8ee7f8e1b2f4cf6f44e5fb5b5c7bc1bd7bc8aee2a1fb77c9c0b5e8dc3c4e",  # replaced below
    "partitions": [{"index": i, "address": f"digits-{i}.digits.default.svc.cluster.local:50052"} for i in range(4)],
    "layers": [{"units": 128, "owners": [{"partition": p, "start": 32 * p, "end": 32 * p + 32} for p in range(4)]},
               {"units": 64, "owners": [{"partition": p, "start": 16 * p, "end": 16 * p + 16} for p in range(4)]},
               {"units": 10, "owners": [{"partition": 0, "start": 0, "end": 3}, {"partition": 1, "start": 3, "end": 6},
                                        {"partition": 2, "start": 6, "end": 8}, {"partition": 3, "start": 8, "end": 10}]}],
}
V1_DOC["version"] = "sha256:" + hashlib.sha256(json.dumps(
    {k: v for k, v in V1_DOC.items() if k != "version"}, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_a_v1_table_still_loads_and_resolves_like_its_v2_form(tmp_path):
    path = tmp_path / "lookup.json"
    path.write_text(json.dumps(V1_DOC, indent=2))
    v1 = LookupTable.load(path)
    assert v1.schema == SCHEMA_V1 and v1.version == V1_DOC["version"] == read_version(path)
    assert v1.to_dict() == V1_DOC  # written back in its own schema, version and all
    v2 = LookupTable.build("digits", [128, 64, 10], distribute([128, 64, 10], 4, Distribution()),
                           service_addresses("digits", "default", 4, 50052))
    assert v2.schema == SCHEMA_V2 and v2.owners_by_layer == v1.owners_by_layer and v2.addresses == v1.addresses
    assert all(v1.owner_of(k, u) == v2.owner_of(k, u) for k, n in enumerate(v1.layer_units) for u in range(n))


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["layers"][0]["owners"][0].update(end=31), "layers"),            # gap
    (lambda d: d["layers"][0]["owners"][1].update(start=31), "layers"),          # overlap
    (lambda d: d["layers"][2].update(units=11), "layers"),                       # units not covered
    (lambda d: d["partitions"].reverse(), "partitions[0].index"),
    (lambda d: d["partitions"].pop(), "partitions"),
    (lambda d: d["layers"][0]["owners"][0].pop("start"), "lookup"),
    (lambda d: d["partitions"][0].update(address="evil:1"), "version"),
])
def test_v1_validation_is_kept(mutate, field):
    doc = copy.deepcopy(V1_DOC)
    mutate(doc)
    with pytest.raises(LookupTableError) as ei:
        LookupTable.from_dict(doc)
    assert ei.value.field == field


def _random_assignment(rng: random.Random, units: list[int], P: int) -> list[list[Range]]:
    out = []
    for n in units:
        cuts = sorted(rng.sample(range(1, n), rng.randint(0, min(n - 1, 12)))) if n > 1 else []
        bounds = [0, *cuts, n]
        out.append([R(rng.randrange(P), a, b) for a, b in zip(bounds, bounds[1:])])
    return out


def test_owner_resolution_is_identical_from_v1_and_v2_tables(tmp_path):
    """Property test over random assignments (random fragments, random owners, shared shapes)."""
    rng = random.Random(14)
    for trial in range(150):
        P = rng.randint(1, 9)
        units = [rng.choice([1, 2, 5, 17, 40, 64]) for _ in range(rng.randint(1, 6))]
        assignment = _random_assignment(rng, units, P)
        if rng.random() < 0.3:  # identical layers, as deep networks have
            units, assignment = units * 3, assignment * 3
        addrs = loopback_addresses(range(5000, 5000 + P))
        tables = {}
        for schema in (SCHEMA_V1, SCHEMA_V2):
            built = LookupTable.build("n", units, assignment, addrs, schema)
            path = tmp_path / f"{trial}-{schema[-2:]}.json"
            path.write_text(built.to_json())
            tables[schema] = LookupTable.load(path)
        v1, v2 = tables[SCHEMA_V1], tables[SCHEMA_V2]
        for k, n in enumerate(units):
            expected = [None] * n
            for r in assignment[k]:
                for u in range(r.start, r.end):
                    expected[u] = r.partition
            assert [v1.owner_of(k, u) for u in range(n)] == expected == [v2.owner_of(k, u) for u in range(n)]
            for p in range(P):
                assert v1.ranges(k, p) == v2.ranges(k, p)
            assert v1.partitions_in_layer(k) == v2.partitions_in_layer(k)
        assert [v1.neuron_count(p) for p in range(P)] == [v2.neuron_count(p) for p in range(P)]
        assert [v1.range_texts(p) for p in range(P)] == [v2.range_texts(p) for p in range(P)]


# --------------------------------------------------------------------------- load, gzip, ConfigMap


def test_load_from_file(tmp_path):
    t = table(units=(64, 32, 10), P=4)
    path = tmp_path / "lookup.json"
    path.write_text(t.to_json())
    loaded = LookupTable.load(path)
    assert loaded == t and loaded.version == t.version
    assert LookupTable.load(str(path)) == t


def test_load_reads_gzip_and_falls_back_to_the_gz_file(tmp_path):
    t = table(units=(64, 32, 10), P=4)
    assert gzip.decompress(t.to_gzip()).decode() == t.to_json()
    assert t.to_gzip() == t.to_gzip()  # reproducible: no timestamp in the header
    gz = tmp_path / "lookup.json.gz"
    gz.write_bytes(t.to_gzip())
    assert LookupTable.load(gz) == t
    # A ConfigMap holding only lookup.json.gz, mounted as a directory: the servers' default
    # --lookup /etc/mpnn/lookup.json finds it.
    assert LookupTable.load(tmp_path / "lookup.json") == t
    assert read_version(tmp_path / "lookup.json") == read_version(gz) == t.version
    # Gzip recognised by content, whatever the name.
    (tmp_path / "other").write_bytes(t.to_gzip())
    assert LookupTable.load(tmp_path / "other") == t
    # Where both exist, the plain file named is read.
    newer = table(units=(64, 32, 10), P=2)
    (tmp_path / "lookup.json").write_text(newer.to_json())
    assert LookupTable.load(tmp_path / "lookup.json") == newer


def test_load_missing_or_malformed(tmp_path):
    with pytest.raises(LookupTableError) as ei:
        LookupTable.load(tmp_path / "absent.json")
    assert ei.value.field == "lookup"
    assert read_version(tmp_path / "absent.json") is None
    for name, content in (("bad.json", b"{not json"), ("bad.json.gz", b"\x1f\x8b garbage")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(LookupTableError) as ei:
            LookupTable.load(tmp_path / name)
        assert ei.value.field == "lookup"
        assert read_version(tmp_path / name) is None


def test_load_rejects_tampered_file(tmp_path):
    doc = table(dist=Distribution("count", counts=(12, 5, 3))).to_dict()
    doc["patterns"][1]["starts"][1] = 3
    path = tmp_path / "lookup.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(LookupTableError) as ei:
        LookupTable.load(path)
    assert ei.value.field == "version"


def test_configmap_entries_plain_while_small_gzip_when_large():
    small = table()
    data, binary = small.configmap_entries()
    assert data == {KEY: small.to_json()} and binary == {}
    assert LookupTable.from_configmap({"data": {**data, "network.json": "{}"}}) == small
    data, binary = small.configmap_entries(compress_above=100)
    assert data == {} and list(binary) == [GZ_KEY]
    assert gzip.decompress(base64.b64decode(binary[GZ_KEY])).decode() == small.to_json()
    assert LookupTable.from_configmap({"data": {"network.json": "{}"}, "binaryData": binary}) == small
    assert COMPRESS_ABOVE <= CONFIGMAP_LIMIT
    with pytest.raises(LookupTableError):
        LookupTable.from_configmap({"data": {"network.json": "{}"}})
    with pytest.raises(LookupTableError):
        LookupTable.from_configmap({"binaryData": {GZ_KEY: "not base64!"}})


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


# --------------------------------------------------------------------------- size: O(spec + P)

# The rows of issue 14 (layers x units, partitions) under balanced; v1 needed 64 KB .. 100 MB.
ISSUE_ROWS = [(10, 1_000_000, 64), (100, 100_000, 100), (256, 1_000, 110), (1_000, 1_000, 256),
              (1_000, 1_000_000, 1_000)]


@pytest.mark.parametrize("layers, units, P", ISSUE_ROWS)
def test_every_row_of_the_issue_fits_in_a_configmap(layers, units, P):
    t = big([units] * layers, P)
    assert CONFIGMAP_LIMIT == MiB
    size = nbytes(t)
    assert size < 128 * KiB < MiB  # the 1B-neuron row included
    addresses = sum(len(a) + 3 for a in t.addresses)
    assert size < addresses + 12 * layers + 1 * KiB  # O(spec + P): addresses, ~2 numbers per layer
    # Range math throughout: answers without per-neuron arrays, even for a billion neurons.
    assert t.neuron_count(P - 1) == layers * (units // P + (P - 1 < units % P))
    assert t.owner_of(layers - 1, units - 1) == P - 1
    assert LookupTable.from_dict(json.loads(t.to_json())).version == t.version


def _strategies(layers: int, units: int, P: int) -> dict[str, Distribution]:
    total = layers * units
    base, extra = divmod(total, P)
    return {
        "balanced": Distribution(),
        "count": Distribution("count", counts=tuple(base + (p < extra) for p in range(P))),
        "percentage": Distribution("percentage", percentages=tuple([100 / P] * P)),
        "layers": Distribution("layers", layers=tuple(tuple(range(p, layers, P)) for p in range(P))),
    }


@pytest.mark.parametrize("strategy", ["balanced", "count", "percentage", "layers"])
def test_size_bound_for_every_range_strategy_on_1000_layers_of_1000_on_256(strategy):
    layers, units, P = 1_000, 1_000, 256
    dist = _strategies(layers, units, P)[strategy]
    t = big([units] * layers, P, dist)
    addresses = sum(len(a) + 3 for a in t.addresses)
    # spec ~ 20 bytes per layer; a table of at most ~2 runs per layer and per partition.
    bound = addresses + 12 * layers + 16 * (layers + P) + 1 * KiB
    assert nbytes(t) < bound < 128 * KiB
    assert sum(t.neuron_count(p) for p in range(P)) == layers * units


def test_a_fragmented_ids_assignment_stays_within_a_constant_factor_of_its_spec():
    rng = random.Random(7)
    units, P = [997, 1000, 503, 1000, 64, 10], 16
    ids: list[list[str]] = [[] for _ in range(P)]
    for k, n in enumerate(units):
        start = 0
        while start < n:
            end = min(n, start + rng.randint(1, 9))
            ids[rng.randrange(P)].append(f"{k}:{start}-{end - 1}" if end - start > 1 else f"{k}:{start}")
            start = end
    spec = json.dumps({"strategy": "ids", "ids": ids}, separators=(",", ":"))
    t = LookupTable.build("frag", units, distribute(units, P, Distribution("ids", ids=tuple(map(tuple, ids)))),
                          service_addresses("frag", "default", P, 50051))
    addresses = sum(len(a) + 3 for a in t.addresses)
    assert len(spec) > 5_000
    assert nbytes(t) < 1.0 * len(spec) + addresses + 1 * KiB
    assert [t.range_texts(p) for p in range(P)] == [
        _merged_texts(t, p) for p in range(P)]


def _merged_texts(t: LookupTable, p: int) -> list[str]:
    return [f"{k}:{r.start}-{r.end - 1}" if r.size > 1 else f"{k}:{r.start}"
            for k in range(t.num_layers) for r in t.ranges(k, p)]


def test_the_old_worst_case_is_tiny_now_and_compression_is_for_what_remains():
    t = big([1000] * 256, 110)  # v1: 2.6 MB, refused by the operator
    assert nbytes(t) < 16 * KiB and t.configmap_entries()[1] == {}
