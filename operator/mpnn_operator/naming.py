"""Names, labels and API coordinates of everything the operator owns.

One place decides what a child is called and how it is found again, so the
builders, the reconciler and ``mpnn render`` cannot drift apart.
"""

from __future__ import annotations

import hashlib

from partition_server.api.manifest import API_VERSION, RESERVED_NAME_SUFFIX

__all__ = ["API_VERSION", "COMPONENT", "FIELD_MANAGER", "GROUP", "INFERENCE", "LOOKUP", "MANAGED_BY",
           "MAX_LABEL_VALUE", "NAMESPACE", "NETWORK", "NETWORKS", "PARTITION", "PARTITIONS", "PARTITION_COMPONENT",
           "POD_INDEX_LABEL", "RUN", "SERVER", "STORAGE", "TRAINING", "children_selector", "claim_name",
           "inference_service_name", "job_name", "labels", "lookup_name", "network_policy_name", "partition_name",
           "peer_key_name", "pod_name", "selector",
           "selector_string", "volume_name", "VERSION"]

# The NeuralNetwork API's coordinates are the manifest's (partition_server.api.manifest).
GROUP, VERSION = API_VERSION.split("/")
NETWORKS = "neuralnetworks"
PARTITIONS = "partitions"

FIELD_MANAGER = "mpnn-operator"

MANAGED_BY = "app.kubernetes.io/managed-by"
NETWORK = f"{GROUP}/network"
NAMESPACE = f"{GROUP}/namespace"
PARTITION = f"{GROUP}/partition"
RUN = f"{GROUP}/run"
COMPONENT = "app.kubernetes.io/component"
# Components: the partition server pods and their Services/StatefulSet, the
# Partition CRs, the lookup ConfigMap, the model volume, the training Jobs.
SERVER, PARTITION_COMPONENT, LOOKUP, STORAGE = "server", "partition", "lookup", "storage"
INFERENCE, TRAINING = "inference", "training"

# Names that end up as label values (a Job's name labels its pods) must fit this.
MAX_LABEL_VALUE = 63

# Set by the StatefulSet controller on every pod since Kubernetes 1.28.
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"


def labels(network: str, component: str) -> dict[str, str]:
    """Labels carried by every child of NeuralNetwork ``network``."""
    return {
        "app.kubernetes.io/name": "mpnn",
        "app.kubernetes.io/instance": network,
        COMPONENT: component,
        "app.kubernetes.io/part-of": "mpnn",
        MANAGED_BY: FIELD_MANAGER,
        NETWORK: network,
    }


def selector(network: str) -> dict[str, str]:
    """``matchLabels`` of the partition server pods (immutable once the StatefulSet exists)."""
    return {NETWORK: network, COMPONENT: SERVER}


def selector_string(network: str) -> str:
    """:func:`selector` as a label selector string, e.g. for ``status.selector``."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector(network).items()))


def children_selector(network: str) -> str:
    """Label selector that finds every child of ``network`` (add the namespace label for PVs)."""
    return f"{MANAGED_BY}={FIELD_MANAGER},{NETWORK}={network}"


def partition_name(network: str, index: int) -> str:
    return f"{network}-{index}"


def lookup_name(network: str) -> str:
    return f"{network}-lookup"


def inference_service_name(network: str) -> str:
    """``<network>-inference``: the manifest refuses network names with this suffix, so it
    never names another network's headless Service."""
    return f"{network}{RESERVED_NAME_SUFFIX}"


def peer_key_name(network: str) -> str:
    """The Secret holding the network's peer key (``<network>-peer-key``, item ``key``)."""
    return f"{network}-peer-key"


def network_policy_name(network: str) -> str:
    """The NetworkPolicy that keeps the peer port to the network's own pods."""
    return f"{network}-peers"


def job_name(network: str, run_id: str) -> str:
    """The training Job of run ``run_id``: ``<network>-train-<runId>``, or, beyond 63
    characters, its first 54 plus a hash of both, so distinct runs keep distinct names."""
    name = f"{network}-train-{run_id}"
    if len(name) <= MAX_LABEL_VALUE:
        return name
    digest = hashlib.sha256(f"{network}/{run_id}".encode()).hexdigest()[:8]
    return f"{name[:MAX_LABEL_VALUE - 9].rstrip('-')}-{digest}"


def claim_name(network: str) -> str:
    return f"{network}-model"


def volume_name(namespace: str, network: str) -> str:
    """The NFS PersistentVolume's name. PVs are cluster-scoped; dots cannot occur in
    namespace or network names, so no two networks can map to the same PV."""
    return f"mpnn.{namespace}.{network}"


def pod_name(network: str, index: int) -> str:
    return f"{network}-{index}"
