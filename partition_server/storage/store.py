"""The model store: checkpoints of one network on the shared volume.

``DESIGN.md``, "Shared model on NFS": every neuron has exactly one owner, so
each partition writes only the rows of its own neurons (weight rows, biases,
optimizer state rows) into its own shard file, and writers never share bytes.
A checkpoint is those shard files plus a manifest written last; a checkpoint
without its manifest does not exist. Any server can later read the rows it
owns *now* from whichever shards hold them, whatever the assignment was when
the checkpoint was written.

Layout under the store root (the network's directory on the volume)::

    <root>/checkpoints/<step:012d>/shard-<partition:05d>.safetensors
    <root>/checkpoints/<step:012d>/manifest.json

Shard files are safetensors (https://huggingface.co/docs/safetensors) with
keys ``layers.{k}.{name}``: ``weight`` ``[rows, inputs_k]``, ``bias``
``[rows]``, and optimizer state such as ``weight.momentum``; the first
dimension is the concatenation, in order, of the shard's row ranges of layer
``k``. Every file (shard, manifest, export) is written to a temporary file in
the target directory, fsynced and moved into place with ``os.replace``, so a
reader sees either the old file or the complete new one.

Typical use::

    store = ModelStore("/mnt/model/digits")
    info = store.write_shard(step, partition, {0: {"weight": w, "bias": b}}, {0: [(0, 32)]})
    # ... one partition (the coordinator) collects every ShardInfo, then:
    store.commit(step, infos, network={"inputs": 64, "layers": [{"units": 128}, ...]})
    ckpt = store.latest()
    w_rows = ckpt.read_rows(0, "weight", [(32, 64)])
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from partition_server.api.distributor import Range, check_coverage

__all__ = [
    "CHECKPOINT_SCHEMA",
    "Checkpoint",
    "CheckpointNotFoundError",
    "ModelStore",
    "RowRanges",
    "ShardInfo",
    "StoreError",
    "TensorSpec",
    "read_torch_rows",
]

log = logging.getLogger(__name__)

CHECKPOINT_SCHEMA = "mpnn.dev/checkpoint/v1"
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
MAX_STEP = 10**12 - 1  # the directory name has 12 digits

RowRanges = list[tuple[int, int]]
"""Half-open ``(start, end)`` neuron index ranges within one layer, ascending, not overlapping."""

_STEP_DIR = re.compile(r"^\d{12}$")
_HASH_CHUNK = 1 << 20


class StoreError(ValueError):
    """Bad input to the store, or a checkpoint that is inconsistent or corrupt.

    The message names the step, layer, tensor or file and what was wrong.
    """


class CheckpointNotFoundError(StoreError, LookupError):
    """No committed checkpoint exists for the requested step."""


# ---------------------------------------------------------------------------
# small helpers


def _check_int(value: Any, field: str, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise StoreError(f"{field} must be an int, got {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        hi = "" if maximum is None else f"..{maximum}"
        raise StoreError(f"{field} must be in {minimum}{hi}, got {value}")
    return value


def _check_ranges(ranges: Any, field: str, units: int | None = None) -> tuple[tuple[int, int], ...]:
    """Validate RowRanges: ints, ``start < end``, ascending, not overlapping, within ``units``."""
    if isinstance(ranges, (str, bytes)) or not isinstance(ranges, Iterable):
        raise StoreError(f"{field} must be a list of (start, end) pairs, got {ranges!r}")
    out: list[tuple[int, int]] = []
    previous_end = 0
    for i, r in enumerate(ranges):
        try:
            start, end = r
        except (TypeError, ValueError):
            raise StoreError(f"{field}[{i}] must be a (start, end) pair, got {r!r}") from None
        start = _check_int(start, f"{field}[{i}] start")
        end = _check_int(end, f"{field}[{i}] end")
        if start >= end:
            raise StoreError(f"{field}[{i}] = ({start}, {end}) is empty or reversed; ranges are half-open [start, end)")
        if start < previous_end:
            raise StoreError(f"{field}[{i}] = ({start}, {end}) overlaps or precedes the range before it; "
                             "ranges must be ascending and disjoint")
        if units is not None and end > units:
            raise StoreError(f"{field}[{i}] = ({start}, {end}) exceeds the layer's {units} units")
        out.append((start, end))
        previous_end = end
    return tuple(out)


def _rows(ranges: Sequence[tuple[int, int]]) -> int:
    return sum(end - start for start, end in ranges)


def _fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable. Not every filesystem supports it (EINVAL); that is fine."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EROFS):
            raise
    finally:
        os.close(fd)


def _temp_path(target: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _sync_and_hash(path: Path) -> tuple[str, int]:
    """fsync ``path`` and return its sha256 hex digest and size in bytes."""
    h = hashlib.sha256()
    size = 0
    with open(path, "r+b") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return h.hexdigest(), size


def _hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_atomically(tensors: dict[str, np.ndarray], target: Path, metadata: dict[str, str]) -> tuple[str, int]:
    """safetensors file written to a temp file beside ``target``, fsynced, renamed over it."""
    tmp = _temp_path(target)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        digest, size = _sync_and_hash(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return digest, size


def _write_text_atomically(target: Path, text: str, exclusive: bool = False) -> None:
    """Temp file, fsync, then ``os.replace`` — or, ``exclusive``, ``os.link``, which fails with
    FileExistsError instead of replacing a file another writer put there first."""
    tmp = _temp_path(target)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, target)
            tmp.unlink()
        else:
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _check_network(network: Any) -> list[int]:
    """Validate ``{"inputs": int, "layers": [{"units": int}, ...]}``; return the units per layer."""
    if not isinstance(network, Mapping):
        raise StoreError(f"network must be a mapping with 'inputs' and 'layers', got {type(network).__name__}")
    _check_int(network.get("inputs"), "network.inputs", minimum=1)
    layers = network.get("layers")
    if not isinstance(layers, Sequence) or isinstance(layers, (str, bytes)) or not layers:
        raise StoreError(f"network.layers must be a non-empty list, got {layers!r}")
    units = []
    for k, layer in enumerate(layers):
        if not isinstance(layer, Mapping):
            raise StoreError(f"network.layers[{k}] must be a mapping with 'units', got {layer!r}")
        units.append(_check_int(layer.get("units"), f"network.layers[{k}].units", minimum=1))
    return units


def _layer_inputs(network: Mapping[str, Any], layer: int) -> int:
    return int(network["inputs"]) if layer == 0 else int(network["layers"][layer - 1]["units"])


# ---------------------------------------------------------------------------
# shard descriptions


@dataclass(frozen=True)
class TensorSpec:
    """dtype (numpy name, e.g. ``"float32"``) and full shape of one tensor in a shard."""

    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ShardInfo:
    """What one partition wrote for one step: returned by :meth:`ModelStore.write_shard`.

    Passed to :meth:`ModelStore.commit` by whoever commits the step; travels
    as JSON via :meth:`to_dict` / :meth:`from_dict`.

    Attributes:
        file: shard file name inside the step directory.
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
        """JSON-serializable form (the shard entry of ``manifest.json``)."""
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
        partition = _check_int(obj.get("partition"), f"{where}.partition")
        digest = obj.get("sha256")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise StoreError(f"{where}.sha256 must be 64 lowercase hex digits, got {digest!r}")
        size = _check_int(obj.get("size"), f"{where}.size")
        layers = obj.get("layers")
        if not isinstance(layers, list):
            raise StoreError(f"{where}.layers must be a list, got {layers!r}")
        ranges: dict[int, tuple[tuple[int, int], ...]] = {}
        tensors: dict[int, dict[str, TensorSpec]] = {}
        for i, entry in enumerate(layers):
            f = f"{where}.layers[{i}]"
            if not isinstance(entry, Mapping):
                raise StoreError(f"{f} must be an object, got {entry!r}")
            k = _check_int(entry.get("layer"), f"{f}.layer")
            if k in ranges:
                raise StoreError(f"{f}.layer {k} appears twice")
            ranges[k] = _check_ranges(entry.get("ranges"), f"{f}.ranges")
            specs = entry.get("tensors")
            if not isinstance(specs, Mapping):
                raise StoreError(f"{f}.tensors must be an object, got {specs!r}")
            tensors[k] = {}
            for name, spec in specs.items():
                if not isinstance(spec, Mapping) or not isinstance(spec.get("dtype"), str) \
                        or not isinstance(spec.get("shape"), list):
                    raise StoreError(f"{f}.tensors.{name} must be {{dtype, shape}}, got {spec!r}")
                shape = tuple(_check_int(d, f"{f}.tensors.{name}.shape") for d in spec["shape"])
                tensors[k][str(name)] = TensorSpec(spec["dtype"], shape)
        return cls(file=file, partition=partition, ranges=ranges, tensors=tensors, sha256=digest, size=size)


