"""The lookup table: which partition owns which neuron, and where it listens.

This is the paper's "metadata" (arXiv 2506.01387, section 3.2): a server finds
the owner of every remote neuron here. Two schemas (``DESIGN.md``, "lookup.json"):

``mpnn.dev/lookup/v2`` (written): dense by construction, O(spec + P) bytes::

    {"apiVersion": "mpnn.dev/lookup/v2", "network": "digits", "version": "sha256:…",
     "partitions": ["digits-0.digits.default.svc.cluster.local:50052", …],   # index = partition
     "patterns": [{"even": 4}, {"starts": [0, 6], "owners": [2, 3]}],
     "layers": {"units": [128, 64, 10], "pattern": [0, 0, 1]}}

  Each layer is ``units`` neurons laid out by one pattern. A runs pattern holds
  parallel integer arrays: run ``i`` is ``[starts[i], starts[i+1])`` (the last
  ends at the layer's units) owned by ``owners[i]``; starts begin at 0 and
  increase, adjacent owners differ. ``{"even": n}`` stands for the balanced cut
  of the layer into ``n`` near-equal runs owned by 0..n-1, the first
  ``units mod n`` one unit longer (``2 <= n <= units``). Identical patterns are
  stored once, in order of first use, and referenced by index.

``mpnn.dev/lookup/v1`` (still read): one ``{"partition", "start", "end"}``
object per range per layer, O(layers x P).

``version`` is ``sha256:`` of the canonical JSON (sorted keys, no spaces) of
everything else, in the schema of the document. The v2 encoder is
deterministic, so a v2 document is canonical exactly when it is what
:meth:`LookupTable.to_dict` writes for its content; readers re-encode and
compare. Where the text is large the operator publishes it gzip-compressed as
``lookup.json.gz`` (ConfigMap ``binaryData``): :meth:`LookupTable.load` reads
either, and falls back to ``<path>.gz`` when ``<path>`` is absent.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from partition_server.api.coverage import check_coverage, normalize, range_texts
from partition_server.api.distributor import Assignment, Range, Runs
from partition_server.api.errors import FieldError

SCHEMA_V1 = "mpnn.dev/lookup/v1"
SCHEMA_V2 = "mpnn.dev/lookup/v2"
SCHEMA = SCHEMA_V2  # what build() writes
SCHEMAS = (SCHEMA_V1, SCHEMA_V2)
CONFIGMAP_LIMIT = 1024 * 1024  # bytes
# ConfigMap keys: the plain text in ``data``, or its gzip in ``binaryData`` when larger than COMPRESS_ABOVE.
KEY, GZ_KEY = "lookup.json", "lookup.json.gz"
COMPRESS_ABOVE = 128 * 1024  # bytes of lookup.json text
_GZIP_MAGIC = b"\x1f\x8b"


class LookupTableError(FieldError):
    """A lookup table that is malformed, inconsistent or of another schema."""


@dataclass(frozen=True)
class LookupTable:
    """An immutable lookup table.

    Attributes:
        network: the NeuralNetwork's name.
        addresses: ``host:port`` per partition, index = partition.
        layer_units: neurons per layer.
        owners_by_layer: per layer, its :class:`Runs` (a sequence of ranges sorted by
            start covering ``[0, units)`` once); identical layers share one object.
        version: ``sha256:<hex>`` content hash, in ``schema``.
        schema: the schema :meth:`to_dict` writes and ``version`` is computed in.
    """

    network: str
    addresses: tuple[str, ...]
    layer_units: tuple[int, ...]
    owners_by_layer: tuple[Runs, ...]
    version: str
    schema: str = SCHEMA

    @classmethod
    def build(cls, network: str, layer_units: Sequence[int], assignment: Assignment,
              addresses: Sequence[str], schema: str = SCHEMA) -> "LookupTable":
        """Make a table from a distributor assignment and one address per partition.

        ``assignment`` per layer: :class:`Runs` (kept as they are) or ranges in any order.

        Raises:
            LookupTableError: ranges that miss or double a neuron, or an owner without an address.
        """
        if schema not in SCHEMAS:
            raise LookupTableError("apiVersion", schema, f"must be one of {', '.join(SCHEMAS)}")
        layer_units = tuple(int(u) for u in layer_units)
        owners = normalize(assignment)
        problems = check_coverage(layer_units, owners)
        if problems:
            raise LookupTableError("layers", problems[0], "; ".join(problems))
        shared: dict[Runs, Runs] = {}
        runs: list[Runs] = []
        for units, ranges in zip(layer_units, owners):
            r = Runs.from_ranges(units, ranges)
            runs.append(shared.setdefault(r, r))
        for r in shared:
            top = r.max_owner()
            if top >= len(addresses):
                raise LookupTableError("partitions", top, f"owner has no address ({len(addresses)} given)")
        addresses = tuple(str(a) for a in addresses)
        encode = _body_v2 if schema == SCHEMA_V2 else _body_v1
        body = encode(network, addresses, layer_units, runs)
        return cls(network, addresses, layer_units, tuple(runs), _hash(body), schema)

    # ------------------------------------------------------------ queries

    @property
    def num_partitions(self) -> int:
        return len(self.addresses)

    @property
    def num_layers(self) -> int:
        return len(self.layer_units)

    def runs(self, layer: int) -> Runs:
        """The :class:`Runs` of ``layer``."""
        return self.owners_by_layer[layer]

    def owners(self, layer: int) -> list[Range]:
        """Ranges of ``layer`` sorted by start, covering ``[0, units)`` exactly once."""
        return list(self.owners_by_layer[layer])

    def ranges(self, layer: int, partition: int) -> list[Range]:
        """The ranges of ``layer`` that ``partition`` owns, ascending (may be empty)."""
        return [Range(partition, s, e) for s, e in self.owners_by_layer[layer].spans(partition)]

    def partitions_in_layer(self, layer: int) -> list[int]:
        """Partitions owning at least one neuron of ``layer``, ascending."""
        return self.owners_by_layer[layer].partitions()

    def owner_of(self, layer: int, unit: int) -> int:
        """The partition owning neuron ``(layer, unit)``, by binary search over the layer's runs.

        Raises:
            IndexError: the neuron does not exist.
        """
        if not 0 <= layer < len(self.owners_by_layer):
            raise IndexError(f"neuron {layer}:{unit} does not exist (no layer {layer})")
        try:
            return self.owners_by_layer[layer].owner_of(unit)
        except IndexError:
            raise IndexError(f"neuron {layer}:{unit} does not exist") from None

    def neuron_count(self, partition: int) -> int:
        per_pattern: dict[int, int] = {}
        total = 0
        for runs in self.owners_by_layer:
            key = id(runs)
            if key not in per_pattern:
                per_pattern[key] = runs.sizes().get(partition, 0)
            total += per_pattern[key]
        return total

    def range_texts(self, partition: int) -> list[str]:
        """What ``partition`` owns as ``L:A-B`` (inclusive) texts, layer-major: a Partition's
        ``spec.ranges``."""
        return range_texts(self.owners_by_layer, partition)

    # ------------------------------------------------------------ encoding

    def to_dict(self) -> dict[str, Any]:
        """The document in :attr:`schema`, ``version`` third."""
        encode = _body_v2 if self.schema == SCHEMA_V2 else _body_v1
        body = encode(self.network, self.addresses, self.layer_units, self.owners_by_layer)
        return {"apiVersion": self.schema, "network": self.network, "version": self.version,
                **{k: v for k, v in body.items() if k not in ("apiVersion", "network")}}

    def to_json(self, indent: int | None = None) -> str:
        """Compact by default: a ConfigMap holds at most 1 MiB (``CONFIGMAP_LIMIT``). With
        ``indent``, objects are indented and v2's integer arrays stay on one line."""
        doc = self.to_dict()
        if not indent:
            return json.dumps(doc, separators=(",", ":")) + "\n"
        if self.schema == SCHEMA_V1:
            return json.dumps(doc, indent=indent) + "\n"
        return _pretty(doc, indent, 0) + "\n"

    def to_gzip(self) -> bytes:
        """The compact text, gzip-compressed reproducibly (no timestamp in the header)."""
        return gzip.compress(self.to_json().encode(), compresslevel=9, mtime=0)

    def configmap_entries(self, compress_above: int = COMPRESS_ABOVE) -> tuple[dict[str, str], dict[str, str]]:
        """``(data, binaryData)`` for the lookup ConfigMap: ``{"lookup.json": text}`` while the
        text is at most ``compress_above`` bytes, else ``{"lookup.json.gz": base64(gzip)}``."""
        text = self.to_json()
        if len(text.encode()) <= compress_above:
            return {KEY: text}, {}
        return {}, {GZ_KEY: base64.b64encode(self.to_gzip()).decode("ascii")}

    # ------------------------------------------------------------ decoding

    @classmethod
    def from_dict(cls, obj: Any) -> "LookupTable":
        """Parse and check a v1 or v2 table: schema, coverage, and that ``version`` matches
        the content.

        Raises:
            LookupTableError: naming the field at fault.
        """
        if not isinstance(obj, dict):
            raise LookupTableError("lookup", type(obj).__name__, "must be a JSON object")
        schema = obj.get("apiVersion")
        if schema not in SCHEMAS:
            raise LookupTableError("apiVersion", schema, f"must be {SCHEMA_V2} (or {SCHEMA_V1})")
        try:
            network = str(obj["network"])
            version = str(obj["version"])
            if schema == SCHEMA_V1:
                addresses, units, owners = _parse_v1(obj)
            else:
                addresses, units, owners = _parse_v2(obj)
        except LookupTableError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LookupTableError("lookup", repr(exc), "is missing a field or has a wrong type") from exc
        table = cls.build(network, units, owners, addresses, schema)
        if table.version != version:
            raise LookupTableError("version", version, f"does not match the content (expected {table.version})")
        return table

    @classmethod
    def from_bytes(cls, raw: bytes, source: str = "lookup") -> "LookupTable":
        """Parse ``lookup.json`` text, or its gzip (recognised by the gzip magic bytes).

        Raises:
            LookupTableError: undecodable or invalid content.
        """
        try:
            if raw[:2] == _GZIP_MAGIC:
                raw = gzip.decompress(raw)
            obj = json.loads(raw)
        except (OSError, EOFError, zlib.error, ValueError) as exc:
            raise LookupTableError("lookup", source, f"cannot be read: {exc}") from exc
        return cls.from_dict(obj)

    @classmethod
    def load(cls, path: str | Path) -> "LookupTable":
        """Load ``lookup.json`` (plain or gzip) from a file, e.g. a mounted ConfigMap key.

        When ``path`` does not exist but ``<path>.gz`` does (a ConfigMap holding only
        ``lookup.json.gz``, mounted as a directory), that file is read.

        Raises:
            LookupTableError: unreadable or invalid file.
        """
        found = resolve_path(path)
        try:
            raw = found.read_bytes()
        except OSError as exc:
            raise LookupTableError("lookup", str(path), f"cannot be read: {exc}") from exc
        return cls.from_bytes(raw, str(found))

    @classmethod
    def from_configmap(cls, configmap: Mapping[str, Any] | None) -> "LookupTable":
        """The table in a lookup ConfigMap: ``data["lookup.json"]`` or ``binaryData["lookup.json.gz"]``.

        Raises:
            LookupTableError: neither key, or invalid content.
        """
        data = (configmap or {}).get("data") or {}
        binary = (configmap or {}).get("binaryData") or {}
        if KEY in data:
            return cls.from_bytes(str(data[KEY]).encode(), KEY)
        if GZ_KEY in binary:
            try:
                raw = base64.b64decode(binary[GZ_KEY], validate=True)
            except (binascii.Error, ValueError, TypeError) as exc:
                raise LookupTableError("binaryData", GZ_KEY, f"is not base64: {exc}") from exc
            return cls.from_bytes(raw, GZ_KEY)
        raise LookupTableError("lookup", "ConfigMap", f"has neither data.{KEY} nor binaryData.{GZ_KEY}")


