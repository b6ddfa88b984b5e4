"""The ``NeuralNetwork`` manifest: parsing and validation in one place.

A manifest is the YAML a user would ``kubectl apply`` (``apiVersion:
mpnn.dev/v1alpha1``, ``kind: NeuralNetwork``). Local mode, ``mpnn distribute``,
``mpnn render`` and the operator all read it through :func:`parse_neural_network`,
so one set of rules decides what is valid (``DESIGN.md``, "Kubernetes objects").

Every error is a :class:`ManifestError` naming the field path (``spec.model.layers[2].activation``)
and the offending value.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import yaml

from partition_server.api import specs
from partition_server.api.distributor import Distribution, STRATEGIES
from partition_server.api.specs import (  # the parsed model, re-exported
    ACTIVATIONS, API_VERSION, DATASET_FORMATS, DEFAULT_HTTP_PORT, DEFAULT_IMAGE, DEFAULT_PEER_PORT,
    DEFAULT_PORT, DEFAULT_TRAINER_SERVICE_ACCOUNT, DatasetSpec, DynamicBatching, KIND, LayerSpec, ManifestError, ModelSpec,
    NAMESPACE_RE, NFSStorage, NeuralNetwork, OPTIMIZERS, RESERVED_NAME_SUFFIX, ServerSpec, StorageSpec,
    TrainingSpec, _NAME_RE, _SECRET_NAME_RE, _SUBDOMAIN_RE, _check_distribution)

__all__ = [
    *specs.__all__,
    "load_manifest",
    "MAX_BATCH_DELAY_US",
    "MAX_BATCH_SIZE",
    "network_batching",
    "network_document",
    "parse_network_document",
    "parse_neural_network",
    "parse_resources",
    "parse_training",
    "training_document",
]


def load_manifest(path: str | Path) -> NeuralNetwork:
    """Read the NeuralNetwork document from a YAML file (other documents are skipped).

    Raises:
        ManifestError: unreadable file, no NeuralNetwork document, or invalid content.
    """
    try:
        # libyaml's safe loader when PyYAML has it: a 1,000-layer manifest parses in
        # milliseconds instead of about a second.
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        docs = [d for d in yaml.load_all(Path(path).read_text(), Loader=loader) if d is not None]
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError("manifest", str(path), f"cannot be read: {exc}") from exc
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == KIND:
            return parse_neural_network(doc)
    raise ManifestError("kind", [d.get("kind") for d in docs if isinstance(d, dict)],
                        f"no document of kind {KIND} in {path}")


def parse_neural_network(obj: Mapping[str, Any]) -> NeuralNetwork:
    """Validate a NeuralNetwork object (as a dict, e.g. from YAML or the API server).

    Raises:
        ManifestError: the first problem found, naming its field path and value.
    """
    _expect_map(obj, "")
    if obj.get("apiVersion") != API_VERSION:
        raise ManifestError("apiVersion", obj.get("apiVersion"), f"must be {API_VERSION}")
    if obj.get("kind") != KIND:
        raise ManifestError("kind", obj.get("kind"), f"must be {KIND}")
    meta = _expect_map(obj.get("metadata"), "metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ManifestError("metadata.name", name,
                            "must be a DNS-1035 label of at most 52 characters (lowercase letters, digits, '-')")
    if name.endswith(RESERVED_NAME_SUFFIX):
        raise ManifestError("metadata.name", name,
                            f"must not end in '{RESERVED_NAME_SUFFIX}': the inference Service of network "
                            f"{name[:-len(RESERVED_NAME_SUFFIX)]} has the name of this network's headless Service")
    namespace = meta.get("namespace") or "default"
    if not isinstance(namespace, str) or not NAMESPACE_RE.fullmatch(namespace):
        raise ManifestError("metadata.namespace", namespace, "must be a DNS-1123 label (lowercase letters, digits, '-')")
    spec = _expect_map(obj.get("spec"), "spec")
    _no_unknown(spec, "spec", {"model", "partitions", "distribution", "storage", "training", "server"})
    model = _parse_model(_expect_map(spec.get("model"), "spec.model"))
    partitions = _int(spec.get("partitions"), "spec.partitions", minimum=1)
    net = NeuralNetwork(
        name=name,
        namespace=str(namespace),
        model=model,
        partitions=partitions,
        distribution=_parse_distribution(spec.get("distribution")),
        storage=_parse_storage(spec.get("storage")),
        training=parse_training(spec.get("training")),
        server=_parse_server(spec.get("server")),
    )
    _check_distribution(net)
    return net


def _parse_model(m: Mapping[str, Any]) -> ModelSpec:
    _no_unknown(m, "spec.model", {"inputs", "layers", "weights", "seed"})
    inputs = _int(m.get("inputs"), "spec.model.inputs", minimum=1)
    raw_layers = m.get("layers")
    if not isinstance(raw_layers, list) or not raw_layers:
        raise ManifestError("spec.model.layers", raw_layers, "must be a non-empty list of layers")
    layers = []
    for k, raw in enumerate(raw_layers):
        path = f"spec.model.layers[{k}]"
        _expect_map(raw, path)
        _no_unknown(raw, path, {"units", "activation"})
        units = _int(raw.get("units"), f"{path}.units", minimum=1)
        act = raw.get("activation", "relu")
        if act not in ACTIVATIONS:
            raise ManifestError(f"{path}.activation", act, f"must be one of {', '.join(ACTIVATIONS)}")
        if act == "softmax" and k != len(raw_layers) - 1:
            raise ManifestError(f"{path}.activation", act, "softmax is allowed on the last layer only")
        layers.append(LayerSpec(units, act))
    weights = m.get("weights")
    if weights is not None and (not isinstance(weights, str) or not weights):
        raise ManifestError("spec.model.weights", weights, "must be a path to a safetensors file")
    return ModelSpec(inputs, tuple(layers), weights, _int(m.get("seed", 0), "spec.model.seed", minimum=0))


def _parse_distribution(d: Any) -> Distribution:
    if d is None:
        return Distribution()
    _expect_map(d, "spec.distribution")
    _no_unknown(d, "spec.distribution", {"strategy", "counts", "percentages", "ids", "layers"})
    strategy = d.get("strategy", "balanced")
    if strategy not in STRATEGIES:
        raise ManifestError("spec.distribution.strategy", strategy, f"must be one of {', '.join(STRATEGIES)}")

    def lst(name: str) -> list | None:
        value = d.get(name)
        if value is not None and not isinstance(value, list):
            raise ManifestError(f"spec.distribution.{name}", value, "must be a list")
        return value

    def nested(name: str) -> tuple | None:
        value = lst(name)
        if value is None:
            return None
        for i, v in enumerate(value):
            if not isinstance(v, list):
                raise ManifestError(f"spec.distribution.{name}[{i}]", v, "must be a list")
        return tuple(tuple(v) for v in value)

    counts, pcts = lst("counts"), lst("percentages")
    return Distribution(
        strategy=strategy,
        counts=tuple(counts) if counts is not None else None,
        percentages=tuple(pcts) if pcts is not None else None,
        ids=nested("ids"),
        layers=nested("layers"),
    )


def _parse_storage(s: Any) -> StorageSpec | None:
    if s is None:
        return None
    _expect_map(s, "spec.storage")
    _no_unknown(s, "spec.storage", {"nfs", "existingClaim", "size"})
    nfs, claim = s.get("nfs"), s.get("existingClaim")
    if (nfs is None) == (claim is None):
        raise ManifestError("spec.storage", dict(s), "set exactly one of nfs and existingClaim")
    size = s.get("size", "1Gi")
    if not isinstance(size, str) or not re.fullmatch(r"\d+(\.\d+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?", size):
        raise ManifestError("spec.storage.size", size, "must be a Kubernetes quantity such as 10Gi")
    if nfs is not None:
        _expect_map(nfs, "spec.storage.nfs")
        _no_unknown(nfs, "spec.storage.nfs", {"server", "path"})
        server, path = nfs.get("server"), nfs.get("path")
        if not isinstance(server, str) or not server:
            raise ManifestError("spec.storage.nfs.server", server, "must be a host name or address")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ManifestError("spec.storage.nfs.path", path, "must be an absolute export path")
        return StorageSpec(nfs=NFSStorage(server, path), size=size)
    if not isinstance(claim, str) or not claim:
        raise ManifestError("spec.storage.existingClaim", claim, "must be a PersistentVolumeClaim name")
    return StorageSpec(existing_claim=claim, size=size)


def parse_training(t: Any) -> TrainingSpec | None:
    """``spec.training`` (camelCase keys, as in the manifest) into a :class:`TrainingSpec`; None stays None.

    Raises:
        ManifestError: naming the ``spec.training`` field at fault.
    """
    if t is None:
        return None
    _expect_map(t, "spec.training")
    _no_unknown(t, "spec.training", {"dataset", "epochs", "batchSize", "learningRate", "optimizer",
                                     "momentum", "checkpointEvery", "runId", "seed", "serviceAccountName"})
    ds = t.get("dataset") or {}
    _expect_map(ds, "spec.training.dataset")
    _no_unknown(ds, "spec.training.dataset", {"format", "path"})
    fmt = ds.get("format", "digits")
    if fmt not in DATASET_FORMATS:
        raise ManifestError("spec.training.dataset.format", fmt, f"must be one of {', '.join(DATASET_FORMATS)}")
    path = ds.get("path")
    if fmt != "digits" and not path:
        raise ManifestError("spec.training.dataset.path", path, f"is required for format {fmt}")
    optimizer = t.get("optimizer", "sgd")
    if optimizer not in OPTIMIZERS:
        raise ManifestError("spec.training.optimizer", optimizer, f"must be one of {', '.join(OPTIMIZERS)}")
    run_id = t.get("runId", "run-1")
    if not isinstance(run_id, str) or not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?", run_id):
        raise ManifestError("spec.training.runId", run_id,
                            "must be lowercase letters, digits and '-', at most 40 characters")
    account = t.get("serviceAccountName", DEFAULT_TRAINER_SERVICE_ACCOUNT)
    if not isinstance(account, str) or not _SUBDOMAIN_RE.fullmatch(account):
        raise ManifestError("spec.training.serviceAccountName", account,
                            "must be a ServiceAccount name (lowercase letters, digits, '-' and '.')")
    return TrainingSpec(
        dataset=DatasetSpec(fmt, path),
        epochs=_int(t.get("epochs", 10), "spec.training.epochs", minimum=1),
        batch_size=_int(t.get("batchSize", 32), "spec.training.batchSize", minimum=1),
        learning_rate=_float(t.get("learningRate", 0.05), "spec.training.learningRate"),
        optimizer=optimizer,
        momentum=_float(t.get("momentum", 0.9), "spec.training.momentum", allow_zero=True, maximum=1.0),
        checkpoint_every=_int(t.get("checkpointEvery", 0), "spec.training.checkpointEvery", minimum=0),
        run_id=run_id,
        seed=_int(t.get("seed", 0), "spec.training.seed", minimum=0),
        service_account_name=account,
    )


def _parse_server(s: Any) -> ServerSpec:
    if s is None:
        return ServerSpec()
    _expect_map(s, "spec.server")
    _no_unknown(s, "spec.server", {"image", "port", "httpPort", "peerPort", "resources", "networkPolicy", "tls",
                                   "dynamicBatching"})
    image = s.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise ManifestError("spec.server.image", image, "must be a container image reference")
    port = _port(s.get("port", DEFAULT_PORT), "spec.server.port")
    http_port = _port(s.get("httpPort", DEFAULT_HTTP_PORT), "spec.server.httpPort")
    if http_port == port:
        raise ManifestError("spec.server.httpPort", http_port, "must differ from spec.server.port")
    peer_port = _port(s.get("peerPort", DEFAULT_PEER_PORT), "spec.server.peerPort")
    if peer_port in (port, http_port):
        raise ManifestError("spec.server.peerPort", peer_port,
                            "must differ from spec.server.port and spec.server.httpPort")
    network_policy = s.get("networkPolicy", True)
    if not isinstance(network_policy, bool):
        raise ManifestError("spec.server.networkPolicy", network_policy, "must be true or false")
    tls = s.get("tls")
    tls_secret = None
    if tls is not None:
        _expect_map(tls, "spec.server.tls")
        _no_unknown(tls, "spec.server.tls", {"secretName"})
        tls_secret = tls.get("secretName")
        if not isinstance(tls_secret, str) or not _SECRET_NAME_RE.fullmatch(tls_secret):
            raise ManifestError("spec.server.tls.secretName", tls_secret,
                                "must name a kubernetes.io/tls Secret (a DNS subdomain name)")
    resources = parse_resources(s.get("resources") or {}, "spec.server.resources")
    return ServerSpec(image, port, http_port, dict(resources), peer_port=peer_port,
                      network_policy=network_policy, tls_secret=tls_secret,
                      dynamic_batching=_parse_batching(s.get("dynamicBatching"), "spec.server.dynamicBatching"))


MAX_BATCH_DELAY_US = 1_000_000  # a batch waits at most a second for more requests
MAX_BATCH_SIZE = 256  # rows of one inference pass (serving's ModelInference.BATCH is this)


def _parse_batching(b: Any, path: str) -> DynamicBatching | None:
    if b is None:
        return None
    _expect_map(b, path)
    _no_unknown(b, path, {"maxDelayMicroseconds", "maxBatchSize"})
    delay = _int(b.get("maxDelayMicroseconds"), f"{path}.maxDelayMicroseconds", minimum=1)
    if delay > MAX_BATCH_DELAY_US:
        raise ManifestError(f"{path}.maxDelayMicroseconds", delay, f"must be at most {MAX_BATCH_DELAY_US}")
    size = _int(b.get("maxBatchSize", 64), f"{path}.maxBatchSize", minimum=1)
    if size > MAX_BATCH_SIZE:
        raise ManifestError(f"{path}.maxBatchSize", size, f"must be at most {MAX_BATCH_SIZE}")
    return DynamicBatching(delay, size)


def parse_resources(resources: Any, path: str) -> dict[str, Any]:
    """Container resources (``requests``, ``limits``: maps of quantities) at ``path``.

    Raises:
        ManifestError: not a map, claims, another key, or a section that is not a map.
    """
    _expect_map(resources, path)
    if "claims" in resources:  # the CRD has no such field: the API server refuses or drops it
        raise ManifestError(f"{path}.claims", resources["claims"],
                            "is not supported: a container's resource claims must name claims of the pod "
                            "(spec.resourceClaims), which the partition servers' pods do not declare")
    _no_unknown(resources, path, {"limits", "requests"})
    for section, value in resources.items():
        _expect_map(value, f"{path}.{section}")
        for name, quantity in value.items():
            if isinstance(quantity, bool) or not isinstance(quantity, (str, int, float)):
                raise ManifestError(f"{path}.{section}.{name}", quantity, "must be a quantity (e.g. 500m, 1Gi)")
    return dict(resources)


def _port(value: Any, path: str) -> int:
    port = _int(value, path, minimum=1)
    if port > 65535:
        raise ManifestError(path, port, "must be at most 65535")
    return port


def _expect_map(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ManifestError(path or "manifest", value, "must be a mapping")
    return value


def _no_unknown(m: Mapping[str, Any], path: str, known: set[str]) -> None:
    unknown = sorted(set(m) - known)
    if unknown:
        raise ManifestError(f"{path}.{unknown[0]}", m[unknown[0]],
                            f"unknown field; known fields are {', '.join(sorted(known))}")


def _int(value: Any, path: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(path, value, "must be an integer")
    if minimum is not None and value < minimum:
        raise ManifestError(path, value, f"must be at least {minimum}")
    return value


def _float(value: Any, path: str, allow_zero: bool = False, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ManifestError(path, value, "must be a number")
    if not math.isfinite(value):
        raise ManifestError(path, value, "must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise ManifestError(path, value, "must be positive" if not allow_zero else "must not be negative")
    if maximum is not None and value >= maximum:
        raise ManifestError(path, value, f"must be below {maximum:g}")
    return float(value)


def network_document(net: NeuralNetwork) -> dict[str, Any]:
    """``network.json``: what a partition server needs to know of the model besides the lookup.

    Published beside ``lookup.json`` (same ConfigMap in a cluster, same directory
    locally). ``weights``, when relative, is resolved against the shared volume.
    ``dynamicBatching`` (``spec.server.dynamicBatching``) only when set.
    """
    doc = {"apiVersion": "mpnn.dev/network/v1", "name": net.name, **net.model.shape_dict(),
           "seed": net.model.seed, "weights": net.model.weights}
    batching = net.server.dynamic_batching
    if batching is not None:
        doc["dynamicBatching"] = {"maxDelayMicroseconds": batching.max_delay_us,
                                  "maxBatchSize": batching.max_batch_size}
    return doc


def network_batching(obj: Mapping[str, Any]) -> DynamicBatching | None:
    """The dynamic batching a ``network.json`` asks for (None: off).

    Raises:
        ManifestError: a bad ``network.dynamicBatching`` field.
    """
    return _parse_batching(obj.get("dynamicBatching"), "network.dynamicBatching")


def training_document(training: TrainingSpec) -> dict[str, Any]:
    """``spec.training`` back in manifest form (camelCase), as :func:`parse_training` reads it."""
    return {"dataset": {k: v for k, v in asdict(training.dataset).items() if v is not None},
            "epochs": training.epochs, "batchSize": training.batch_size, "learningRate": training.learning_rate,
            "optimizer": training.optimizer, "momentum": training.momentum,
            "checkpointEvery": training.checkpoint_every, "runId": training.run_id, "seed": training.seed,
            "serviceAccountName": training.service_account_name}


def parse_network_document(obj: Mapping[str, Any]) -> tuple[str, ModelSpec]:
    """Read ``network.json`` back into ``(name, ModelSpec)``.

    Raises:
        ManifestError: a missing or invalid field.
    """
    _expect_map(obj, "network")
    if obj.get("apiVersion") != "mpnn.dev/network/v1":
        raise ManifestError("network.apiVersion", obj.get("apiVersion"), "must be mpnn.dev/network/v1")
    model = {k: obj.get(k) for k in ("inputs", "layers", "seed") if obj.get(k) is not None}
    if obj.get("weights"):
        model["weights"] = obj["weights"]
    return str(obj.get("name")), _parse_model(model)
