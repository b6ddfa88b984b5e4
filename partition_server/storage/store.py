"""The model store: checkpoints of one network on the shared volume.

``DESIGN.md``, "Shared model on NFS": every neuron has exactly one owner, so
each partition writes only the rows of its own neurons (weight rows, biases,
optimizer state rows) into its own shard file, and writers never share bytes.
A checkpoint is those shard files plus a commit record (``commit.json``)
written last; a checkpoint without its commit record does not exist. Any
server can later read the rows it owns *now* from whichever shards hold them,
whatever the assignment was when the checkpoint was written.

Checkpoints are numbered by their **sequence** (0 .. 10**12-1), which is not
an optimizer step: the optimizer step a checkpoint holds is recorded in its
``meta``. Layout under the store root (see :mod:`.schema`)::

    <root>/checkpoints/<sequence:012d>/shard-<partition:05d>.safetensors
    <root>/checkpoints/<sequence:012d>/commit.json

Checkpoints written before ``commit.json`` existed (their record is
``manifest.json``, schema ``mpnn.dev/checkpoint/v1``) load and count as
before. Every file is written through :mod:`.atomic`, so a reader sees either
the old file or the complete new one.

This module is the store's public face; the parts live in :mod:`.validation`,
:mod:`.schema`, :mod:`.checkpoint` (reader), :mod:`.writer` and :mod:`.pytorch`.

Typical use::

    store = ModelStore("/mnt/model/digits")
    sequence = store.next_sequence()
    info = store.write_shard(sequence, partition=p, layers={0: {"weight": w, "bias": b}}, ranges={0: [(0, 32)]})
    # ... one process (the driver) collects every ShardInfo, then:
    store.commit(sequence, infos, network={"inputs": 64, "layers": [{"units": 128}, ...]})
    ckpt = store.latest()
    w_rows = ckpt.read_rows(0, "weight", [(32, 64)])
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from partition_server.storage.checkpoint import Checkpoint
from partition_server.storage.pytorch import export_torch, read_torch_rows
from partition_server.storage.schema import (
    CHECKPOINT_SCHEMA,
    CHECKPOINTS,
    COMMIT_RECORD,
    LEGACY_CHECKPOINT_SCHEMA,
    LEGACY_COMMIT_RECORD,
    MAX_SEQUENCE,
    RECORD_NAMES,
    SEQUENCE_DIR,
    CommitRecord,
    ShardInfo,
    TensorSpec,
)
from partition_server.storage.validation import CheckpointNotFoundError, RowRanges, StoreError, check_int
from partition_server.storage.writer import commit_checkpoint, write_shard

__all__ = [
    "CHECKPOINT_SCHEMA",
    "COMMIT_RECORD",
    "Checkpoint",
    "CheckpointNotFoundError",
    "LEGACY_CHECKPOINT_SCHEMA",
    "LEGACY_COMMIT_RECORD",
    "ModelStore",
    "RowRanges",
    "ShardInfo",
    "StoreError",
    "TensorSpec",
    "export_torch",
    "read_torch_rows",
]

log = logging.getLogger(__name__)


class ModelStore:
    """Checkpoints of one network under ``root`` (its directory on the shared volume).

    Many processes may use the same root at once: each partition writes its
    own shard of a checkpoint, one process commits it. Committed checkpoints
    are immutable. Nothing is cached, so a new commit by another process is
    seen by the next :meth:`latest`.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    @property
    def checkpoints_dir(self) -> Path:
        """``<root>/checkpoints``: one directory per checkpoint sequence."""
        return self.root / CHECKPOINTS

    def sequence_dir(self, sequence: int) -> Path:
        """``<root>/checkpoints/<sequence:012d>``, committed or not.

        Raises:
            StoreError: if ``sequence`` is not an int in 0 .. 10**12-1.
        """
        return self.checkpoints_dir / f"{check_int(sequence, 'sequence', maximum=MAX_SEQUENCE):012d}"

    def write_shard(self, sequence: int, *, partition: int, layers: Mapping[int, Mapping[str, np.ndarray]],
                    ranges: Mapping[int, RowRanges]) -> ShardInfo:
        """Write partition ``partition``'s rows for checkpoint ``sequence`` as one safetensors shard.

        The shard's keys are ``layers.{k}.{name}``; the first dimension of
        each is the concatenation, in order, of the partition's row ranges of
        layer ``k``. Written atomically: a reader never sees a partial shard.

        Args:
            sequence: checkpoint number, 0 .. 10**12-1 (see :meth:`next_sequence`).
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
                the wrong rank, ranges are malformed, ``sequence`` is out of
                range, or ``sequence`` is already committed (committed
                checkpoints are immutable).
            OSError: if the file cannot be written.
        """
        return write_shard(self.sequence_dir(sequence), sequence, partition=partition, layers=layers,
                           ranges=ranges)

    def commit(self, sequence: int, shards: Sequence[ShardInfo | Mapping[str, Any]], *,
               network: Mapping[str, Any], meta: Mapping[str, Any] | None = None,
               verify: bool = False) -> Checkpoint:
        """Make ``sequence`` a checkpoint by writing its ``commit.json``, last and atomically.

        Args:
            sequence: the checkpoint whose shards were written.
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
                or each other, ``network``/``meta`` is malformed, or the
                sequence is already committed (also by a concurrent writer).
                Nothing is written then, so the previous latest checkpoint
                stays in force.
            OSError: if the record cannot be written.
        """
        return commit_checkpoint(self.sequence_dir(sequence), sequence, shards, network=network, meta=meta,
                                 verify=verify)

    def next_sequence(self) -> int:
        """One past the highest checkpoint directory, committed or not (legacy ones included).

        A sequence whose commit record is torn is never reused (it counts as
        committed for :meth:`write_shard`), nor is a dead writer's.
        """
        try:
            names = os.listdir(self.checkpoints_dir)
        except FileNotFoundError:
            return 1
        return max((int(n) for n in names if SEQUENCE_DIR.match(n)), default=0) + 1

    def sequences(self) -> list[int]:
        """Ascending sequences that have a commit record, ``commit.json`` or legacy
        ``manifest.json`` (not parsed; see :meth:`latest`)."""
        try:
            names = os.listdir(self.checkpoints_dir)
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names if SEQUENCE_DIR.match(n)
                      and any((self.checkpoints_dir / n / r).is_file() for r in RECORD_NAMES))

    def get(self, sequence: int) -> Checkpoint:
        """The committed checkpoint ``sequence``.

        Reads ``commit.json``, or, for a checkpoint written before the rename, ``manifest.json``.

        Raises:
            CheckpointNotFoundError: if it has no commit record (never committed, or the writer died).
            StoreError: if the record is unreadable, not JSON, or inconsistent, or a shard file is
                missing or has another size than the record says.
        """
        directory = self.sequence_dir(sequence)
        for name in RECORD_NAMES:
            path = directory / name
            try:
                text = path.read_text(encoding="utf-8")
                break
            except FileNotFoundError:
                continue
            except OSError as e:
                raise StoreError(f"{path}: unreadable: {e}") from e
        else:
            raise CheckpointNotFoundError(f"no committed checkpoint {sequence} under {self.root} "
                                          f"({directory / COMMIT_RECORD} does not exist)")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise StoreError(f"{path}: not valid JSON: {e}") from e
        checkpoint = Checkpoint(directory, CommitRecord.from_dict(obj, str(path)), record_name=name)
        if checkpoint.sequence != sequence:
            raise StoreError(f"{path}: records sequence {checkpoint.sequence} but lives in the directory "
                             f"of sequence {sequence}")
        for shard in checkpoint.shards:
            try:
                size = (directory / shard.file).stat().st_size
            except FileNotFoundError:
                raise StoreError(f"{path}: shard file {shard.file} does not exist") from None
            if size != shard.size:
                raise StoreError(f"{path}: shard file {shard.file} has {size} bytes, "
                                 f"the commit record says {shard.size}")
        return checkpoint

    def latest(self) -> Checkpoint | None:
        """The committed checkpoint with the highest sequence, or None if there is none.

        Directories without a commit record (a writer died before commit) or
        with one that does not parse are skipped, with a warning for the latter.
        """
        for sequence in reversed(self.sequences()):
            try:
                return self.get(sequence)
            except CheckpointNotFoundError:
                continue  # pruned or removed since sequences() listed it
            except StoreError as e:
                log.warning("skipping checkpoint %d: %s", sequence, e)
        return None

    def prune(self, *, keep: int) -> list[int]:
        """Delete all but the ``keep`` newest committed checkpoints; never the latest loadable one.

        Each commit record is removed first, so a checkpoint disappears
        atomically before its shards do. Uncommitted directories are left alone.

        Returns:
            The deleted sequences, ascending.

        Raises:
            StoreError: if ``keep`` is not a positive int.
        """
        keep = check_int(keep, "keep", minimum=1)
        latest = self.latest()
        removed = []
        for sequence in self.sequences()[:-keep]:
            if latest is not None and sequence == latest.sequence:
                continue
            directory = self.sequence_dir(sequence)
            for name in RECORD_NAMES:
                (directory / name).unlink(missing_ok=True)
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(sequence)
        return removed
