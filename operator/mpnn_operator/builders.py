"""Pure builders: a validated :class:`NeuralNetwork` in, Kubernetes objects (dicts) out.

No API access and no owner references here: the reconciler adds the
NeuralNetwork as owner before applying, and ``mpnn render`` prints the objects
as they are. Every object carries :func:`naming.labels`.

Objects per network ``N`` in namespace ``NS`` (see ``docs/operator.md``):

- ``Partition`` ``N-<i>`` per partition (``spec.ranges``: ``L:A-B`` strings),
- ``ConfigMap`` ``N-lookup`` (``lookup.json`` or, when large, ``lookup.json.gz`` in ``binaryData``; ``network.json``),
- headless ``Service`` ``N`` (the peer port only), ``StatefulSet`` ``N``, ClusterIP ``Service``
  ``N-inference`` (the public gRPC and REST ports only),
- ``NetworkPolicy`` ``N-peers`` unless ``spec.server.networkPolicy`` is false,
- ``Secret`` ``N-peer-key`` (:func:`peer_key_secret`, created once by the reconciler with a random
  key, never applied or rendered; the pods mount it),
- ``PodDisruptionBudget`` ``N`` over the partition servers (:func:`disruption_budget`),
- with ``spec.storage.nfs``: ``PersistentVolume`` ``mpnn.NS.N`` and ``PersistentVolumeClaim`` ``N-model``,
- with ``spec.training`` and ``spec.storage``: the training ``Job`` of ``spec.training.runId``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Sequence

from partition_server.api.coverage import shares
from partition_server.api.distributor import Assignment, Range
from partition_server.api.environment import ALLOCATOR_ENV, PEER_KEY_FILE_ENV, PEER_KEY_ITEM
from partition_server.api.lookup import LookupTable, service_addresses
from partition_server.api.manifest import (DEFAULT_IMAGE, NeuralNetwork, TrainingSpec, network_document,
                                       training_document)

from . import naming

__all__ = [
    "CONFIG_DIR",
    "EXIT_USAGE",
    "MODEL_ROOT",
    "PEER_KEY_DIR",
    "RUN_AS",
    "TLS_DIR",
    "TRAIN_BACKOFF_LIMIT",
    "children",
    "disruption_budget",
    "headless_service",
    "inference_service",
    "lookup_configmap",
    "lookup_table",
    "model_volume",
    "network_json",
    "network_policy",
    "owned_neurons",
    "partition_parameters",
    "partition_ranges",
    "partitions",
    "peer_key_secret",
    "persistent_volume",
    "server_image",
    "server_resources",
    "statefulset",
    "training_active",
    "training_job",
    "training_json",
    "volume_claim",
    "without_claim_ref",
]

CONFIG_DIR = "/etc/mpnn"
MODEL_ROOT = "/var/lib/mpnn"
PEER_KEY_DIR = "/var/run/mpnn/peer-key"  # the Secret <name>-peer-key
TLS_DIR = "/var/run/mpnn/tls"            # spec.server.tls.secretName
# Must be numeric so the kubelet can verify runAsNonRoot without reading the image.
RUN_AS = 65532
# Failed training pods the Job replaces before it fails; each retry resumes from the
# run's last committed checkpoint.
TRAIN_BACKOFF_LIMIT = 3
# `mpnn` exits 2 on invalid input (FieldError, argparse): retrying cannot help. The CLI's own
# constant (partition_server.cli.EXIT_USAGE) is out of the operator's reach (it imports only the
# API layer); tests/unit/test_render.py holds the two equal.
EXIT_USAGE = 2


def lookup_table(net: NeuralNetwork, assignment: Assignment, cluster_domain: str = "cluster.local") -> LookupTable:
    """The lookup table for ``assignment``, addressing pods through the headless Service.

    Raises:
        LookupTableError: the assignment misses or doubles a neuron.
    """
    addresses = service_addresses(net.name, net.namespace, net.partitions, net.server.peer_port, cluster_domain)
    return LookupTable.build(net.name, net.model.layer_units, assignment, addresses)


def partition_ranges(assignment: Sequence[Sequence[Range]], partitions: int) -> list[list[str]]:
    """Per partition, its neurons as ``L:A-B`` (inclusive) texts in layer-major order."""
    return [share.ranges for share in shares(assignment, partitions)]


def owned_neurons(net: NeuralNetwork, ranges: Sequence[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The neurons of ``net`` among ``ranges`` (``(layer, start, end)`` half-open triples, as a
    hand-edited Partition may hold them): cut to the layers, overlaps merged, layer-major."""
    units = net.model.layer_units
    cut = sorted((layer, max(start, 0), min(end, units[layer])) for layer, start, end in ranges
                 if 0 <= layer < len(units))
    out: list[tuple[int, int, int]] = []
    for layer, start, end in cut:
        if start >= end:
            continue
        if out and out[-1][0] == layer and start <= out[-1][2]:
            out[-1] = (layer, out[-1][1], max(end, out[-1][2]))
        else:
            out.append((layer, start, end))
    return out


