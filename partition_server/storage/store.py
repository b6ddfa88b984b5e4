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

    <root>/checkpoints/<sequence:012d>/reservation.json                 # first, by the driver
    <root>/checkpoints/<sequence:012d>/shard-<partition:05d>.safetensors
    <root>/checkpoints/<sequence:012d>/commit.json                      # last, by the driver

A sequence is reserved (:meth:`ModelStore.reserve`: exclusive ``mkdir``, then
``reservation.json`` naming the run and a random token) before any shard is
written; shards are written, and the commit made, only with that reservation
(:mod:`.reservation`). Commit and load re-hash every shard against the commit
record: a checkpoint with a mismatching shard is never loaded, and
:meth:`ModelStore.latest` falls back to the previous good one.

Checkpoints written before ``commit.json`` existed (their record is
``manifest.json``, schema ``mpnn.dev/checkpoint/v1``) load and count as
before. Every file is written through :mod:`.atomic`, so a reader sees either
the old file or the complete new one.

This module is the store's public face; the parts live in :mod:`.validation`,
:mod:`.schema`, :mod:`.checkpoint` (reader), :mod:`.writer` and :mod:`.pytorch`.

Typical use::

    store = ModelStore("/mnt/model/digits")
    reservation = store.reserve(run_id="run-1")          # the driver; servers get sequence, run and token
    info = store.write_shard(reservation, partition=p, layers={0: {"weight": w, "bias": b}}, ranges={0: [(0, 32)]})
    # ... one process (the driver) collects every ShardInfo, then:
    store.commit(reservation, infos, network={"inputs": 64, "layers": [{"units": 128}, ...]})
    ckpt = store.latest()
    w_rows = ckpt.read_rows(0, "weight", [(32, 64)])
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
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
from partition_server.storage.files import sha256_file
from partition_server.storage.reservation import (
    Reservation,
    check_reservation,
    create_reservation,
    has_reservation,
    newest_activity,
)
from partition_server.storage.validation import (
    CheckpointNotFoundError,
    ForeignReservationError,
    ReservationError,
    RowRanges,
    StoreError,
    check_int,
)
from partition_server.storage.writer import commit_checkpoint, write_shard

__all__ = [
    "CHECKPOINT_SCHEMA",
    "COMMIT_RECORD",
    "Checkpoint",
    "CheckpointNotFoundError",
    "ForeignReservationError",
    "LEGACY_CHECKPOINT_SCHEMA",
    "LEGACY_COMMIT_RECORD",
    "ModelStore",
    "Reservation",
    "ReservationError",
    "RowRanges",
    "STALE_AFTER_S",
    "ShardInfo",
    "StoreError",
    "TensorSpec",
    "export_torch",
    "read_torch_rows",
]

log = logging.getLogger(__name__)

