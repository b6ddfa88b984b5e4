"""The CRD files: plain YAML, structural, mirroring the manifest model (no cluster needed;
the API server's own verdict on them is in tests/cluster/test_operator.py)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from partition_server.api import manifest
from partition_server.api.coverage import shares
from partition_server.api.distributor import STRATEGIES, Distribution, distribute

CRDS = Path(__file__).resolve().parents[2] / "crds"


def _crd(name: str) -> dict:
    docs = [d for d in yaml.safe_load_all((CRDS / f"{name}.yaml").read_text()) if d]
    assert len(docs) == 1, "one CRD per file (the Helm chart copies them verbatim)"
    return docs[0]


@pytest.fixture(scope="module")
def nn() -> dict:
    return _crd("neuralnetworks.mpnn.dev")


@pytest.fixture(scope="module")
def nnp() -> dict:
    return _crd("partitions.mpnn.dev")


def _version(crd: dict) -> dict:
    (version,) = crd["spec"]["versions"]
    return version


def _spec(crd: dict) -> dict:
    return _version(crd)["schema"]["openAPIV3Schema"]["properties"]["spec"]


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def _rules(schema: dict) -> list[dict]:
    """Every x-kubernetes-validations rule in the schema tree."""
    out = list(schema.get("x-kubernetes-validations", []))
    for sub in (schema.get("properties") or {}).values():
        out += _rules(sub)
    if "items" in schema:
        out += _rules(schema["items"])
    return out


def _walk(schema: dict, path: str = ""):
    yield path, schema
    for key, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")


def test_files_are_the_two_crds_of_group_mpnn_dev(nn, nnp):
    assert sorted(p.name for p in CRDS.glob("*.yaml")) == ["neuralnetworks.mpnn.dev.yaml",
                                                           "partitions.mpnn.dev.yaml"]
    for crd, kind, short in ((nn, "NeuralNetwork", "nn"), (nnp, "Partition", "nnp")):
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
        assert crd["spec"]["group"] == "mpnn.dev" and crd["spec"]["scope"] == "Namespaced"
        assert crd["spec"]["names"]["kind"] == kind
        assert crd["spec"]["names"]["shortNames"] == [short]
        assert crd["spec"]["names"]["categories"] == ["mpnn"]
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.mpnn.dev"
        version = _version(crd)
        assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
        assert version["subresources"]["status"] == {}


def test_networks_scale_on_spec_partitions(nn):
    assert _version(nn)["subresources"]["scale"] == {
        "specReplicasPath": ".spec.partitions",
        "statusReplicasPath": ".status.partitions",
        "labelSelectorPath": ".status.selector",
    }


def test_printer_columns(nn, nnp):
    cols = {c["name"]: c["jsonPath"] for c in _version(nn)["additionalPrinterColumns"]}
    default = [c["name"] for c in _version(nn)["additionalPrinterColumns"] if not c.get("priority")]
    assert default == ["Partitions", "Ready", "Strategy", "Phase", "Epoch", "Accuracy", "Age"]
    assert cols["Epoch"] == ".status.training.epoch" and cols["Accuracy"] == ".status.training.accuracy"
    assert cols["Partitions"] == ".spec.partitions"
    assert cols["Ready"] == ".status.readyPartitions"
    assert cols["Strategy"] == ".spec.distribution.strategy"
    assert cols["Phase"] == ".status.phase"
    assert cols["Age"] == ".metadata.creationTimestamp"
    assert {"Network", "Index", "Neurons", "Ready"} <= {c["name"] for c in _version(nnp)["additionalPrinterColumns"]}


def test_schema_mirrors_the_manifest_model(nn):
    spec = _spec(nn)["properties"]
    assert set(spec) == {"model", "partitions", "distribution", "storage", "training", "server"}
    assert set(spec["model"]["properties"]) == {"inputs", "layers", "weights", "seed"}
    assert set(spec["model"]["properties"]["layers"]["items"]["properties"]) == \
        {f.name for f in dataclasses.fields(manifest.LayerSpec)}
    assert set(spec["distribution"]["properties"]) == {f.name for f in dataclasses.fields(Distribution)}
    assert set(spec["storage"]["properties"]) == {"nfs", "existingClaim", "size"}
    assert set(spec["storage"]["properties"]["nfs"]["properties"]) == \
        {f.name for f in dataclasses.fields(manifest.NFSStorage)}
    assert set(spec["training"]["properties"]) == {_camel(f.name) for f in dataclasses.fields(manifest.TrainingSpec)}
    assert set(spec["training"]["properties"]["dataset"]["properties"]) == \
        {f.name for f in dataclasses.fields(manifest.DatasetSpec)}
    # spec.server.tls.secretName is ServerSpec.tls_secret.
    assert set(spec["server"]["properties"]) == \
        {_camel(f.name) for f in dataclasses.fields(manifest.ServerSpec)} - {"tlsSecret"} | {"tls"}


def test_enums_match_the_manifest_model(nn):
    spec = _spec(nn)["properties"]
    assert spec["model"]["properties"]["layers"]["items"]["properties"]["activation"]["enum"] == \
        list(manifest.ACTIVATIONS)
    assert spec["distribution"]["properties"]["strategy"]["enum"] == list(STRATEGIES)
    training = spec["training"]["properties"]
    assert training["optimizer"]["enum"] == list(manifest.OPTIMIZERS)
    assert training["dataset"]["properties"]["format"]["enum"] == list(manifest.DATASET_FORMATS)


def test_schema_defaults_equal_the_manifest_defaults(nn):
    spec = _spec(nn)["properties"]
    assert spec["distribution"]["default"] == {}
    assert spec["distribution"]["properties"]["strategy"]["default"] == Distribution().strategy == "balanced"
    assert spec["server"]["default"] == {}
    assert spec["server"]["properties"]["port"]["default"] == manifest.ServerSpec().port == 50051
    assert spec["server"]["properties"]["httpPort"]["default"] == manifest.ServerSpec().http_port == 8000
    assert spec["model"]["properties"]["layers"]["items"]["properties"]["activation"]["default"] == \
        manifest.LayerSpec(1).activation
    assert spec["model"]["properties"]["seed"]["default"] == manifest.ModelSpec(1, ()).seed
    assert spec["storage"]["properties"]["size"]["default"] == manifest.StorageSpec().size
    defaults = manifest.TrainingSpec()
    for f in dataclasses.fields(manifest.TrainingSpec):
        if f.name == "dataset":
            continue
        assert spec["training"]["properties"][_camel(f.name)]["default"] == getattr(defaults, f.name), f.name
    assert spec["training"]["properties"]["dataset"]["properties"]["format"]["default"] == \
        manifest.DatasetSpec().format


@pytest.mark.parametrize("field, fragment", [
    (".partitions", "spec.partitions must be at most the number of neurons"),
    (".distribution.counts", "spec.distribution.counts must have one entry per partition"),
    (".distribution.counts", "spec.distribution.counts must sum to the number of neurons"),
    (".distribution.percentages", "spec.distribution.percentages must have one entry per partition"),
    (".distribution.percentages", "spec.distribution.percentages must sum to 100"),
    (".distribution.ids", "spec.distribution.ids must have one list per partition"),
    (".distribution.layers", "spec.distribution.layers must have one list per partition"),
])
def test_cross_field_cel_rules_name_their_field(nn, field, fragment):
    rules = _spec(nn)["x-kubernetes-validations"]
    matching = [r for r in rules if fragment in (r.get("message") or r.get("messageExpression", ""))]
    assert len(matching) == 1, fragment
    assert matching[0]["fieldPath"] == field


def test_status_training_holds_what_the_trainer_and_the_operator_write(nn):
    from mpnn_operator.training import RUN_FIELDS
    from tests.support.reporting import reports_of_a_run

    status = _version(nn)["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    training = status["training"]
    assert "x-kubernetes-preserve-unknown-fields" not in training  # unknown fields are pruned
    assert set(training["properties"]) == {"run", *RUN_FIELDS}
    patches = reports_of_a_run("r1")
    written = set().union(*(p["training"] for p in patches))
    assert written <= set(training["properties"])
    types = {k: v.get("type") for k, v in training["properties"].items()}
    assert {k: types[k] for k in ("epoch", "step", "checkpoint")} == dict.fromkeys(("epoch", "step", "checkpoint"),
                                                                                "integer")
    assert types["loss"] == types["accuracy"] == "number"
    assert training["properties"]["startTime"]["format"] == training["properties"]["completionTime"]["format"] \
        == "date-time"


def test_server_ports_must_differ(nn):
    server = _spec(nn)["properties"]["server"]
    rule, peer = server["x-kubernetes-validations"]
    assert rule["fieldPath"] == ".httpPort" and "spec.server.httpPort must differ" in rule["message"]
    assert peer["fieldPath"] == ".peerPort" and "spec.server.peerPort must differ" in peer["message"]


def test_storage_rules(nn):
    storage = _spec(nn)["properties"]["storage"]
    messages = [r["message"] for r in storage["x-kubernetes-validations"]]
    assert "spec.storage: set exactly one of nfs and existingClaim" in messages
    assert any(r["rule"] == "self == oldSelf" for r in storage["x-kubernetes-validations"])
    # That rule runs only when spec.storage exists before and after: adding or removing it is
    # a transition of spec.
    (whole,) = [r for r in _spec(nn)["x-kubernetes-validations"] if "oldSelf" in r["rule"]]
    assert whole["rule"] == "has(self.storage) == has(oldSelf.storage)" and whole["fieldPath"] == ".storage"
    assert whole["message"].startswith("spec.storage is immutable")


def test_lists_and_strings_are_bounded_for_the_cel_cost_estimator(nn):
    for path, schema in _walk(_spec(nn)):
        if schema.get("type") == "array":
            assert "maxItems" in schema, path
        if schema.get("type") == "string" and "enum" not in schema and "default" not in schema:
            assert "maxLength" in schema, path


def test_every_rule_has_a_message(nn, nnp):
    for crd in (nn, nnp):
        for rule in _rules(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]):
            assert rule.get("message") or rule.get("messageExpression"), rule["rule"]


def test_partition_range_pattern_accepts_what_the_operator_writes(nnp):
    pattern = _spec(nnp)["properties"]["ranges"]["items"]["pattern"]
    assignment = distribute([7, 5, 1], 3, Distribution())
    texts = [t for share in shares(assignment, 3) for t in share.ranges]
    assert "2:0" in texts and "0:0-2" in texts
    assert all(re.fullmatch(pattern.strip("^$"), t) for t in texts)
    assert not re.fullmatch(pattern.strip("^$"), "0:0-")


def test_range_numbers_are_bounded_so_counts_fit_the_status(nn, nnp):
    """A layer has at most 10^8 units: 9 digits; more could overflow status.neurons (int64)."""
    ranges = _spec(nnp)["properties"]["ranges"]["items"]["pattern"].strip("^$")
    ids = _spec(nn)["properties"]["distribution"]["properties"]["ids"]["items"]["items"]["pattern"].strip("^$")
    assert _spec(nn)["properties"]["model"]["properties"]["layers"]["items"]["properties"]["units"]["maximum"] \
        == 10 ** 8
    for pattern in (ranges, ids):
        assert re.fullmatch(pattern, "255:0-99999999") and re.fullmatch(pattern, "2:999999999")
        for text in ("2:5-99999999999999999999999999", "2:1000000000", "1234567890:0"):
            assert not re.fullmatch(pattern, text), (pattern, text)


def test_name_rule_matches_the_manifest(nn):
    rules = nn["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
    regex = re.search(r"matches\('(.*)'\)", rules[0]["rule"]).group(1)
    for name in ("digits", "a", "a" * 52, "a" * 53, "1abc", "abc-", "Abc"):
        assert bool(re.fullmatch(regex.strip("^$"), name)) == bool(manifest._NAME_RE.fullmatch(name)), name
    # Network N's inference Service would be the headless Service of a network N-inference.
    suffix = re.fullmatch(r"!self\.metadata\.name\.endsWith\('(.*)'\)", rules[1]["rule"]).group(1)
    assert suffix == manifest.RESERVED_NAME_SUFFIX == "-inference"
    assert "metadata.name must not end in '-inference'" in rules[1]["message"]
