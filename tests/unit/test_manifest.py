"""NeuralNetwork manifest parsing: every bad manifest is a ManifestError naming its field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from partition_server.api.distributor import Distribution
from partition_server.api.manifest import (
    DEFAULT_IMAGE,
    DEFAULT_PORT,
    DynamicBatching,
    ManifestError,
    NeuralNetwork,
    load_manifest,
    network_batching,
    network_document,
    parse_network_document,
    parse_neural_network,
    parse_training,
    training_document,
)

ROOT = Path(__file__).resolve().parents[2]


def manifest(**spec_overrides: Any) -> dict[str, Any]:
    """A valid manifest: 3 layers (6, 4, 2 units = 12 neurons) on 2 partitions."""
    doc = {
        "apiVersion": "mpnn.dev/v1alpha1",
        "kind": "NeuralNetwork",
        "metadata": {"name": "net"},
        "spec": {
            "model": {
                "inputs": 5,
                "layers": [
                    {"units": 6, "activation": "relu"},
                    {"units": 4, "activation": "tanh"},
                    {"units": 2, "activation": "softmax"},
                ],
            },
            "partitions": 2,
        },
    }
    doc["spec"].update(copy.deepcopy(spec_overrides))
    return doc


def error_of(doc: dict[str, Any]) -> ManifestError:
    with pytest.raises(ManifestError) as ei:
        parse_neural_network(doc)
    return ei.value


# --------------------------------------------------------------------------- valid input


def test_minimal_manifest_defaults():
    net = parse_neural_network(manifest())
    assert isinstance(net, NeuralNetwork)
    assert net.name == "net"
    assert net.namespace == "default"
    assert net.partitions == 2
    assert net.model.inputs == 5
    assert net.model.layer_units == [6, 4, 2]
    assert net.model.total_neurons == 12
    assert [l.activation for l in net.model.layers] == ["relu", "tanh", "softmax"]
    assert net.distribution == Distribution()
    assert net.storage is None and net.training is None
    assert net.server.port == DEFAULT_PORT
    assert net.server.image is None  # the operator's --server-image (default DEFAULT_IMAGE) applies
    assert DEFAULT_IMAGE == "ghcr.io/mpnn/mpnn:0.1.0"
    assert net.server.http_port == 8000


def test_activation_defaults_to_relu():
    doc = manifest()
    doc["spec"]["model"]["layers"] = [{"units": 3}]
    assert parse_neural_network(doc).model.layers[0].activation == "relu"


def test_full_manifest():
    doc = manifest(
        distribution={"strategy": "count", "counts": [7, 5]},
        storage={"nfs": {"server": "10.0.0.2", "path": "/exports/mpnn"}, "size": "5Gi"},
        training={"dataset": {"format": "mnist-idx", "path": "datasets/mnist"}, "epochs": 3,
                  "batchSize": 16, "learningRate": 0.1, "optimizer": "adam", "momentum": 0.5,
                  "checkpointEvery": 100, "runId": "run-7", "seed": 4},
        server={"image": "example/mpnn:1", "port": 6000, "resources": {"limits": {"cpu": "1"}}},
    )
    doc["metadata"]["namespace"] = "ml"
    net = parse_neural_network(doc)
    assert net.namespace == "ml"
    assert net.distribution == Distribution("count", counts=(7, 5))
    assert net.storage.nfs.server == "10.0.0.2" and net.storage.nfs.path == "/exports/mpnn"
    assert net.storage.existing_claim is None and net.storage.size == "5Gi"
    t = net.training
    assert (t.dataset.format, t.dataset.path) == ("mnist-idx", "datasets/mnist")
    assert (t.epochs, t.batch_size, t.learning_rate, t.optimizer, t.momentum) == (3, 16, 0.1, "adam", 0.5)
    assert (t.checkpoint_every, t.run_id, t.seed) == (100, "run-7", 4)
    assert net.server.image == "example/mpnn:1" and net.server.port == 6000
    assert net.server.resources == {"limits": {"cpu": "1"}}


def test_existing_claim_storage():
    net = parse_neural_network(manifest(storage={"existingClaim": "model-pvc"}))
    assert net.storage.existing_claim == "model-pvc" and net.storage.nfs is None


@pytest.mark.parametrize("dist,expected", [
    ({"strategy": "percentage", "percentages": [33.3, 66.7]}, Distribution("percentage", percentages=(33.3, 66.7))),
    ({"strategy": "ids", "ids": [["0:0-5", "2:0"], ["1:0-3", "2:1"]]},
     Distribution("ids", ids=(("0:0-5", "2:0"), ("1:0-3", "2:1")))),
    ({"strategy": "layers", "layers": [[0, 2], [1]]}, Distribution("layers", layers=((0, 2), (1,)))),
])
def test_each_strategy_parses(dist, expected):
    assert parse_neural_network(manifest(distribution=dist)).distribution == expected


def test_example_manifests_load():
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        net = load_manifest(path)
        assert net.partitions >= 1 and net.model.total_neurons >= net.partitions


def test_load_manifest_skips_other_documents(tmp_path):
    import yaml
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump_all([{"kind": "Namespace", "metadata": {"name": "x"}}, None, manifest()]))
    assert load_manifest(path).name == "net"


def test_load_manifest_without_neural_network(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("kind: ConfigMap\n")
    with pytest.raises(ManifestError) as ei:
        load_manifest(path)
    assert ei.value.field == "kind"


@pytest.mark.parametrize("text", [None, "a: [unclosed\n"])
def test_load_manifest_unreadable(tmp_path, text):
    path = tmp_path / "m.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ManifestError) as ei:
        load_manifest(path)
    assert ei.value.field == "manifest"


# --------------------------------------------------------------------------- distribution errors


@pytest.mark.parametrize("dist,field", [
    # wrong list length
    ({"strategy": "count", "counts": [12]}, "spec.distribution.counts"),
    ({"strategy": "percentage", "percentages": [50, 25, 25]}, "spec.distribution.percentages"),
    ({"strategy": "ids", "ids": [["0:0-5", "1:0-3", "2:0-1"]]}, "spec.distribution.ids"),
    ({"strategy": "layers", "layers": [[0], [1], [2]]}, "spec.distribution.layers"),
    # missing list
    ({"strategy": "count"}, "spec.distribution.counts"),
    ({"strategy": "layers"}, "spec.distribution.layers"),
    # sums off
    ({"strategy": "count", "counts": [6, 5]}, "spec.distribution.counts"),
    ({"strategy": "count", "counts": [7, 6]}, "spec.distribution.counts"),
    ({"strategy": "percentage", "percentages": [33.3, 66.6]}, "spec.distribution.percentages"),
    ({"strategy": "percentage", "percentages": [50, 51]}, "spec.distribution.percentages"),
    # overlap / gap in ids
    ({"strategy": "ids", "ids": [["0:0-5", "1:0-3", "2:0"], ["0:5", "2:1"]]}, "spec.distribution.ids[1][0]"),
    ({"strategy": "ids", "ids": [["0:0-4", "1:0-3", "2:0"], ["2:1"]]}, "spec.distribution.ids"),
    # layer owned twice / by none
    ({"strategy": "layers", "layers": [[0, 1], [1, 2]]}, "spec.distribution.layers[1][0]"),
    ({"strategy": "layers", "layers": [[0], [2]]}, "spec.distribution.layers"),
    # strategy / shape
    ({"strategy": "random"}, "spec.distribution.strategy"),
    ({"strategy": "count", "counts": 12}, "spec.distribution.counts"),
    ({"strategy": "ids", "ids": ["0:0-5", "0:6-11"]}, "spec.distribution.ids[0]"),
    ({"strategy": "balanced", "count": [1, 2]}, "spec.distribution.count"),
    ("balanced", "spec.distribution"),
])
def test_bad_distribution(dist, field):
    err = error_of(manifest(distribution=dist))
    assert err.field == field
    assert field in str(err)


def test_ids_gap_names_the_missing_neurons():
    err = error_of(manifest(distribution={"strategy": "ids", "ids": [["0:0-3", "1:0-3", "2:0"], ["2:1"]]}))
    assert err.field == "spec.distribution.ids"
    assert err.value == "0:4-5"


def test_wrong_length_reports_the_list():
    err = error_of(manifest(distribution={"strategy": "count", "counts": [12]}))
    assert err.value == [12]


# --------------------------------------------------------------------------- partitions


@pytest.mark.parametrize("value", [0, -3])
def test_partitions_below_one(value):
    err = error_of(manifest(partitions=value))
    assert err.field == "spec.partitions" and err.value == value


def test_partitions_above_neurons():
    err = error_of(manifest(partitions=13))
    assert err.field == "spec.partitions" and err.value == 13


def test_partitions_equal_to_neurons_is_fine():
    assert parse_neural_network(manifest(partitions=12)).partitions == 12


@pytest.mark.parametrize("value", ["2", 2.0, True, None])
def test_partitions_not_an_integer(value):
    assert error_of(manifest(partitions=value)).field == "spec.partitions"


# --------------------------------------------------------------------------- model


def _with_layers(layers):
    doc = manifest()
    doc["spec"]["model"]["layers"] = layers
    return doc


def test_unknown_activation():
    err = error_of(_with_layers([{"units": 3, "activation": "gelu"}, {"units": 2}]))
    assert err.field == "spec.model.layers[0].activation" and err.value == "gelu"


def test_softmax_not_on_last_layer():
    err = error_of(_with_layers([{"units": 3}, {"units": 3, "activation": "softmax"}, {"units": 2}]))
    assert err.field == "spec.model.layers[1].activation" and err.value == "softmax"


def test_softmax_on_single_last_layer_ok():
    assert parse_neural_network(_with_layers([{"units": 3, "activation": "softmax"}])).model.layer_units == [3]


@pytest.mark.parametrize("layers,field", [
    ([], "spec.model.layers"),
    (None, "spec.model.layers"),
    ([{"units": 0}], "spec.model.layers[0].units"),
    ([{"units": 3}, {"units": "4"}], "spec.model.layers[1].units"),
    ([{"units": 3}, 4], "spec.model.layers[1]"),
    ([{"units": 3, "activaton": "relu"}], "spec.model.layers[0].activaton"),
])
def test_bad_layers(layers, field):
    assert error_of(_with_layers(layers)).field == field


def test_bad_inputs():
    doc = manifest()
    doc["spec"]["model"]["inputs"] = 0
    assert error_of(doc).field == "spec.model.inputs"


def test_bad_weights():
    doc = manifest()
    doc["spec"]["model"]["weights"] = ""
    assert error_of(doc).field == "spec.model.weights"


# --------------------------------------------------------------------------- unknown fields, metadata, top level


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d["spec"].update(partition=2), "spec.partition"),
    (lambda d: d["spec"]["model"].update(input=5), "spec.model.input"),
    (lambda d: d["spec"].update(storage={"nfs": {"server": "h", "path": "/x", "readOnly": True}}),
     "spec.storage.nfs.readOnly"),
    (lambda d: d["spec"].update(training={"epoch": 3}), "spec.training.epoch"),
    (lambda d: d["spec"].update(training={"dataset": {"fromat": "npz"}}), "spec.training.dataset.fromat"),
    (lambda d: d["spec"].update(server={"ports": 1}), "spec.server.ports"),
])
def test_unknown_field(mutate, field):
    doc = manifest()
    mutate(doc)
    err = error_of(doc)
    assert err.field == field
    assert "unknown field" in err.message


@pytest.mark.parametrize("name", [
    "Digits", "1net", "net-", "-net", "net_1", "net.x", "", None, 7, "a" * 53,
])
def test_bad_metadata_name(name):
    doc = manifest()
    doc["metadata"]["name"] = name
    err = error_of(doc)
    assert err.field == "metadata.name" and err.value == name


def test_a_name_ending_in_inference_is_refused():
    doc = manifest()
    doc["metadata"]["name"] = "u-inference"
    err = error_of(doc)
    assert err.field == "metadata.name" and err.value == "u-inference"
    assert "must not end in '-inference'" in err.message and "network u" in err.message


@pytest.mark.parametrize("name", ["a", "net", "my-net-2", "a" * 52, "inference", "u-inferences"])
def test_good_metadata_name(name):
    doc = manifest()
    doc["metadata"]["name"] = name
    assert parse_neural_network(doc).name == name


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d["metadata"].update(name="net\n"), "metadata.name"),
    (lambda d: d["spec"].update(training={"runId": "run-1\n"}), "spec.training.runId"),
    (lambda d: d["spec"].update(storage={"existingClaim": "pvc", "size": "1Gi\n"}), "spec.storage.size"),
], ids=["metadata.name", "runId", "storage.size"])
def test_trailing_newline_is_rejected(mutate, field):
    doc = manifest()
    mutate(doc)
    assert error_of(doc).field == field


def test_missing_metadata():
    doc = manifest()
    del doc["metadata"]
    assert error_of(doc).field == "metadata"


@pytest.mark.parametrize("key,value", [("apiVersion", "mpnn.dev/v1"), ("kind", "Partition")])
def test_wrong_api_version_or_kind(key, value):
    doc = manifest()
    doc[key] = value
    err = error_of(doc)
    assert err.field == key and err.value == value


def test_not_a_mapping():
    with pytest.raises(ManifestError) as ei:
        parse_neural_network(["not", "a", "map"])
    assert ei.value.field == "manifest"


# --------------------------------------------------------------------------- storage


@pytest.mark.parametrize("storage", [
    {"nfs": {"server": "h", "path": "/x"}, "existingClaim": "pvc"},
    {},
    {"size": "1Gi"},
])
def test_storage_exactly_one_kind(storage):
    assert error_of(manifest(storage=storage)).field == "spec.storage"


@pytest.mark.parametrize("storage,field", [
    ({"nfs": {"path": "/x"}}, "spec.storage.nfs.server"),
    ({"nfs": {"server": "h", "path": "relative"}}, "spec.storage.nfs.path"),
    ({"nfs": "h:/x"}, "spec.storage.nfs"),
    ({"existingClaim": ""}, "spec.storage.existingClaim"),
    ({"existingClaim": "pvc", "size": "lots"}, "spec.storage.size"),
])
def test_bad_storage(storage, field):
    assert error_of(manifest(storage=storage)).field == field


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("training,field", [
    ({"optimizer": "rmsprop"}, "spec.training.optimizer"),
    ({"dataset": {"format": "csv"}}, "spec.training.dataset.format"),
    ({"dataset": {"format": "mnist-idx"}}, "spec.training.dataset.path"),
    ({"dataset": {"format": "npz"}}, "spec.training.dataset.path"),
    ({"epochs": 0}, "spec.training.epochs"),
    ({"batchSize": 1.5}, "spec.training.batchSize"),
    ({"learningRate": 0}, "spec.training.learningRate"),
    ({"learningRate": "fast"}, "spec.training.learningRate"),
    ({"momentum": 1.0}, "spec.training.momentum"),
    ({"momentum": -0.1}, "spec.training.momentum"),
    ({"checkpointEvery": -1}, "spec.training.checkpointEvery"),
    ({"runId": "Run_1"}, "spec.training.runId"),
    ({"seed": -1}, "spec.training.seed"),
    ({"serviceAccountName": "Trainer"}, "spec.training.serviceAccountName"),
    ({"serviceAccountName": ""}, "spec.training.serviceAccountName"),
    ({"serviceAccountName": "a" * 254}, "spec.training.serviceAccountName"),
])
def test_bad_training(training, field):
    err = error_of(manifest(training=training))
    assert err.field == field


def test_training_defaults():
    t = parse_neural_network(manifest(training={})).training
    assert (t.dataset.format, t.dataset.path, t.epochs, t.batch_size, t.optimizer) == ("digits", None, 10, 32, "sgd")
    assert t.momentum == 0.9 and t.learning_rate == 0.05 and t.run_id == "run-1"
    assert t.service_account_name == "mpnn-trainer"


def test_training_document_round_trips():
    t = parse_neural_network(manifest(training={"runId": "r2", "serviceAccountName": "ml.trainer"})).training
    assert parse_training(training_document(t)) == t


def test_momentum_zero_allowed():
    assert parse_neural_network(manifest(training={"momentum": 0})).training.momentum == 0.0


# --------------------------------------------------------------------------- server


@pytest.mark.parametrize("server,field", [
    ({"port": 0}, "spec.server.port"),
    ({"port": 65536}, "spec.server.port"),
    ({"httpPort": 0}, "spec.server.httpPort"),
    ({"httpPort": 65536}, "spec.server.httpPort"),
    ({"httpPort": "8000"}, "spec.server.httpPort"),
    ({"httpPort": 50051}, "spec.server.httpPort"),  # the gRPC port
    ({"port": 8000}, "spec.server.httpPort"),  # the default REST port
    ({"image": ""}, "spec.server.image"),
    ({"resources": ["cpu"]}, "spec.server.resources"),
    ({"resources": {"limit": {"cpu": 1}}}, "spec.server.resources.limit"),
])
def test_bad_server(server, field):
    assert error_of(manifest(server=server)).field == field


def test_resource_claims_are_refused_as_the_crd_does():
    err = error_of(manifest(server={"resources": {"limits": {"cpu": "1"}, "claims": [{"name": "gpu"}]}}))
    assert err.field == "spec.server.resources.claims" and "is not supported" in err.message
    crd = yaml.safe_load((Path(__file__).resolve().parents[2] / "crds" / "neuralnetworks.mpnn.dev.yaml").read_text())
    server = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["server"]
    resources = server["properties"]["resources"]
    assert set(resources["properties"]) == {"limits", "requests"} and "claims" in resources["description"]


# --------------------------------------------------------------------------- with_partitions


def test_with_partitions_balanced():
    net = parse_neural_network(manifest())
    other = net.with_partitions(5)
    assert other.partitions == 5 and net.partitions == 2
    assert other.model == net.model and other.name == net.name


@pytest.mark.parametrize("dist,field", [
    ({"strategy": "count", "counts": [7, 5]}, "spec.distribution.counts"),
    ({"strategy": "percentage", "percentages": [50, 50]}, "spec.distribution.percentages"),
    ({"strategy": "ids", "ids": [["0:0-5", "2:0"], ["1:0-3", "2:1"]]}, "spec.distribution.ids"),
    ({"strategy": "layers", "layers": [[0, 2], [1]]}, "spec.distribution.layers"),
])
def test_with_partitions_revalidates_lists(dist, field):
    net = parse_neural_network(manifest(distribution=dist))
    assert net.with_partitions(2) == net
    with pytest.raises(ManifestError) as ei:
        net.with_partitions(3)
    assert ei.value.field == field


@pytest.mark.parametrize("P", [0, 13])
def test_with_partitions_out_of_range(P):
    net = parse_neural_network(manifest())
    with pytest.raises(ManifestError) as ei:
        net.with_partitions(P)
    assert ei.value.field == "spec.partitions" and ei.value.value == P


# --------------------------------------------------------------------------- network.json


def test_network_document_round_trip():
    net = parse_neural_network(manifest())
    doc = network_document(net)
    assert doc == {"apiVersion": "mpnn.dev/network/v1", "name": "net", "inputs": 5,
                   "layers": [{"units": 6, "activation": "relu"}, {"units": 4, "activation": "tanh"},
                              {"units": 2, "activation": "softmax"}],
                   "seed": 0, "weights": None}
    name, model = parse_network_document(doc)
    assert name == "net" and model == net.model


def test_dynamic_batching_is_off_unless_set_and_travels_in_network_json():
    assert parse_neural_network(manifest()).server.dynamic_batching is None
    assert network_batching(network_document(parse_neural_network(manifest()))) is None
    net = parse_neural_network(manifest(server={"dynamicBatching": {"maxDelayMicroseconds": 500}}))
    assert net.server.dynamic_batching == DynamicBatching(max_delay_us=500, max_batch_size=64)
    doc = network_document(net)
    assert doc["dynamicBatching"] == {"maxDelayMicroseconds": 500, "maxBatchSize": 64}
    assert network_batching(doc) == net.server.dynamic_batching
    assert parse_network_document(doc)[1] == net.model


@pytest.mark.parametrize("batching, field, message", [
    ({}, "spec.server.dynamicBatching.maxDelayMicroseconds", "must be an integer"),
    ({"maxDelayMicroseconds": 0}, "spec.server.dynamicBatching.maxDelayMicroseconds", "at least 1"),
    ({"maxDelayMicroseconds": 1_000_001}, "spec.server.dynamicBatching.maxDelayMicroseconds", "at most 1000000"),
    ({"maxDelayMicroseconds": "500"}, "spec.server.dynamicBatching.maxDelayMicroseconds", "must be an integer"),
    ({"maxDelayMicroseconds": 500, "maxBatchSize": 0}, "spec.server.dynamicBatching.maxBatchSize", "at least 1"),
    ({"maxDelayMicroseconds": 500, "maxBatchSize": 257}, "spec.server.dynamicBatching.maxBatchSize", "at most 256"),
    ({"maxDelayMicroseconds": 500, "maxQueue": 3}, "spec.server.dynamicBatching.maxQueue", ""),
    ("fast", "spec.server.dynamicBatching", ""),
])
def test_bad_dynamic_batching_names_the_field(batching, field, message):
    err = error_of(manifest(server={"dynamicBatching": batching}))
    assert err.field == field and message in str(err), str(err)


def test_network_document_wrong_api_version():
    with pytest.raises(ManifestError) as ei:
        parse_network_document({"apiVersion": "v1", "name": "x"})
    assert ei.value.field == "network.apiVersion"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("mutate,field", [
    (lambda d, v: d["spec"].update(training={"learningRate": v}), "spec.training.learningRate"),
    (lambda d, v: d["spec"].update(training={"momentum": v}), "spec.training.momentum"),
    (lambda d, v: d["spec"].update(partitions=2, distribution={"strategy": "percentage", "percentages": [v, 100]}),
     "spec.distribution.percentages[0]"),
], ids=["learningRate", "momentum", "percentages"])
def test_non_finite_numbers_name_the_field(mutate, field, bad):
    doc = manifest()
    mutate(doc, bad)
    with pytest.raises(ManifestError) as err:
        parse_neural_network(doc)
    assert err.value.field == field