def partition_parameters(net: NeuralNetwork, ranges: Sequence[tuple[int, int, int]]) -> int:
    """Weights plus biases of the given neurons: ``fan_in + 1`` per neuron.

    ``ranges`` holds ``(layer, start, end)`` half-open triples within the network's layers
    (see :func:`owned_neurons`).
    """
    fan_in = [net.model.inputs] + net.model.layer_units[:-1]
    return sum((end - start) * (fan_in[layer] + 1) for layer, start, end in ranges)


def partitions(net: NeuralNetwork, assignment: Assignment) -> list[dict[str, Any]]:
    """One ``Partition`` per partition index, holding its share of ``assignment``."""
    out = []
    for index, ranges in enumerate(partition_ranges(assignment, net.partitions)):
        meta = _meta(net, naming.partition_name(net.name, index), naming.PARTITION_COMPONENT)
        meta["labels"][naming.PARTITION] = str(index)
        out.append({"apiVersion": naming.API_VERSION, "kind": "Partition", "metadata": meta,
                    "spec": {"network": net.name, "index": index, "ranges": ranges}})
    return out


def lookup_configmap(net: NeuralNetwork, table: LookupTable) -> dict[str, Any]:
    """``ConfigMap`` ``<name>-lookup`` with ``lookup.json`` and ``network.json``; a lookup text
    over ``COMPRESS_ABOVE`` bytes goes gzip-compressed into ``binaryData["lookup.json.gz"]``
    instead (servers read either)."""
    meta = _meta(net, naming.lookup_name(net.name), naming.LOOKUP)
    meta["annotations"] = {f"{naming.GROUP}/lookup-version": table.version}
    data, binary = table.configmap_entries()
    out = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
           "data": {**data, "network.json": network_json(net)}}
    if binary:
        out["binaryData"] = binary
    return out


def network_json(net: NeuralNetwork) -> str:
    return json.dumps(network_document(net), indent=2, sort_keys=True) + "\n"


def headless_service(net: NeuralNetwork) -> dict[str, Any]:
    """Headless ``Service`` giving each pod the DNS name used in the lookup table; it lists the
    peer port only (``mpnn.v1.Partition``), which no other Service publishes.

    Not-ready pods are published too: servers dial their peers while starting.
    """
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(net, net.name, naming.SERVER),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": naming.selector(net.name),
                     "ports": [{"name": "peer", "port": net.server.peer_port, "targetPort": "peer",
                                "protocol": "TCP"}]}}


