"""The ``NeuralNetwork`` manifest's model: its constants, :class:`ManifestError` and the spec dataclasses.

:mod:`partition_server.api.manifest` parses and validates a manifest into these (and re-exports
them: importers keep using ``api.manifest``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from partition_server.api.errors import FieldError
from partition_server.api.distributor import Distribution, DistributionError, distribute

__all__ = [
    "ACTIVATIONS",
    "API_VERSION",
    "DATASET_FORMATS",
    "DEFAULT_HTTP_PORT",
    "DEFAULT_IMAGE",
    "DEFAULT_PEER_PORT",
    "DEFAULT_PORT",
    "DEFAULT_TRAINER_SERVICE_ACCOUNT",
    "DatasetSpec",
    "DynamicBatching",
    "KIND",
    "LayerSpec",
    "ManifestError",
    "ModelSpec",
    "NAMESPACE_RE",
    "NFSStorage",
    "NeuralNetwork",
    "OPTIMIZERS",
    "RESERVED_NAME_SUFFIX",
    "ServerSpec",
    "StorageSpec",
    "TrainingSpec",
]

API_VERSION = "mpnn.dev/v1alpha1"
KIND = "NeuralNetwork"
ACTIVATIONS = ("relu", "sigmoid", "tanh", "identity", "softmax")
OPTIMIZERS = ("sgd", "adam")
DATASET_FORMATS = ("digits", "mnist-idx", "npz")
DEFAULT_PORT = 50051
DEFAULT_HTTP_PORT = 8000
# The internal service mpnn.v1.Partition: its own port, in the headless Service only.
DEFAULT_PEER_PORT = 50052
DEFAULT_TRAINER_SERVICE_ACCOUNT = "mpnn-trainer"
# The partition servers' image when neither spec.server.image nor the operator's
# --server-image (the Helm chart sets it to its own image) says otherwise.
DEFAULT_IMAGE = "ghcr.io/mpnn/mpnn:0.1.0"
# StatefulSet pods are named <name>-<ordinal> and carry a controller-revision-hash
# label built from the name, which caps StatefulSet names at 52 characters.
_NAME_RE = re.compile(r"[a-z]([-a-z0-9]{0,50}[a-z0-9])?")
# Network N's Open Inference Service is N-inference, the name network N-inference gives its
# headless Service: such a name is refused rather than fought over.
RESERVED_NAME_SUFFIX = "-inference"
_SECRET_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
# A DNS-1123 label, as Kubernetes requires of namespaces (also `mpnn render --namespace`).
NAMESPACE_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# A DNS-1123 subdomain, as Kubernetes requires of ServiceAccount names.
_SUBDOMAIN_RE = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class ManifestError(FieldError):
    """Invalid manifest input. ``field`` is the path (``spec.partitions``), ``value`` what was given."""


@dataclass(frozen=True)
class LayerSpec:
    """One dense layer: ``units`` neurons and their activation."""

    units: int
    activation: str = "relu"


@dataclass(frozen=True)
class ModelSpec:
    """``spec.model``: ``inputs`` features feed layer 0; ``weights`` is an optional
    safetensors file in PyTorch ``nn.Linear`` layout to import."""

    inputs: int
    layers: tuple[LayerSpec, ...]
    weights: str | None = None
    seed: int = 0

    @property
    def layer_units(self) -> list[int]:
        return [layer.units for layer in self.layers]

    @property
    def total_neurons(self) -> int:
        return sum(self.layer_units)

    def shape_dict(self) -> dict[str, Any]:
        """``{"inputs": 64, "layers": [{"units": 128, "activation": "relu"}, ...]}``."""
        return {"inputs": self.inputs,
                "layers": [{"units": l.units, "activation": l.activation} for l in self.layers]}


@dataclass(frozen=True)
class NFSStorage:
    server: str
    path: str


@dataclass(frozen=True)
class StorageSpec:
    """``spec.storage``: exactly one of an NFS export or an existing ReadWriteMany claim."""

    nfs: NFSStorage | None = None
    existing_claim: str | None = None
    size: str = "1Gi"


@dataclass(frozen=True)
class DatasetSpec:
    format: str = "digits"
    path: str | None = None


@dataclass(frozen=True)
class TrainingSpec:
    """``spec.training``. ``learning_rate`` is per step; ``checkpoint_every`` counts steps (0: per epoch only).
    ``service_account_name`` is the identity of the training Job's pod in a cluster (unused locally)."""

    dataset: DatasetSpec = DatasetSpec()
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    checkpoint_every: int = 0
    run_id: str = "run-1"
    seed: int = 0
    service_account_name: str = DEFAULT_TRAINER_SERVICE_ACCOUNT


@dataclass(frozen=True)
class DynamicBatching:
    """``spec.server.dynamicBatching``: inference requests that arrive within ``max_delay_us``
    microseconds of each other run as one forward pass of at most ``max_batch_size`` rows (the
    dynamic batcher of Triton Inference Server, ``max_queue_delay_microseconds`` and
    ``max_batch_size``). Absent: every request is its own pass."""

    max_delay_us: int
    max_batch_size: int = 64


@dataclass(frozen=True)
class ServerSpec:
    """``spec.server``: the partition servers' container image, public gRPC port (Open Inference
    Protocol, health), Open Inference Protocol REST port, peer port (``mpnn.v1.Partition``, for
    this network's servers and trainer only) and resources. ``image`` None: the operator's (or
    ``mpnn render``'s) ``--server-image``. ``resources`` empty: the operator's defaults.
    ``network_policy``: whether the operator makes a NetworkPolicy that admits the peer port
    only from this network's pods. ``tls_secret``: a ``kubernetes.io/tls`` Secret (with
    ``ca.crt``) for mTLS between peers and TLS on the public ports; None: plaintext.
    ``dynamic_batching``: see :class:`DynamicBatching`; None: off."""

    image: str | None = None
    port: int = DEFAULT_PORT
    http_port: int = DEFAULT_HTTP_PORT
    resources: Mapping[str, Any] = field(default_factory=dict)
    peer_port: int = DEFAULT_PEER_PORT
    network_policy: bool = True
    tls_secret: str | None = None
    dynamic_batching: "DynamicBatching | None" = None


@dataclass(frozen=True)
class NeuralNetwork:
    """A parsed, validated NeuralNetwork manifest."""

    name: str
    namespace: str
    model: ModelSpec
    partitions: int
    distribution: Distribution = Distribution()
    storage: StorageSpec | None = None
    training: TrainingSpec | None = None
    server: ServerSpec = ServerSpec()

    def with_partitions(self, partitions: int) -> "NeuralNetwork":
        """The same network on another partition count, validated again (``--partitions N``).

        Raises:
            ManifestError: the distribution's lists no longer fit.
        """
        out = replace(self, partitions=partitions)
        _check_distribution(out)
        return out


def _check_distribution(net: NeuralNetwork) -> None:
    try:
        distribute(net.model.layer_units, net.partitions, net.distribution)
    except DistributionError as exc:
        raise ManifestError(exc.field, exc.value, exc.message) from exc