def resolve_path(path: str | Path) -> Path:
    """``path``, or ``<path>.gz`` when only that exists."""
    path = Path(path)
    if not path.exists():
        gz = path.with_name(path.name + ".gz")
        if gz.exists():
            return gz
    return path


def read_version(path: str | Path) -> str | None:
    """The ``version`` field of the lookup file at ``path`` (or ``<path>.gz``), unchecked, or None
    when it cannot be read: what a server polls to notice a new table."""
    try:
        raw = resolve_path(path).read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
        version = json.loads(raw).get("version")
    except (OSError, EOFError, zlib.error, ValueError, AttributeError):
        return None
    return version if isinstance(version, str) else None


# ---------------------------------------------------------------- v2


def _pattern_key(runs: Runs) -> tuple:
    """``("even", n)`` for a balanced cut, else ``("runs", starts, owners)``."""
    n = len(runs.owners)
    if n >= 2 and runs.owners == tuple(range(n)):
        base, extra = divmod(runs.units, n)
        if all(s == p * base + min(p, extra) for p, s in enumerate(runs.starts)):
            return ("even", n)
    return ("runs", runs.starts, runs.owners)


def _body_v2(network: str, addresses: Sequence[str], layer_units: Sequence[int],
             owners: Sequence[Runs]) -> dict[str, Any]:
    index: dict[tuple, int] = {}
    patterns: list[dict[str, Any]] = []
    refs: list[int] = []
    by_object: dict[int, int] = {}  # layers sharing one Runs object share its pattern
    for runs in owners:
        ref = by_object.get(id(runs))
        if ref is None:
            key = _pattern_key(runs)
            ref = index.get(key)
            if ref is None:
                ref = index[key] = len(patterns)
                patterns.append({"even": key[1]} if key[0] == "even"
                                else {"starts": list(key[1]), "owners": list(key[2])})
            by_object[id(runs)] = ref
        refs.append(ref)
    return {"apiVersion": SCHEMA_V2, "network": network, "partitions": list(addresses),
            "patterns": patterns, "layers": {"units": list(layer_units), "pattern": refs}}


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LookupTableError(where, value, "must be an integer")
    return value