def inference_service(net: NeuralNetwork) -> dict[str, Any]:
    """ClusterIP ``Service`` ``<name>-inference``: the Open Inference Protocol (gRPC and REST)
    of the ready partition servers, any of which answers for the whole network. Never the peer port."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(net, naming.inference_service_name(net.name), naming.INFERENCE),
            "spec": {"type": "ClusterIP", "selector": naming.selector(net.name),
                     "ports": [{"name": "grpc", "port": net.server.port, "targetPort": "grpc", "protocol": "TCP"},
                               {"name": "http", "port": net.server.http_port, "targetPort": "http",
                                "protocol": "TCP"}]}}


def persistent_volume(net: NeuralNetwork) -> dict[str, Any] | None:
    """The ReadWriteMany NFS ``PersistentVolume`` for ``spec.storage.nfs`` (else None).

    Reclaim policy Retain: deleting the volume object never touches the export. Bound in
    advance to :func:`volume_claim` (``claimRef`` without uid): no other claim can bind it.
    """
    if net.storage is None or net.storage.nfs is None:
        return None
    meta = _meta(net, naming.volume_name(net.namespace, net.name), naming.STORAGE)
    del meta["namespace"]
    meta["labels"][naming.NAMESPACE] = net.namespace
    return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": meta,
            "spec": {"capacity": {"storage": net.storage.size},
                     "accessModes": ["ReadWriteMany"],
                     "persistentVolumeReclaimPolicy": "Retain",
                     "storageClassName": "",
                     "volumeMode": "Filesystem",
                     "claimRef": {"namespace": net.namespace, "name": naming.claim_name(net.name)},
                     "nfs": {"server": net.storage.nfs.server, "path": net.storage.nfs.path}}}


def without_claim_ref(pv: dict[str, Any]) -> dict[str, Any]:
    """:func:`persistent_volume` as the operator applies it once it exists: without ``claimRef``,
    which the volume got at creation and the PersistentVolume controller completes on binding."""
    return {**pv, "spec": {k: v for k, v in pv["spec"].items() if k != "claimRef"}}


def volume_claim(net: NeuralNetwork) -> dict[str, Any] | None:
    """The ``PersistentVolumeClaim`` bound to :func:`persistent_volume` (else None)."""
    pv = persistent_volume(net)
    if pv is None:
        return None
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _meta(net, naming.claim_name(net.name), naming.STORAGE),
            "spec": {"accessModes": ["ReadWriteMany"],
                     "storageClassName": "",
                     "volumeName": pv["metadata"]["name"],
                     "volumeMode": "Filesystem",
                     "selector": {"matchLabels": {naming.NETWORK: net.name, naming.NAMESPACE: net.namespace}},
                     "resources": {"requests": {"storage": net.storage.size}}}}


def model_volume(net: NeuralNetwork) -> dict[str, Any]:
    """The pod volume holding the shared model: the claim, or an emptyDir without storage."""
    if net.storage is None:
        return {"name": "model", "emptyDir": {}}
    claim = net.storage.existing_claim or naming.claim_name(net.name)
    return {"name": "model", "persistentVolumeClaim": {"claimName": claim}}


def server_image(net: NeuralNetwork, default: str = DEFAULT_IMAGE) -> str:
    """The image of the servers and the training Job: ``spec.server.image``, else ``default``
    (the operator's ``--server-image``)."""
    return net.server.image or default


def peer_key_secret(net: NeuralNetwork, key: bytes) -> dict[str, Any]:
    """``Secret`` ``<name>-peer-key`` holding ``key`` (item ``key``): the reconciler creates it
    once with 256 random bits and never rewrites it; the servers and the trainer mount it."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _meta(net, naming.peer_key_name(net.name), naming.SERVER),
            "data": {PEER_KEY_ITEM: base64.b64encode(key).decode()}}


def network_policy(net: NeuralNetwork) -> dict[str, Any] | None:
    """``NetworkPolicy`` ``<name>-peers`` for the partition server pods (None with
    ``spec.server.networkPolicy: false``): the peer port only from pods of this network
    (label ``mpnn.dev/network: <name>`` in the namespace: the servers and the training Job),
    the public gRPC and REST ports from anywhere; nothing else."""
    if not net.server.network_policy:
        return None
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(net, naming.network_policy_name(net.name), naming.SERVER),
            "spec": {"podSelector": {"matchLabels": naming.selector(net.name)},
                     "policyTypes": ["Ingress"],
                     "ingress": [
                         {"from": [{"podSelector": {"matchLabels": {naming.NETWORK: net.name}}}],
                          "ports": [{"protocol": "TCP", "port": net.server.peer_port}]},
                         {"ports": [{"protocol": "TCP", "port": net.server.port},
                                    {"protocol": "TCP", "port": net.server.http_port}]},
                     ]}}


def server_resources(net: NeuralNetwork, default: dict[str, Any] | None = None) -> dict[str, Any]:
    """The servers' container resources: ``spec.server.resources`` when it sets any (as a
    whole, so a network's requests never meet the default's limits), else ``default`` (the
    operator's ``--server-resources``, from the chart's ``serverResources``)."""
    return dict(net.server.resources) if net.server.resources else dict(default or {})


def statefulset(net: NeuralNetwork, default_image: str = DEFAULT_IMAGE,
                default_resources: dict[str, Any] | None = None) -> dict[str, Any]:
    """The partition servers: ``replicas = spec.partitions``, started in parallel.

    The lookup ConfigMap is mounted as a directory (never ``subPath``) so the
    kubelet propagates new lookup versions, which the servers reload without a
    restart. ``network.json``'s hash is a template annotation, so a model change
    rolls the pods. Readiness is the gRPC health service of the server itself, on the
    public port (the peer port takes signed calls only; with TLS see :func:`_probe`): the
    Open Inference Protocol's ``/v2/health/ready`` needs every peer, so probing it
    would keep all pods unready until all are up (and out of the Services). The image is
    :func:`server_image`.
    """
    port, peer_port = net.server.port, net.server.peer_port
    config_hash = hashlib.sha256(network_json(net).encode()).hexdigest()[:16]
    pod_labels = naming.labels(net.name, naming.SERVER)
    container = {
        "name": "server",
        "image": server_image(net, default_image),
        "command": ["mpnn", "serve"],
        "env": [
            {"name": "MPNN_PARTITION",
             "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{naming.POD_INDEX_LABEL}']"}}},
            *_config_env(net),
            {"name": "MPNN_PORT", "value": str(port)},
            {"name": "MPNN_PEER_PORT", "value": str(peer_port)},
            {"name": "MPNN_HTTP_PORT", "value": str(net.server.http_port)},
            *({"name": k, "value": v} for k, v in ALLOCATOR_ENV.items()),
        ],
        "ports": [{"name": "grpc", "containerPort": port, "protocol": "TCP"},
                  {"name": "peer", "containerPort": peer_port, "protocol": "TCP"},
                  {"name": "http", "containerPort": net.server.http_port, "protocol": "TCP"}],
        "readinessProbe": {**_probe(net), "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**_probe(net), "initialDelaySeconds": 10, "periodSeconds": 10, "failureThreshold": 6},
        "securityContext": _container_security_context(),
        "volumeMounts": _volume_mounts(net),
    }
    resources = server_resources(net, default_resources)
    if resources:
        container["resources"] = resources
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": _meta(net, net.name, naming.SERVER),
        "spec": {
            "replicas": net.partitions,
            "serviceName": net.name,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": naming.selector(net.name)},
            "template": {
                "metadata": {"labels": pod_labels,
                             "annotations": {f"{naming.GROUP}/network-config": config_hash,
                                             # /metrics on the REST port (docs/metrics.md)
                                             "prometheus.io/scrape": "true",
                                             "prometheus.io/port": str(net.server.http_port),
                                             "prometheus.io/path": "/metrics"}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": _pod_security_context(),
                    "containers": [container],
                    "volumes": _volumes(net),
                },
            },
        },
    }


# Phases of status.training after which no trainer steps the servers (see training.py).
_RUN_OVER = frozenset({"Succeeded", "Failed", "Stopped", "Blocked"})


def training_active(net: NeuralNetwork, status: Any = None) -> bool:
    """Whether a training run of ``net`` is (or is about to be) stepping its servers.

    Args:
        status: the NeuralNetwork's ``.status`` (a mapping) or None (``mpnn render``: a network
            with ``spec.training`` and storage is taken to be training, which is what applying it does).
    """
    if net.training is None or net.storage is None:
        return False
    run = (status or {}).get("training") or {}
    if run.get("run") != net.training.run_id:
        return True  # the run of spec.training.runId has not started or not reported yet
    return run.get("phase") not in _RUN_OVER


def disruption_budget(net: NeuralNetwork, *, training: bool) -> dict[str, Any]:
    """The PodDisruptionBudget of the partition servers.

    Every partition holds neurons no other partition has: with one pod evicted the whole network
    stops answering and a training step cannot complete. While a run is ``training``,
    ``maxUnavailable: 0``: a ``kubectl drain`` waits (and says why) instead of costing the run
    the steps since its last checkpoint. Otherwise 1: a drain evicts one server at a time,
    inference is briefly unavailable (503 naming the partition) and the pod comes back with the
    current checkpoint, so node maintenance is never blocked indefinitely by a serving network.
    """
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": _meta(net, net.name, naming.SERVER),
            "spec": {"maxUnavailable": 0 if training else 1,
                     "selector": {"matchLabels": naming.selector(net.name)}}}


def training_json(training: TrainingSpec) -> str:
    """``spec.training`` as the training Job passes it to ``mpnn train --training``."""
    return json.dumps(training_document(training), sort_keys=True, separators=(",", ":"))


def training_job(net: NeuralNetwork, default_image: str = DEFAULT_IMAGE) -> dict[str, Any] | None:
    """The ``Job`` running ``mpnn train`` for ``spec.training.runId`` (None without training or storage).

    Its pod mounts what the servers mount (lookup ConfigMap, model volume) and runs
    as ``spec.training.serviceAccountName``, whose token lets it patch the
    NeuralNetwork's ``status.training``. ``restartPolicy: Never``: each attempt is a
    new pod (its log stays readable) and ``podFailurePolicy`` can tell invalid input
    (exit 2: fail at once) from an eviction (not counted); other failures are retried
    up to :data:`TRAIN_BACKOFF_LIMIT` times, resuming from the last committed checkpoint.
    """
    training = net.training
    if training is None or net.storage is None:
        return None
    meta = _meta(net, naming.job_name(net.name, training.run_id), naming.TRAINING)
    meta["labels"][naming.RUN] = training.run_id
    container = {
        "name": "trainer",
        "image": server_image(net, default_image),
        "command": ["mpnn", "train"],
        "args": ["--training", training_json(training), "--report", "--namespace", net.namespace],
        "env": _config_env(net),
        "securityContext": _container_security_context(),
        "volumeMounts": _volume_mounts(net),
    }
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
        "spec": {
            "backoffLimit": TRAIN_BACKOFF_LIMIT,
            "podFailurePolicy": {"rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                      "values": [EXIT_USAGE]}},
            ]},
            "template": {
                "metadata": {"labels": dict(meta["labels"])},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": training.service_account_name,
                    "automountServiceAccountToken": True,
                    "enableServiceLinks": False,
                    "securityContext": _pod_security_context(),
                    "containers": [container],
                    "volumes": _volumes(net),
                },
            },
        },
    }


def _probe(net: NeuralNetwork) -> dict[str, Any]:
    """How the kubelet asks a server whether it is up: its own ``grpc.health.v1`` on the public
    port; with ``spec.server.tls``, REST's ``/v2/health/live`` over HTTPS instead, because the
    kubelet's gRPC probe speaks plaintext only and a TLS port fails its every try (no pod would
    turn ready). HTTPS probes do not verify the certificate. REST answers only once the model is
    loaded and stops first on shutdown, as the gRPC health does."""
    if net.server.tls_secret:
        return {"httpGet": {"path": "/v2/health/live", "port": "http", "scheme": "HTTPS"}}
    return {"grpc": {"port": net.server.port}}


def _config_env(net: NeuralNetwork) -> list[dict[str, Any]]:
    """Where a pod finds the lookup table, the network, the model on the shared volume, the
    peer key and (with ``spec.server.tls``) the TLS files."""
    env = [{"name": "MPNN_LOOKUP", "value": f"{CONFIG_DIR}/lookup.json"},
           {"name": "MPNN_NETWORK", "value": f"{CONFIG_DIR}/network.json"},
           {"name": "MPNN_MODEL_DIR", "value": f"{MODEL_ROOT}/{net.name}"},
           {"name": PEER_KEY_FILE_ENV, "value": f"{PEER_KEY_DIR}/{PEER_KEY_ITEM}"}]
    if net.server.tls_secret:
        env.append({"name": "MPNN_TLS_DIR", "value": TLS_DIR})
    return env


def _volumes(net: NeuralNetwork) -> list[dict[str, Any]]:
    # Secrets readable by the pods' group (fsGroup RUN_AS) only: 0440.
    out = [{"name": "lookup", "configMap": {"name": naming.lookup_name(net.name)}},
           model_volume(net),
           {"name": "tmp", "emptyDir": {}},
           {"name": "peer-key", "secret": {"secretName": naming.peer_key_name(net.name), "defaultMode": 0o440}}]
    if net.server.tls_secret:
        out.append({"name": "tls", "secret": {"secretName": net.server.tls_secret, "defaultMode": 0o440}})
    return out


def _volume_mounts(net: NeuralNetwork) -> list[dict[str, Any]]:
    out = [{"name": "lookup", "mountPath": CONFIG_DIR, "readOnly": True},
           {"name": "model", "mountPath": MODEL_ROOT},
           {"name": "tmp", "mountPath": "/tmp"},
           {"name": "peer-key", "mountPath": PEER_KEY_DIR, "readOnly": True}]
    if net.server.tls_secret:
        out.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    return out


def _pod_security_context() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _container_security_context() -> dict[str, Any]:
    return {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def children(net: NeuralNetwork, assignment: Assignment, *, cluster_domain: str = "cluster.local",
             default_image: str = DEFAULT_IMAGE, default_resources: dict[str, Any] | None = None,
             status: Any = None) -> list[dict[str, Any]]:
    """Every object the operator applies for ``net`` under ``assignment``, in apply order; the
    training Job, last, is created once per run rather than applied. Not the peer-key Secret,
    whose random content only the reconciler makes (the pods refer to it by name). The disruption
    budget, in place before the servers, depends on the run's state (``status``: the
    NeuralNetwork's, see :func:`training_active`)."""
    storage = [o for o in (persistent_volume(net), volume_claim(net)) if o is not None]
    job = training_job(net, default_image)
    policy = network_policy(net)
    return [*storage, headless_service(net), inference_service(net), *([policy] if policy else []),
            lookup_configmap(net, lookup_table(net, assignment, cluster_domain)),
            *partitions(net, assignment), disruption_budget(net, training=training_active(net, status)),
            statefulset(net, default_image, default_resources), *([job] if job else [])]


def _meta(net: NeuralNetwork, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": net.namespace, "labels": naming.labels(net.name, component)}
