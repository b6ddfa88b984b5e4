"""The on-disk schema of a checkpoint: directory layout, shard descriptions and the commit record.

Layout under the store root (the network's directory on the volume)::

    <root>/checkpoints/<sequence:012d>/shard-<partition:05d>.safetensors
    <root>/checkpoints/<sequence:012d>/reservation.json
    <root>/checkpoints/<sequence:012d>/commit.json

``reservation.json`` is written first, by the driver, when it reserves the
sequence (see :mod:`.reservation`); shards are written only for a reserved
sequence. ``commit.json`` is the *commit record*: written last, it lists every shard with
its row ranges, tensor specs, size and sha256, and is what makes the directory
a checkpoint. Schema ``mpnn.dev/checkpoint/v2``::

    {"apiVersion": "mpnn.dev/checkpoint/v2", "sequence": 7, "created": "2025-01-01T00:00:00Z",
     "network": {"inputs": 64, "layers": [{"units": 128}, ...]}, "meta": {...},
     "shards": [ShardInfo.to_dict(), ...]}

Checkpoints written before the rename are still read: their record is
``manifest.json`` with schema ``mpnn.dev/checkpoint/v1`` and the number under
``"step"``; everything else is the same. Only the new form is ever written.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from partition_server.storage.validation import StoreError, check_int, check_network, check_ranges

__all__ = [
    "CHECKPOINTS",
    "CHECKPOINT_SCHEMA",
    "COMMIT_RECORD",
    "CommitRecord",
    "LEGACY_CHECKPOINT_SCHEMA",
    "LEGACY_COMMIT_RECORD",
    "MAX_SEQUENCE",
    "RECORD_NAMES",
    "RESERVATION",
    "RESERVATION_SCHEMA",
    "SEQUENCE_DIR",
    "ShardInfo",
    "TensorSpec",
    "record_path",
    "shard_file",
]

CHECKPOINT_SCHEMA = "mpnn.dev/checkpoint/v2"
"""``apiVersion`` of the commit records this code writes (``commit.json``, ``"sequence"``)."""
LEGACY_CHECKPOINT_SCHEMA = "mpnn.dev/checkpoint/v1"
"""``apiVersion`` of records written before the rename (``manifest.json``, ``"step"``); read only."""
COMMIT_RECORD = "commit.json"
LEGACY_COMMIT_RECORD = "manifest.json"
RECORD_NAMES = (COMMIT_RECORD, LEGACY_COMMIT_RECORD)
"""Names a commit record may have, in the order a reader looks for them."""
CHECKPOINTS = "checkpoints"
RESERVATION = "reservation.json"
"""The reservation of a sequence, created exclusively by the driver before any shard is written."""
RESERVATION_SCHEMA = "mpnn.dev/reservation/v1"
"""``apiVersion`` of ``reservation.json``."""
MAX_SEQUENCE = 10**12 - 1
"""Highest checkpoint sequence number: the directory name has 12 digits."""
SEQUENCE_DIR = re.compile(r"^\d{12}$")
"""Matches the name of a checkpoint's directory (committed or not)."""

_SEQUENCE_KEY = {CHECKPOINT_SCHEMA: "sequence", LEGACY_CHECKPOINT_SCHEMA: "step"}


def shard_file(partition: int) -> str:
    """File name of ``partition``'s shard inside a checkpoint directory: ``shard-<partition:05d>.safetensors``."""
    return f"shard-{partition:05d}.safetensors"


def record_path(directory: str | os.PathLike[str]) -> Path | None:
    """The commit record in checkpoint ``directory`` (``commit.json``, else a legacy
    ``manifest.json``), or None if the directory holds neither: it is not committed."""
    for name in RECORD_NAMES:
        path = Path(directory) / name
        if path.exists():
            return path
    return None