def _parse_v2(obj: dict[str, Any]) -> tuple[list[str], list[int], list[Runs]]:
    partitions = obj["partitions"]
    if not isinstance(partitions, list) or not all(isinstance(a, str) for a in partitions):
        raise LookupTableError("partitions", partitions if not isinstance(partitions, list) else "…",
                               "must be a list of address strings")
    layers = obj["layers"]
    units = [_int(u, f"layers.units[{k}]") for k, u in enumerate(layers["units"])]
    refs = [_int(r, f"layers.pattern[{k}]") for k, r in enumerate(layers["pattern"])]
    if len(units) != len(refs):
        raise LookupTableError("layers.pattern", len(refs), f"must have one entry per layer ({len(units)})")
    patterns = obj["patterns"]
    if not isinstance(patterns, list):
        raise LookupTableError("patterns", type(patterns).__name__, "must be a list")
    shared: dict[tuple[int, int], Runs] = {}
    owners: list[Runs] = []
    for k, (u, ref) in enumerate(zip(units, refs)):
        runs = shared.get((u, ref))
        if runs is None:
            if not 0 <= ref < len(patterns):
                raise LookupTableError(f"layers.pattern[{k}]", ref, f"no such pattern ({len(patterns)} given)")
            if u < 1:
                raise LookupTableError(f"layers.units[{k}]", u, "must be at least 1")
            runs = shared[(u, ref)] = _decode_pattern(patterns[ref], u, f"patterns[{ref}]", k)
        owners.append(runs)
    unused = sorted(set(range(len(patterns))) - set(refs))
    if unused:
        raise LookupTableError("patterns", unused, "are used by no layer")
    return list(partitions), units, owners


