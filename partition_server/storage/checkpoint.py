"""Reading a committed checkpoint: the coverage index of its shards and row reads across them.

A :class:`Checkpoint` is a parsed commit record whose shards were checked to
cover every neuron of every layer exactly once, with consistent tensors. It
answers "rows ``ranges`` of tensor ``name`` of layer ``k``" by reading only
those rows, from whichever shards hold them, whatever the assignment was when
the checkpoint was written (``DESIGN.md``, "Shared model on NFS").
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from safetensors import SafetensorError, safe_open

from partition_server.api.coverage import check_coverage
from partition_server.api.distributor import Range
from partition_server.storage.schema import COMMIT_RECORD, CommitRecord, ShardInfo, TensorSpec
from partition_server.storage.files import sha256_file
from partition_server.storage.validation import (
    RowRanges,
    StoreError,
    check_int,
    check_ranges,
    count_rows,
    layer_inputs,
)

_READ_CHUNK_BYTES = 8 << 20  # rows copied per slice of a shard in read_rows

__all__ = ["Checkpoint"]


@dataclass(frozen=True)
class _Segment:
    start: int
    end: int
    shard: ShardInfo
    offset: int  # row of ``start`` inside the shard's tensors of this layer


class Checkpoint:
    """One committed checkpoint (a parsed commit record). Read-only.

    Attributes:
        sequence: the checkpoint's number (not an optimizer step; see ``meta["optimizer_step"]``).
        path: the checkpoint directory.
        record_path: the commit record it was read from (``commit.json``, or a
            legacy ``manifest.json``).
        schema: the record's ``apiVersion``.
        network: the network shape recorded at commit (``inputs``, ``layers``).
        meta: free-form metadata recorded at commit (lookup version, epoch, loss, optimizer, ...).
        shards: the shards, as written.
        created: ISO-8601 UTC time of the commit.
    """

    def __init__(self, path: str | os.PathLike[str], record: CommitRecord | Mapping[str, Any], *,
                 record_name: str = COMMIT_RECORD):
        """Build from a commit record; use :meth:`ModelStore.get` / :meth:`ModelStore.latest` instead.

        Args:
            path: the checkpoint directory.
            record: the parsed record, or its JSON object.
            record_name: the record's file name in ``path`` (for messages and :attr:`record_path`).

        Raises:
            StoreError: if the record is of another schema, malformed, or its
                shards do not cover every neuron exactly once.
        """
        self.path = Path(path)
        self.record_path = self.path / record_name
        if not isinstance(record, CommitRecord):
            record = CommitRecord.from_dict(record, str(self.record_path))
        self.schema = record.schema
        self.sequence = record.sequence
        self.network: dict[str, Any] = dict(record.network)
        self.meta: dict[str, Any] = dict(record.meta)
        self.created: str = record.created
        self.shards: tuple[ShardInfo, ...] = record.shards
        self._units = list(record.units)
        self._index = _index_shards(self.shards, self.network, self._units, f"checkpoint {self.sequence}")
        self._starts = [[seg.start for seg in segs] for segs in self._index]

    def __repr__(self) -> str:
        return f"Checkpoint(sequence={self.sequence}, shards={len(self.shards)}, path={str(self.path)!r})"

    @property
    def num_layers(self) -> int:
        """Number of layers of the network."""
        return len(self._units)

    def units(self, layer: int) -> int:
        """Number of neurons of ``layer``."""
        return self._units[self._layer(layer)]

    def inputs(self, layer: int) -> int:
        """Width of ``layer``'s input (``network.inputs`` for layer 0, else the previous layer's units)."""
        return layer_inputs(self.network, self._layer(layer))

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
        wanted = check_ranges(ranges, f"ranges of layer {layer}", units=self._units[layer])
        out = np.empty((count_rows(wanted),) + spec.shape[1:], dtype=np.dtype(spec.dtype))
        # (first row in shard, last row + 1, first row in out), grouped per shard file.
        plan: dict[str, list[tuple[int, int, int]]] = {}
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
                dst += hi - pos
                pos = hi
                i += 1
        key = f"layers.{layer}.{name}"
        row_bytes = max(1, out.dtype.itemsize * int(np.prod(out.shape[1:], dtype=np.int64)))
        step = max(1, _READ_CHUNK_BYTES // row_bytes)
        for file, reads in plan.items():
            path = self.path / file
            try:
                with safe_open(str(path), framework="numpy") as f:
                    if key not in f.keys():
                        raise StoreError(f"{path}: tensor {key} is missing although the commit record lists it")
                    tensor = f.get_slice(key)
                    for lo, hi, at in reads:
                        # In chunks, so the slice safetensors materialises stays small (the rows
                        # are held once, in ``out``, not twice).
                        for c in range(lo, hi, step):
                            e = min(hi, c + step)
                            out[at + c - lo:at + e - lo] = tensor[c:e]
            except (OSError, SafetensorError) as e:
                raise StoreError(f"checkpoint {self.sequence}: cannot read shard {path}: {e}") from e
        return out

    def read_layer(self, layer: int, name: str) -> np.ndarray:
        """All rows ``[units, ...]`` of tensor ``name`` of ``layer``; see :meth:`read_rows`."""
        return self.read_rows(layer, name, [(0, self.units(layer))])

    def export_torch(self, path: str | os.PathLike[str]) -> Path:
        """Write the whole model as one safetensors file in PyTorch ``nn.Linear`` layout.

        See :func:`partition_server.storage.pytorch.export_torch`.

        Returns:
            The written path.
        """
        from partition_server.storage.pytorch import export_torch

        return export_torch(self, path)

    def verify(self) -> None:
        """Re-hash every shard file and compare with the commit record.

        Raises:
            StoreError: naming the first shard that is missing or whose size or sha256 differs.
        """
        for shard in self.shards:
            path = self.path / shard.file
            try:
                size = path.stat().st_size
                digest = sha256_file(path)[0] if size == shard.size else None
            except OSError as e:
                raise StoreError(f"checkpoint {self.sequence}: shard {path} unreadable: {e}") from e
            if size != shard.size:
                raise StoreError(f"checkpoint {self.sequence}: shard {path} has {size} bytes, "
                                 f"the commit record says {shard.size}")
            if digest != shard.sha256:
                raise StoreError(f"checkpoint {self.sequence}: shard {path} sha256 {digest} "
                                 f"!= commit record {shard.sha256}")

    def _layer(self, layer: Any) -> int:
        return check_int(layer, "layer", maximum=len(self._units) - 1)

    def _spec(self, layer: int, name: str) -> TensorSpec:
        layer = self._layer(layer)
        tensors = self._index[layer][0].shard.tensors[layer]
        if name not in tensors:
            raise KeyError(
                f"checkpoint {self.sequence} has no tensor {name!r} for layer {layer} "
                f"(stored: {', '.join(sorted(tensors))})"
            )
        return tensors[name]


def _index_shards(shards: Sequence[ShardInfo], network: Mapping[str, Any], units: list[int],
                  what: str) -> list[list[_Segment]]:
    """Check that ``shards`` cover each layer exactly once with consistent tensors; index the rows.

    Every shard holding rows of layer k must store the same tensor names, with
    ``weight`` ``[rows, inputs_k]`` and ``bias`` ``[rows]`` floating point, and
    every other tensor ``[rows, ...]`` with the same dtype and trailing shape.

    Returns:
        Per layer, the shards' row segments sorted by first row.

    Raises:
        StoreError: prefixed with ``what``, naming the shard, layer and tensor at fault.
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
        inputs = layer_inputs(network, k)
        reference: tuple[str, dict[str, TensorSpec]] | None = None
        segments: list[_Segment] = []
        for shard in shards:
            if k not in shard.ranges:
                continue
            rows = count_rows(shard.ranges[k])
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