STALE_AFTER_S = 3600.0
"""Seconds an uncommitted checkpoint directory must be untouched before :meth:`ModelStore.prune_stale` removes it."""


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

    def reserve(self, *, run_id: str) -> Reservation:
        """Reserve the next checkpoint sequence for run ``run_id``, before any shard is written.

        The sequence's directory is created with an exclusive ``mkdir`` (of
        several racing drivers exactly one gets each sequence; an existing
        directory is stepped over, never adopted), then ``reservation.json``
        naming the run and a fresh random token, exclusively.

        Returns:
            The :class:`Reservation`; its ``sequence``, ``run_id`` and ``token``
            go to every partition's Checkpoint request and to :meth:`commit`.

        Raises:
            StoreError: ``run_id`` is empty, longer than 253 characters or not
                printable; the next sequence would exceed 10**12-1; or 1,000
                directories in a row already exist.
            OSError: the volume is not writable.
        """
        return create_reservation(self.checkpoints_dir, self.next_sequence(), run_id=run_id)

    def check_reservation(self, reservation: Reservation) -> None:
        """Check, without writing anything, that :meth:`write_shard` may write for ``reservation``.

        Raises:
            ReservationError: the sequence is not reserved, already committed, or
                superseded by a newer reservation or commit.
            ForeignReservationError: it is reserved by another run or with another token.
        """
        check_reservation(self.checkpoints_dir, reservation, newest=True)

    def write_shard(self, reservation: Reservation, *, partition: int,
                    layers: Mapping[int, Mapping[str, np.ndarray]], ranges: Mapping[int, RowRanges]) -> ShardInfo:
        """Write partition ``partition``'s rows for the reserved checkpoint as one safetensors shard.

        The reservation is checked first (see :meth:`check_reservation`);
        nothing is created when it fails. The shard's keys are
        ``layers.{k}.{name}``; the first dimension of each is the
        concatenation, in order, of the partition's row ranges of layer ``k``.
        Written atomically and exclusively: a reader never sees a partial
        shard, and a shard already written is never replaced.

        Args:
            reservation: from :meth:`reserve` (or :meth:`Reservation.of` the request's fields).
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
            ForeignReservationError: the sequence is reserved by another run or token.
            ReservationError: the sequence is not reserved, already committed
                (committed checkpoints are immutable), superseded by a newer
                one, or this partition's shard is already written.
            StoreError: naming layer, tensor and shapes, if ``layers`` and
                ``ranges`` disagree on layers, a tensor's first dimension is
                not the total row count, ``weight``/``bias`` is missing or has
                the wrong rank, or ranges are malformed.
            OSError: if the file cannot be written.
        """
        return write_shard(self.checkpoints_dir, reservation, partition=partition, layers=layers, ranges=ranges)

    def commit(self, reservation: Reservation, shards: Sequence[ShardInfo | Mapping[str, Any]], *,
               network: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> Checkpoint:
        """Make the reserved sequence a checkpoint by writing its ``commit.json``, last and atomically.

        Every shard file is re-hashed and must match its :class:`ShardInfo`
        (size and sha256), so only the shards the committer was told about are
        ever committed.

        Args:
            reservation: the sequence's reservation, from :meth:`reserve`.
            shards: every partition's :class:`ShardInfo` (or its ``to_dict()``).
            network: ``{"inputs": int, "layers": [{"units": int, ...}, ...]}``;
                extra keys (activation, name) are recorded as given.
            meta: JSON-serializable extras: lookup version, epoch, loss, optimizer, ...

        Returns:
            The committed :class:`Checkpoint`.

        Raises:
            ForeignReservationError: the sequence is reserved by another run or token.
            ReservationError: the sequence is not reserved.
            StoreError: if the shards miss or double a neuron (the message
                lists them as ``L:A-B``), a shard file is missing or differs
                from its ShardInfo, tensors are inconsistent with the network
                or each other, ``network``/``meta`` is malformed, or the
                sequence is already committed (also by a concurrent writer).
                Nothing is written then, so the previous latest checkpoint
                stays in force.
            OSError: if the record cannot be written.
        """
        return commit_checkpoint(self.checkpoints_dir, reservation, shards, network=network, meta=meta)

    def next_sequence(self) -> int:
        """One past the highest sequence that is reserved or has a commit record (legacy ones included).

        Directories with neither (an abandoned ``mkdir``, a stray or dead
        writer's leftovers, an out-of-range number) do not count, so they can
        never push the sequence to its limit; :meth:`reserve` steps over any
        that is in its way and never reuses it. A sequence whose commit record
        is torn is never reused either.
        """
        try:
            names = os.listdir(self.checkpoints_dir)
        except FileNotFoundError:
            return 1
        used = [int(n) for n in names if SEQUENCE_DIR.match(n)
                and (has_reservation(self.checkpoints_dir / n)
                     or any((self.checkpoints_dir / n / r).exists() for r in RECORD_NAMES))]
        return max(used, default=0) + 1

    def sequences(self) -> list[int]:
        """Ascending sequences that have a commit record, ``commit.json`` or legacy
        ``manifest.json`` (not parsed; see :meth:`latest`)."""
        try:
            names = os.listdir(self.checkpoints_dir)
        except FileNotFoundError:
            return []
        return sorted(int(n) for n in names if SEQUENCE_DIR.match(n)
                      and any((self.checkpoints_dir / n / r).is_file() for r in RECORD_NAMES))

    def get(self, sequence: int, *, verify: bool = True) -> Checkpoint:
        """The committed checkpoint ``sequence``, with every shard checked against its commit record.

        Reads ``commit.json``, or, for a checkpoint written before the rename, ``manifest.json``.

        Args:
            sequence: 0 .. 10**12-1.
            verify: re-hash every shard file (reads them all once) and compare
                with the sha256 in the record; without it only sizes are checked.

        Raises:
            CheckpointNotFoundError: if it has no commit record (never committed, or the writer died).
            StoreError: if the record is unreadable, not JSON, or inconsistent, or a shard file is
                missing, has another size, or (``verify``) another sha256 than the record says.
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
        if verify:
            for shard in checkpoint.shards:
                try:
                    digest = sha256_file(directory / shard.file)[0]
                except OSError as e:
                    raise StoreError(f"{path}: shard file {shard.file} unreadable: {e}") from e
                if digest != shard.sha256:
                    raise StoreError(f"{path}: shard file {shard.file} has sha256 {digest}, "
                                     f"the commit record says {shard.sha256}")
        return checkpoint

    def latest(self, *, verify: bool = True) -> Checkpoint | None:
        """The newest committed checkpoint that passes :meth:`get`, or None if there is none.

        Directories without a commit record (a writer died before commit) are
        skipped. A checkpoint whose record does not parse, or one of whose
        shards is missing or differs in size or (``verify``, the default)
        sha256 from the record, is never returned: it is skipped with a
        warning naming it and the fault, and the previous one is tried.
        """
        skipped: list[int] = []
        for sequence in reversed(self.sequences()):
            try:
                checkpoint = self.get(sequence, verify=verify)
            except CheckpointNotFoundError:
                continue  # pruned or removed since sequences() listed it
            except StoreError as e:
                log.warning("checkpoint %d under %s cannot be loaded and is skipped, falling back to an "
                            "earlier one: %s", sequence, self.root, e)
                skipped.append(sequence)
                continue
            if skipped:
                log.warning("loading checkpoint %d instead of the newer, refused checkpoint(s) %s",
                            sequence, skipped)
            return checkpoint
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

    def prune_stale(self, *, grace_s: float = STALE_AFTER_S, now: float | None = None) -> list[int]:
        """Delete checkpoint directories without a commit record that nothing touched for ``grace_s``.

        These are reservations whose trainer died or failed before the commit,
        dead writers' shards and leftovers of older versions. A directory's age
        is that of its newest entry; one still being written is younger than
        the grace period and stays. Committed checkpoints (a torn record
        included) are left to :meth:`prune`.

        Args:
            grace_s: seconds (>= 0) a directory must be untouched.
            now: the current time in seconds since the epoch (default: ``time.time()``).

        Returns:
            The deleted sequences, ascending.

        Raises:
            StoreError: if ``grace_s`` is negative or not a number.
        """
        if isinstance(grace_s, bool) or not isinstance(grace_s, (int, float)) or not grace_s >= 0:
            raise StoreError(f"grace_s must be a number of seconds >= 0, got {grace_s!r}")
        now = time.time() if now is None else now
        try:
            names = sorted(os.listdir(self.checkpoints_dir))
        except FileNotFoundError:
            return []
        removed = []
        for name in names:
            directory = self.checkpoints_dir / name
            if not SEQUENCE_DIR.match(name) or not directory.is_dir() \
                    or any((directory / r).exists() for r in RECORD_NAMES):
                continue
            try:
                if now - newest_activity(directory) < grace_s:
                    continue
            except FileNotFoundError:
                continue
            shutil.rmtree(directory, ignore_errors=True)
            log.info("pruned uncommitted checkpoint directory %s (untouched for %.0f s or more)", directory, grace_s)
            removed.append(int(name))
        return removed