def _decode_pattern(pattern: Any, units: int, where: str, layer: int) -> Runs:
    if not isinstance(pattern, dict):
        raise LookupTableError(where, pattern, "must be an object")
    if set(pattern) == {"even"}:
        n = _int(pattern["even"], f"{where}.even")
        if not 1 <= n <= units:
            raise LookupTableError("layers", f"{where}.even={n}",
                                   f"layer {layer} has {units} units: an even cut needs 1 <= n <= units")
        return Runs.even(units, n)
    if set(pattern) != {"starts", "owners"}:
        raise LookupTableError(where, sorted(pattern), "must hold 'starts' and 'owners', or 'even'")
    starts = [_int(s, f"{where}.starts") for s in pattern["starts"]]
    owners = [_int(o, f"{where}.owners") for o in pattern["owners"]]
    try:
        return Runs(units, starts, owners)
    except ValueError as exc:
        raise LookupTableError("layers", f"layer {layer} ({where})", str(exc)) from None


def _pretty(value: Any, indent: int, level: int) -> str:
    """JSON with objects indented and lists of scalars on one line."""
    pad, inner = " " * (indent * level), " " * (indent * (level + 1))
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{inner}{json.dumps(k)}: {_pretty(v, indent, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = [inner + _pretty(v, indent, level + 1) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(value, separators=(", ", ": "))


# ---------------------------------------------------------------- v1


def _body_v1(network: str, addresses: Sequence[str], layer_units: Sequence[int],
             owners: Sequence[Runs]) -> dict[str, Any]:
    return {
        "apiVersion": SCHEMA_V1,
        "network": network,
        "partitions": [{"index": i, "address": a} for i, a in enumerate(addresses)],
        "layers": [{"units": u, "owners": [{"partition": p, "start": s, "end": e} for p, s, e in runs.triples()]}
                   for u, runs in zip(layer_units, owners)],
    }


def _parse_v1(obj: dict[str, Any]) -> tuple[list[str], list[int], list[list[Range]]]:
    addresses: list[str] = [""] * len(obj["partitions"])
    for i, p in enumerate(obj["partitions"]):
        if p["index"] != i:
            raise LookupTableError(f"partitions[{i}].index", p["index"], f"must be {i}")
        addresses[i] = str(p["address"])
    units = [int(layer["units"]) for layer in obj["layers"]]
    owners = [[Range(int(o["partition"]), int(o["start"]), int(o["end"])) for o in layer["owners"]]
              for layer in obj["layers"]]
    return addresses, units, owners


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
