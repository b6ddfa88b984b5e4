"""The lookup table: which partition owns which neuron, and where it listens.

Schema ``mpnn.dev/lookup/v1`` (``DESIGN.md``, "lookup.json"). This is the
paper's "metadata" (arXiv 2506.01387, section 3.2): a server finds the owner of
every remote neuron here. Owners are stored as half-open ranges per layer, so
the table for a 10-million-neuron network under any range strategy stays far
below the 1 MiB ConfigMap limit. ``version`` is ``sha256:`` of the canonical
JSON of everything else, so two tables with the same content share a version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from partition_server.api.distributor import Assignment, Range, check_coverage, normalize
from partition_server.api.errors import FieldError

SCHEMA = "mpnn.dev/lookup/v1"
CONFIGMAP_LIMIT = 1024 * 1024  # bytes


class LookupTableError(FieldError):
    """A lookup table that is malformed, inconsistent or of another schema."""


@dataclass(frozen=True)
class LookupTable:
    """An immutable lookup table.

    Attributes:
        network: the NeuralNetwork's name.
        addresses: ``host:port`` per partition, index = partition.
        owners_by_layer: per layer, ranges sorted by start covering ``[0, units)`` once.
        layer_units: neurons per layer.
        version: ``sha256:<hex>`` content hash.
    """

    network: str
    addresses: tuple[str, ...]
    layer_units: tuple[int, ...]
    owners_by_layer: tuple[tuple[Range, ...], ...]
    version: str

    @classmethod
    def build(cls, network: str, layer_units: Sequence[int], assignment: Assignment,
              addresses: Sequence[str]) -> "LookupTable":
        """Make a table from a distributor assignment and one address per partition.

        Raises:
            LookupTableError: ranges that miss or double a neuron, or an owner without an address.
        """
        owners = normalize(assignment)
        problems = check_coverage(layer_units, owners)
        if problems:
            raise LookupTableError("layers", problems[0], "; ".join(problems))
        for ranges in owners:
            for r in ranges:
                if not 0 <= r.partition < len(addresses):
                    raise LookupTableError("partitions", r.partition, f"owner has no address ({len(addresses)} given)")
        body = _body(network, addresses, layer_units, owners)
        return cls(network, tuple(addresses), tuple(layer_units),
                   tuple(tuple(r) for r in owners), _hash(body))

    @property
    def num_partitions(self) -> int:
        return len(self.addresses)

    @property
    def num_layers(self) -> int:
        return len(self.layer_units)

    def owners(self, layer: int) -> list[Range]:
        """Ranges of ``layer`` sorted by start, covering ``[0, units)`` exactly once."""
        return list(self.owners_by_layer[layer])

    def ranges(self, layer: int, partition: int) -> list[Range]:
        """The ranges of ``layer`` that ``partition`` owns, ascending (may be empty)."""
        return [r for r in self.owners_by_layer[layer] if r.partition == partition]

    def partitions_in_layer(self, layer: int) -> list[int]:
        """Partitions owning at least one neuron of ``layer``, ascending."""
        return sorted({r.partition for r in self.owners_by_layer[layer]})

    def owner_of(self, layer: int, unit: int) -> int:
        """The partition owning neuron ``(layer, unit)``. Raises IndexError if it does not exist."""
        for r in self.owners_by_layer[layer]:
            if r.start <= unit < r.end:
                return r.partition
        raise IndexError(f"neuron {layer}:{unit} does not exist")

    def neuron_count(self, partition: int) -> int:
        return sum(r.size for ranges in self.owners_by_layer for r in ranges if r.partition == partition)

    def to_dict(self) -> dict[str, Any]:
        body = _body(self.network, self.addresses, self.layer_units, self.owners_by_layer)
        return {"apiVersion": SCHEMA, "network": self.network, "version": self.version,
                **{k: v for k, v in body.items() if k not in ("apiVersion", "network")}}

    def to_json(self, indent: int | None = None) -> str:
        """Compact by default: a ConfigMap holds at most 1 MiB (``CONFIGMAP_LIMIT``)."""
        return json.dumps(self.to_dict(), indent=indent, separators=None if indent else (",", ":")) + "\n"

    @classmethod
    def from_dict(cls, obj: Any) -> "LookupTable":
        """Parse and check a table: schema, coverage, and that ``version`` matches the content.

        Raises:
            LookupTableError: naming the field at fault.
        """
        if not isinstance(obj, dict):
            raise LookupTableError("lookup", type(obj).__name__, "must be a JSON object")
        if obj.get("apiVersion") != SCHEMA:
            raise LookupTableError("apiVersion", obj.get("apiVersion"), f"must be {SCHEMA}")
        try:
            addresses = [None] * len(obj["partitions"])
            for i, p in enumerate(obj["partitions"]):
                if p["index"] != i:
                    raise LookupTableError(f"partitions[{i}].index", p["index"], f"must be {i}")
                addresses[i] = str(p["address"])
            units = [int(layer["units"]) for layer in obj["layers"]]
            owners = [[Range(int(o["partition"]), int(o["start"]), int(o["end"])) for o in layer["owners"]]
                      for layer in obj["layers"]]
            network = str(obj["network"])
            version = str(obj["version"])
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, LookupTableError):
                raise
            raise LookupTableError("lookup", repr(exc), "is missing a field or has a wrong type") from exc
        table = cls.build(network, units, owners, addresses)
        if table.version != version:
            raise LookupTableError("version", version, f"does not match the content (expected {table.version})")
        return table

    @classmethod
    def load(cls, path: str | Path) -> "LookupTable":
        """Load ``lookup.json`` from a file, e.g. a mounted ConfigMap key.

        Raises:
            LookupTableError: unreadable or invalid file.
        """
        try:
            obj = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LookupTableError("lookup", str(path), f"cannot be read: {exc}") from exc
        return cls.from_dict(obj)


def _body(network: str, addresses: Sequence[str], layer_units: Sequence[int],
          owners: Sequence[Sequence[Range]]) -> dict[str, Any]:
    return {
        "apiVersion": SCHEMA,
        "network": network,
        "partitions": [{"index": i, "address": a} for i, a in enumerate(addresses)],
        "layers": [{"units": u, "owners": [{"partition": r.partition, "start": r.start, "end": r.end}
                                           for r in ranges]}
                   for u, ranges in zip(layer_units, owners)],
    }


def _hash(body: dict[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def service_addresses(name: str, namespace: str, partitions: int, port: int,
                      cluster_domain: str = "cluster.local") -> list[str]:
    """Stable pod DNS names behind the headless Service ``<name>``:
    ``<name>-<i>.<name>.<namespace>.svc.<clusterDomain>:<port>``."""
    return [f"{name}-{i}.{name}.{namespace}.svc.{cluster_domain}:{port}" for i in range(partitions)]


def loopback_addresses(ports: Sequence[int], host: str = "127.0.0.1") -> list[str]:
    """Local-mode addresses, one per partition."""
    return [f"{host}:{p}" for p in ports]