@dataclass(frozen=True)
class TensorSpec:
    """dtype (numpy name, e.g. ``"float32"``) and full shape of one tensor in a shard."""

    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """``{"dtype": str, "shape": [int, ...]}``."""
        return {"dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ShardInfo:
    """What one partition wrote for one checkpoint: returned by :meth:`ModelStore.write_shard`.

    Passed to :meth:`ModelStore.commit` by whoever commits the checkpoint;
    travels as JSON via :meth:`to_dict` / :meth:`from_dict`.

    Attributes:
        file: shard file name inside the checkpoint directory.
        partition: index of the writing partition.
        ranges: layer -> row ranges held (layers with no rows are absent).
        tensors: layer -> tensor name -> :class:`TensorSpec`.
        sha256: hex digest of the file.
        size: file size in bytes.
    """

    file: str
    partition: int
    ranges: dict[int, tuple[tuple[int, int], ...]]
    tensors: dict[int, dict[str, TensorSpec]]
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable form (the shard entry of the commit record)."""
        return {
            "file": self.file,
            "partition": self.partition,
            "sha256": self.sha256,
            "size": self.size,
            "layers": [
                {
                    "layer": k,
                    "ranges": [[s, e] for s, e in self.ranges[k]],
                    "tensors": {n: spec.to_dict() for n, spec in sorted(self.tensors[k].items())},
                }
                for k in sorted(self.ranges)
            ],
        }

    @classmethod
    def from_dict(cls, obj: Any, where: str = "shard") -> "ShardInfo":
        """Inverse of :meth:`to_dict`.

        Raises:
            StoreError: naming ``where`` and the field, for a missing or malformed field.
        """
        if not isinstance(obj, Mapping):
            raise StoreError(f"{where} must be an object, got {type(obj).__name__}")
        file = obj.get("file")
        if not isinstance(file, str) or not file or "/" in file or file.startswith("."):
            raise StoreError(f"{where}.file must be a plain file name, got {file!r}")
        partition = check_int(obj.get("partition"), f"{where}.partition")
        digest = obj.get("sha256")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise StoreError(f"{where}.sha256 must be 64 lowercase hex digits, got {digest!r}")
        size = check_int(obj.get("size"), f"{where}.size")
        layers = obj.get("layers")
        if not isinstance(layers, list):
            raise StoreError(f"{where}.layers must be a list, got {layers!r}")
        ranges: dict[int, tuple[tuple[int, int], ...]] = {}
        tensors: dict[int, dict[str, TensorSpec]] = {}
        for i, entry in enumerate(layers):
            f = f"{where}.layers[{i}]"
            if not isinstance(entry, Mapping):
                raise StoreError(f"{f} must be an object, got {entry!r}")
            k = check_int(entry.get("layer"), f"{f}.layer")
            if k in ranges:
                raise StoreError(f"{f}.layer {k} appears twice")
            ranges[k] = check_ranges(entry.get("ranges"), f"{f}.ranges")
            specs = entry.get("tensors")
            if not isinstance(specs, Mapping):
                raise StoreError(f"{f}.tensors must be an object, got {specs!r}")
            tensors[k] = {}
            for name, spec in specs.items():
                if not isinstance(spec, Mapping) or not isinstance(spec.get("dtype"), str) \
                        or not isinstance(spec.get("shape"), list):
                    raise StoreError(f"{f}.tensors.{name} must be {{dtype, shape}}, got {spec!r}")
                shape = tuple(check_int(d, f"{f}.tensors.{name}.shape") for d in spec["shape"])
                tensors[k][str(name)] = TensorSpec(spec["dtype"], shape)
        return cls(file=file, partition=partition, ranges=ranges, tensors=tensors, sha256=digest, size=size)


@dataclass(frozen=True)
class CommitRecord:
    """A parsed commit record (``commit.json``, or a legacy ``manifest.json``).

    Attributes:
        schema: its ``apiVersion``: :data:`CHECKPOINT_SCHEMA` or :data:`LEGACY_CHECKPOINT_SCHEMA`.
        sequence: the checkpoint's number, 0 .. :data:`MAX_SEQUENCE`.
        network: the network shape recorded at commit (``inputs``, ``layers``, extra keys as given).
        units: neurons per layer, from ``network``.
        meta: free-form metadata recorded at commit (lookup version, epoch, loss, optimizer, ...).
        created: ISO-8601 UTC time of the commit ("" if absent).
        shards: the shards, as written.
    """

    schema: str
    sequence: int
    network: dict[str, Any]
    units: tuple[int, ...]
    meta: dict[str, Any]
    created: str
    shards: tuple[ShardInfo, ...]

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> "CommitRecord":
        """Parse and validate a record of either schema; ``where`` (its path) prefixes every error.

        Coverage of the neurons by the shards is not checked here (see :mod:`.checkpoint`).

        Raises:
            StoreError: if the record is not an object, of an unknown schema, or malformed.
        """
        if not isinstance(obj, Mapping):
            raise StoreError(f"{where}: must hold a JSON object")
        schema = obj.get("apiVersion")
        if schema not in _SEQUENCE_KEY:
            raise StoreError(f"{where}: apiVersion must be {CHECKPOINT_SCHEMA} (or the legacy "
                             f"{LEGACY_CHECKPOINT_SCHEMA}), got {schema!r}")
        key = _SEQUENCE_KEY[schema]
        sequence = check_int(obj.get(key), f"{where}: {key}", maximum=MAX_SEQUENCE)
        units = tuple(check_network(obj.get("network")))
        meta = obj.get("meta", {})
        if not isinstance(meta, Mapping):
            raise StoreError(f"{where}: meta must be an object")
        raw_shards = obj.get("shards")
        if not isinstance(raw_shards, list) or not raw_shards:
            raise StoreError(f"{where}: shards must be a non-empty list")
        shards = tuple(ShardInfo.from_dict(s, f"{where}: shards[{i}]") for i, s in enumerate(raw_shards))
        return cls(schema=schema, sequence=sequence, network=dict(obj["network"]), units=units,
                   meta=dict(meta), created=str(obj.get("created", "")), shards=shards)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of :data:`CHECKPOINT_SCHEMA`, whatever schema this record was read from."""
        return {
            "apiVersion": CHECKPOINT_SCHEMA,
            "sequence": self.sequence,
            "created": self.created,
            "network": dict(self.network),
            "meta": dict(self.meta),
            "shards": [s.to_dict() for s in sorted(self.shards, key=lambda s: s.partition)],
        }