# ---------------------------------------------------------------------------
# checkpoints


@dataclass(frozen=True)
class _Segment:
    start: int
    end: int
    shard: ShardInfo
    offset: int  # row of ``start`` inside the shard's tensors of this layer


class Checkpoint:
    """One committed checkpoint (a parsed ``manifest.json``). Read-only.

    Attributes:
        step: training step.
        path: the step directory.
        network: the network shape recorded at commit (``inputs``, ``layers``).
        meta: free-form metadata recorded at commit (lookup version, epoch, loss, optimizer, ...).
        shards: the shards, as written.
        created: ISO-8601 UTC time of the commit.
    """

    def __init__(self, path: Path, manifest: Mapping[str, Any]):
        """Build from a parsed manifest; use :meth:`ModelStore.get` / :meth:`ModelStore.latest` instead.

        Raises:
            StoreError: if the manifest is of another schema, malformed, or
                its shards do not cover every neuron exactly once.
        """
        where = str(path / MANIFEST)
        if not isinstance(manifest, Mapping):
            raise StoreError(f"{where}: must hold a JSON object")
        if manifest.get("apiVersion") != CHECKPOINT_SCHEMA:
            raise StoreError(f"{where}: apiVersion must be {CHECKPOINT_SCHEMA}, got {manifest.get('apiVersion')!r}")
        self.path = Path(path)
        self.step = _check_int(manifest.get("step"), f"{where}: step", maximum=MAX_STEP)
        self.network: dict[str, Any] = dict(manifest.get("network") or {})
        self._units = _check_network(manifest.get("network"))
        meta = manifest.get("meta", {})
        if not isinstance(meta, Mapping):
            raise StoreError(f"{where}: meta must be an object")
        self.meta: dict[str, Any] = dict(meta)
        self.created: str = str(manifest.get("created", ""))
        raw_shards = manifest.get("shards")
        if not isinstance(raw_shards, list) or not raw_shards:
            raise StoreError(f"{where}: shards must be a non-empty list")
        self.shards: tuple[ShardInfo, ...] = tuple(
            ShardInfo.from_dict(s, f"{where}: shards[{i}]") for i, s in enumerate(raw_shards)
        )
        self._index = _index_shards(self.shards, self.network, self._units, f"checkpoint step {self.step}")
        self._starts = [[seg.start for seg in segs] for segs in self._index]

    def __repr__(self) -> str:
        return f"Checkpoint(step={self.step}, shards={len(self.shards)}, path={str(self.path)!r})"

    @property
    def num_layers(self) -> int:
        return len(self._units)

    def units(self, layer: int) -> int:
        """Number of neurons of ``layer``."""
        return self._units[self._layer(layer)]

    def inputs(self, layer: int) -> int:
        """Width of ``layer``'s input (``network.inputs`` for layer 0, else the previous layer's units)."""
        return _layer_inputs(self.network, self._layer(layer))

    def tensor_names(self, layer: int) -> list[str]:
        """Sorted names of the tensors stored for ``layer`` (at least ``bias`` and ``weight``)."""
        return sorted(self._index[self._layer(layer)][0].shard.tensors[layer])

    def has(self, layer: int, name: str) -> bool:
        """Whether tensor ``name`` (e.g. ``"weight.momentum"``) is stored for every neuron of ``layer``."""
        return name in self._index[self._layer(layer)][0].shard.tensors[layer]

    def tensor_spec(self, layer: int, name: str) -> TensorSpec:
        """dtype and whole-layer shape ``[units, ...]`` of tensor ``name`` of ``layer``.

        Raises:
            KeyError: if the checkpoint has no such tensor for the layer.
        """
        spec = self._spec(layer, name)
        return TensorSpec(spec.dtype, (self._units[layer],) + spec.shape[1:])

    def read_rows(self, layer: int, name: str, ranges: RowRanges) -> np.ndarray:
        """Assemble rows ``ranges`` of tensor ``name`` of ``layer`` from whichever shards hold them.

        Only the requested rows are read (``safe_open(...).get_slice``).

        Args:
            layer: layer index.
            name: tensor name: ``"weight"`` ``[rows, inputs]``, ``"bias"``
                ``[rows]``, or an optimizer state name.
            ranges: half-open neuron ranges, ascending and disjoint.

        Returns:
            Array ``[sum of range lengths, *trailing]`` in the stored dtype,
            rows in the order of ``ranges``.

        Raises:
            KeyError: if the checkpoint has no tensor ``name`` for the layer
                (e.g. no optimizer state was saved).
            StoreError: if ``layer`` or ``ranges`` is invalid for the network,
                or a shard file is missing or lacks the tensor.
        """
        spec = self._spec(layer, name)
        wanted = _check_ranges(ranges, f"ranges of layer {layer}", units=self._units[layer])
        out = np.empty((_rows(wanted),) + spec.shape[1:], dtype=np.dtype(spec.dtype))
        # (shard, first row in shard, last row + 1, first row in out), grouped per shard.
        plan: dict[str, list[tuple[int, int, int]]] = {}
        shards: dict[str, ShardInfo] = {}
        segments, starts = self._index[layer], self._starts[layer]
        dst = 0
        for start, end in wanted:
            i = bisect.bisect_right(starts, start) - 1
            pos = start
            while pos < end:
                seg = segments[i]
                hi = min(end, seg.end)
                src = seg.offset + (pos - seg.start)
                plan.setdefault(seg.shard.file, []).append((src, src + hi - pos, dst))
                shards[seg.shard.file] = seg.shard
                dst += hi - pos
                pos = hi
                i += 1
        key = f"layers.{layer}.{name}"
        for file, reads in plan.items():
            path = self.path / file
            try:
                with safe_open(str(path), framework="numpy") as f:
                    if key not in f.keys():
                        raise StoreError(f"{path}: tensor {key} is missing although the manifest lists it")
                    tensor = f.get_slice(key)
                    for lo, hi, at in reads:
                        out[at:at + hi - lo] = tensor[lo:hi]
            except (OSError, SafetensorError) as e:
                raise StoreError(f"checkpoint step {self.step}: cannot read shard {path}: {e}") from e
        return out

    def read_layer(self, layer: int, name: str) -> np.ndarray:
        """All rows ``[units, ...]`` of tensor ``name`` of ``layer``; see :meth:`read_rows`."""
        return self.read_rows(layer, name, [(0, self.units(layer))])

    def export_torch(self, path: str | os.PathLike[str]) -> Path:
        """Write the whole model as one safetensors file in PyTorch ``nn.Linear`` layout.

        Keys ``layers.{k}.weight`` ``[units_k, inputs_k]`` float32 and
        ``layers.{k}.bias`` ``[units_k]`` float32; optimizer state is left out.
        Written atomically (temp file in the same directory, fsync, ``os.replace``).
        Loadable with ``safetensors.torch.load_file`` and :func:`read_torch_rows`.

        Returns:
            The written path.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for k in range(self.num_layers):
            tensors[f"layers.{k}.weight"] = np.ascontiguousarray(self.read_layer(k, "weight"), dtype=np.float32)
            tensors[f"layers.{k}.bias"] = np.ascontiguousarray(self.read_layer(k, "bias"), dtype=np.float32)
        _save_atomically(tensors, path, {"format": "pt", "mpnn.step": str(self.step)})
        return path

    def verify(self) -> None:
        """Re-hash every shard file and compare with the manifest.

        Raises:
            StoreError: naming the first shard that is missing or whose size or sha256 differs.
        """
        for shard in self.shards:
            path = self.path / shard.file
            try:
                size = path.stat().st_size
                digest = _hash(path) if size == shard.size else None
            except OSError as e:
                raise StoreError(f"checkpoint step {self.step}: shard {path} unreadable: {e}") from e
            if size != shard.size:
                raise StoreError(f"checkpoint step {self.step}: shard {path} has {size} bytes, manifest says {shard.size}")
            if digest != shard.sha256:
                raise StoreError(f"checkpoint step {self.step}: shard {path} sha256 {digest} != manifest {shard.sha256}")

    def _layer(self, layer: Any) -> int:
        return _check_int(layer, "layer", maximum=len(self._units) - 1)

    def _spec(self, layer: int, name: str) -> TensorSpec:
        layer = self._layer(layer)
        tensors = self._index[layer][0].shard.tensors[layer]
        if name not in tensors:
            raise KeyError(
                f"checkpoint step {self.step} has no tensor {name!r} for layer {layer} "
                f"(stored: {', '.join(sorted(tensors))})"
            )
        return tensors[name]


def _index_shards(shards: Sequence[ShardInfo], network: Mapping[str, Any], units: list[int],
                  what: str) -> list[list[_Segment]]:
    """Check that ``shards`` cover each layer exactly once with consistent tensors; index the rows.

    Every shard holding rows of layer k must store the same tensor names, with
    ``weight`` ``[rows, inputs_k]`` and ``bias`` ``[rows]`` floating point, and
    every other tensor ``[rows, ...]`` with the same dtype and trailing shape.
    """
    partitions = [s.partition for s in shards]
    doubled = sorted({p for p in partitions if partitions.count(p) > 1})
    if doubled:
        raise StoreError(f"{what}: partition(s) {doubled} have more than one shard")
    files = [s.file for s in shards]
    if len(set(files)) != len(files):
        raise StoreError(f"{what}: two shards share a file name")

    owners: list[list[Range]] = [[] for _ in units]
    for shard in shards:
        for k, ranges in shard.ranges.items():
            if k >= len(units):
                raise StoreError(f"{what}: shard {shard.file} holds layer {k}, but the network has {len(units)} layers")
            owners[k].extend(Range(shard.partition, s, e) for s, e in ranges)
    problems = check_coverage(units, owners)
    if problems:
        raise StoreError(f"{what}: shards must cover every neuron exactly once: " + "; ".join(problems))

    index: list[list[_Segment]] = []
    for k in range(len(units)):
        inputs = _layer_inputs(network, k)
        reference: tuple[str, dict[str, TensorSpec]] | None = None
        segments: list[_Segment] = []
        for shard in shards:
            if k not in shard.ranges:
                continue
            rows = _rows(shard.ranges[k])
            specs = shard.tensors.get(k, {})
            for name, want in (("weight", (rows, inputs)), ("bias", (rows,))):
                spec = specs.get(name)
                if spec is None:
                    raise StoreError(f"{what}: shard {shard.file} has no {name} for layer {k}")
                if spec.shape != want:
                    raise StoreError(f"{what}: shard {shard.file} layer {k} {name} has shape {list(spec.shape)}, "
                                     f"expected {list(want)} ([rows, inputs] for weight, [rows] for bias)")
                if not np.issubdtype(np.dtype(spec.dtype), np.floating):
                    raise StoreError(f"{what}: shard {shard.file} layer {k} {name} has dtype {spec.dtype}, "
                                     "expected a floating-point type")
            for name, spec in specs.items():
                if not spec.shape or spec.shape[0] != rows:
                    raise StoreError(f"{what}: shard {shard.file} layer {k} {name} has shape {list(spec.shape)}, "
                                     f"first dimension must be the shard's {rows} rows")
            if reference is None:
                reference = (shard.file, specs)
            else:
                ref_file, ref = reference
                if set(ref) != set(specs):
                    raise StoreError(f"{what}: layer {k} tensors differ between shards: {ref_file} has "
                                     f"{sorted(ref)}, {shard.file} has {sorted(specs)}")
                for name, spec in specs.items():
                    if (spec.dtype, spec.shape[1:]) != (ref[name].dtype, ref[name].shape[1:]):
                        raise StoreError(f"{what}: layer {k} {name} is {spec.dtype} {list(spec.shape)} in "
                                         f"{shard.file} but {ref[name].dtype} {list(ref[name].shape)} in {ref_file}")
            offset = 0
            for s, e in shard.ranges[k]:
                segments.append(_Segment(s, e, shard, offset))
                offset += e - s
        segments.sort(key=lambda seg: seg.start)
        index.append(segments)
    return index


# ---------------------------------------------------------------------------
# the store


class ModelStore:
    """Checkpoints of one network under ``root`` (its directory on the shared volume).

    Many processes may use the same root at once: each partition writes its
    own shard of a step, one of them commits. Committed checkpoints are
    immutable. Nothing is cached, so a new commit by another process is seen
    by the next :meth:`latest`.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS

    def step_dir(self, step: int) -> Path:
        """``<root>/checkpoints/<step:012d>``."""
        return self.checkpoints_dir / f"{_check_int(step, 'step', maximum=MAX_STEP):012d}"

    def write_shard(self, step: int, partition: int, layers: Mapping[int, Mapping[str, np.ndarray]],
                    ranges: Mapping[int, RowRanges]) -> ShardInfo:
        """Write partition ``partition``'s rows for ``step`` as one safetensors shard.

        Args:
            step: training step, 0 .. 10**12-1.
            partition: writing partition's index.
            layers: layer -> tensor name -> array whose first dimension is
                the rows of ``ranges[layer]`` concatenated in order;
                ``weight`` ``[rows, inputs]`` and ``bias`` ``[rows]`` are
                required, anything else (``weight.momentum``, ``bias.adam_v``
                ...) is optional state kept with the rows. Any numeric dtype
                safetensors supports; stored as given.
            ranges: layer -> half-open row ranges owned by this partition.
                A layer with an empty range list is skipped (its tensors
                must have 0 rows).

        Returns:
            The :class:`ShardInfo` to pass to :meth:`commit`.

        Raises:
            StoreError: naming layer, tensor and shapes, if ``layers`` and
                ``ranges`` disagree on layers, a tensor's first dimension is
                not the total row count, ``weight``/``bias`` is missing or has
                the wrong rank, ranges are malformed, or ``step`` is already
                committed (committed checkpoints are immutable).
        """
        partition = _check_int(partition, "partition")
        directory = self.step_dir(step)
        if (directory / MANIFEST).exists():
            raise StoreError(f"step {step} is already committed at {directory}; checkpoints are immutable")
        if not isinstance(layers, Mapping) or not isinstance(ranges, Mapping):
            raise StoreError("layers and ranges must be mappings keyed by layer index")
        if set(layers) != set(ranges):
            raise StoreError(f"layers has layer keys {sorted(layers)} but ranges has {sorted(ranges)}")

        tensors: dict[str, np.ndarray] = {}
        info_ranges: dict[int, tuple[tuple[int, int], ...]] = {}
        info_tensors: dict[int, dict[str, TensorSpec]] = {}
        for k in ranges:
            _check_int(k, "layer")
        for k in sorted(ranges):
            rr = _check_ranges(ranges[k], f"ranges[{k}]")
            rows = _rows(rr)
            named = layers[k]
            if not isinstance(named, Mapping):
                raise StoreError(f"layers[{k}] must map tensor names to arrays, got {type(named).__name__}")
            for required, ndim in (("weight", 2), ("bias", 1)):
                if required not in named:
                    raise StoreError(f"layers[{k}] has no {required!r} tensor (has: {sorted(named)})")
                a = named[required]
                if not isinstance(a, np.ndarray) or a.ndim != ndim:
                    raise StoreError(f"layers[{k}][{required!r}] must be a {ndim}-D array, got "
                                     f"{getattr(a, 'shape', type(a).__name__)}")
            specs: dict[str, TensorSpec] = {}
            for name, a in named.items():
                if not isinstance(name, str) or not name:
                    raise StoreError(f"layers[{k}] has a tensor name {name!r}; names must be non-empty strings")
                if not isinstance(a, np.ndarray) or a.ndim < 1:
                    raise StoreError(f"layers[{k}][{name!r}] must be an array with a row dimension, got "
                                     f"{getattr(a, 'shape', type(a).__name__)}")
                if a.shape[0] != rows:
                    raise StoreError(f"layers[{k}][{name!r}] has shape {list(a.shape)}: first dimension must be "
                                     f"{rows}, the rows of ranges[{k}] = {list(rr)}")
                specs[name] = TensorSpec(a.dtype.name, tuple(int(d) for d in a.shape))
                tensors[f"layers.{k}.{name}"] = np.ascontiguousarray(a)
            if rr:
                info_ranges[k] = rr
                info_tensors[k] = specs
            else:
                for name in named:
                    del tensors[f"layers.{k}.{name}"]

        directory.mkdir(parents=True, exist_ok=True)
        file = f"shard-{partition:05d}.safetensors"
        metadata = {
            "apiVersion": CHECKPOINT_SCHEMA,
            "step": str(step),
            "partition": str(partition),
            "ranges": json.dumps({str(k): [list(r) for r in v] for k, v in info_ranges.items()}),
        }
        digest, size = _save_atomically(tensors, directory / file, metadata)
        return ShardInfo(file=file, partition=partition, ranges=info_ranges, tensors=info_tensors,
                         sha256=digest, size=size)

    def commit(self, step: int, shards: Sequence[ShardInfo | Mapping[str, Any]], network: Mapping[str, Any],
               meta: Mapping[str, Any] | None = None, verify: bool = False) -> Checkpoint:
        """Make ``step`` a checkpoint by writing its ``manifest.json``, last and atomically.

        Args:
            step: the step whose shards were written.
            shards: every partition's :class:`ShardInfo` (or its ``to_dict()``).
            network: ``{"inputs": int, "layers": [{"units": int, ...}, ...]}``;
                extra keys (activation, name) are recorded as given.
            meta: JSON-serializable extras: lookup version, epoch, loss, optimizer, ...
            verify: re-hash every shard file against its sha256 (reads all
                shards); by default only existence and size are checked.

        Returns:
            The committed :class:`Checkpoint`.

        Raises:
            StoreError: if the shards miss or double a neuron (the message
                lists them as ``L:A-B``), a shard file is missing or differs
                from its ShardInfo, tensors are inconsistent with the network
                or each other, ``network``/``meta`` is malformed, or the step
                is already committed. Nothing is written then, so the
                previous latest checkpoint stays in force.
        """
        directory = self.step_dir(step)
        _check_network(network)
        infos = [s if isinstance(s, ShardInfo) else ShardInfo.from_dict(s, f"shards[{i}]")
                 for i, s in enumerate(shards)]
        if not infos:
            raise StoreError(f"commit of step {step}: no shards given")
        manifest = {
            "apiVersion": CHECKPOINT_SCHEMA,
            "step": int(step),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "network": dict(network),
            "meta": dict(meta or {}),
            "shards": [s.to_dict() for s in sorted(infos, key=lambda s: s.partition)],
        }
        try:
            text = json.dumps(manifest, indent=2, allow_nan=False) + "\n"
        except (TypeError, ValueError) as e:
            raise StoreError(f"commit of step {step}: network and meta must be JSON-serializable: {e}") from e
        checkpoint = Checkpoint(directory, json.loads(text))  # validates coverage and tensors

        if (directory / MANIFEST).exists():
            raise StoreError(f"step {step} is already committed at {directory}")
        for shard in infos:
            path = directory / shard.file
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise StoreError(f"commit of step {step}: shard file {path} of partition {shard.partition} "
                                 "does not exist") from None
            if size != shard.size:
                raise StoreError(f"commit of step {step}: shard {path} has {size} bytes, its ShardInfo says "
                                 f"{shard.size} (rewritten since?)")
            if verify and _hash(path) != shard.sha256:
                raise StoreError(f"commit of step {step}: shard {path} sha256 differs from its ShardInfo")

        # Shards were renamed into place by other processes; make those entries
        # durable before the manifest that points at them.
        _fsync_dir(directory)
        try:
            _write_text_atomically(directory / MANIFEST, text, exclusive=True)
        except FileExistsError:
            raise StoreError(f"step {step} was committed by another writer at {directory}") from None
        _fsync_dir(self.checkpoints_dir)
        log.info("committed checkpoint step %d (%d shards) at %s", step, len(infos), directory)
        return checkpoint

    def next_step(self) -> int:
        """One past the highest step directory, committed or not: a step whose manifest is torn
        is never reused (it counts as committed for :meth:`write_shard`), nor is a dead writer's."""
        try:
            names = os.listdir(self.checkpoints_dir)
        except FileNotFoundError:
            return 1
        return max((int(n) for n in names if _STEP_DIR.match(n)), default=0) + 1

    def steps(self) -> list[int]:
        """Ascending steps that have a ``manifest.json`` (not parsed; see :meth:`latest`)."""
        try:
            names = os.listdir(self.checkpoints_dir)
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names
                      if _STEP_DIR.match(n) and (self.checkpoints_dir / n / MANIFEST).is_file())

    def get(self, step: int) -> Checkpoint:
        """The committed checkpoint of ``step``.

        Raises:
            CheckpointNotFoundError: if the step has no manifest (never committed, or the writer died).
            StoreError: if the manifest is unreadable, not JSON, or inconsistent, or a shard file is missing.
        """
        directory = self.step_dir(step)
        path = directory / MANIFEST
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"no committed checkpoint for step {step} under {self.root} "
                                          f"({path} does not exist)") from None
        except OSError as e:
            raise StoreError(f"{path}: unreadable: {e}") from e
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as e:
            raise StoreError(f"{path}: not valid JSON: {e}") from e
        checkpoint = Checkpoint(directory, manifest)
        if checkpoint.step != step:
            raise StoreError(f"{path}: records step {checkpoint.step} but lives in the directory of step {step}")
        for shard in checkpoint.shards:
            try:
                size = (directory / shard.file).stat().st_size
            except FileNotFoundError:
                raise StoreError(f"{path}: shard file {shard.file} does not exist") from None
            if size != shard.size:
                raise StoreError(f"{path}: shard file {shard.file} has {size} bytes, the manifest says {shard.size}")
        return checkpoint

    def latest(self) -> Checkpoint | None:
        """The committed checkpoint with the highest step, or None if there is none.

        Step directories without a manifest (a writer died before commit) or
        with one that does not parse are skipped, with a warning for the latter.
        """
        for step in reversed(self.steps()):
            try:
                return self.get(step)
            except CheckpointNotFoundError:
                continue  # pruned or removed since steps() listed it
            except StoreError as e:
                log.warning("skipping checkpoint step %d: %s", step, e)
        return None

    def prune(self, keep: int) -> list[int]:
        """Delete all but the ``keep`` newest committed checkpoints; never the latest loadable one.

        Each manifest is removed first, so a checkpoint disappears atomically
        before its shards do. Uncommitted step directories are left alone.

        Returns:
            The deleted steps, ascending.

        Raises:
            StoreError: if ``keep`` is not a positive int.
        """
        keep = _check_int(keep, "keep", minimum=1)
        latest = self.latest()
        removed = []
        for step in self.steps()[:-keep]:
            if latest is not None and step == latest.step:
                continue
            directory = self.step_dir(step)
            (directory / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(step)
        return removed


# ---------------------------------------------------------------------------
# PyTorch-layout import


def read_torch_rows(path: str | os.PathLike[str], layer: int, ranges: RowRanges, expect_inputs: int,
                    expect_units: int) -> tuple[np.ndarray, np.ndarray]:
    """Read rows of layer ``layer`` from a safetensors file in PyTorch ``nn.Linear`` layout.

    The file (``spec.model.weights``) holds ``layers.{k}.weight``
    ``[units, inputs]`` and ``layers.{k}.bias`` ``[units]``, e.g. from
    ``safetensors.torch.save_file({f"layers.{k}.weight": lin.weight, ...})``
    or :meth:`Checkpoint.export_torch`. Only the requested rows are read.

    Args:
        path: the safetensors file.
        layer: layer index ``k``.
        ranges: half-open rows to read, ascending and disjoint.
        expect_inputs: the layer's input width in the network.
        expect_units: the layer's neuron count in the network.

    Returns:
        ``(weight_rows [rows, expect_inputs], bias_rows [rows])``, float32
        (float16/float64 files are converted).

    Raises:
        StoreError: naming the file and key, if the file cannot be opened, a
            key is missing, a shape differs from the expected one (expected
            and actual are given), the dtype is not float16/32/64 (e.g. bf16),
            or ``ranges`` exceed ``expect_units``.
    """
    path = Path(path)
    layer = _check_int(layer, "layer")
    expect_inputs = _check_int(expect_inputs, "expect_inputs", minimum=1)
    expect_units = _check_int(expect_units, "expect_units", minimum=1)
    wanted = _check_ranges(ranges, f"ranges of layer {layer}", units=expect_units)
    try:
        f = safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises its own SafetensorError besides OSError
        raise StoreError(f"{path}: cannot open as safetensors: {e}") from e
    out = []
    with f:
        keys = set(f.keys())
        for name, shape in (("weight", [expect_units, expect_inputs]), ("bias", [expect_units])):
            key = f"layers.{layer}.{name}"
            if key not in keys:
                raise StoreError(f"{path}: key {key} is missing (PyTorch nn.Linear layout expected: "
                                 f"layers.{{k}}.weight, layers.{{k}}.bias)")
            tensor = f.get_slice(key)
            actual = list(tensor.get_shape())
            if actual != shape:
                raise StoreError(f"{path}: {key} has shape {actual}, the network needs {shape}")
            dtype = tensor.get_dtype()
            if dtype not in ("F16", "F32", "F64"):
                raise StoreError(f"{path}: {key} has dtype {dtype}; only F16, F32 and F64 can be imported")
            parts = [tensor[s:e] for s, e in wanted]
            trailing = shape[1:]
            rows = np.concatenate(parts) if parts else np.empty([0] + trailing)
            out.append(np.ascontiguousarray(rows, dtype=np.float32))
    return out[0], out[1]
