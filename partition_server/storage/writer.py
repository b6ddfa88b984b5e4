"""Writing a checkpoint: one shard per partition, then the commit record, last and exclusively.

Every partition writes only the rows of its own neurons (weight rows, biases,
optimizer state rows) into its own shard file, so writers never share bytes.
Whoever commits (the driver) collects every :class:`ShardInfo` and writes the
commit record; until then the checkpoint does not exist, and a record that
already exists is never replaced. Both need the sequence's :class:`Reservation`
(see :mod:`.reservation`): a shard is written only for a reserved sequence, with
the reserving run and token, and never replaces a shard already written; the
commit re-hashes every shard against its :class:`ShardInfo`. Use these through
:class:`ModelStore`.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from partition_server.storage.atomic import fsync_dir, write_atomically
from partition_server.storage.checkpoint import Checkpoint
from partition_server.storage.files import save_safetensors, sha256_file
from partition_server.storage.reservation import Reservation, check_reservation
from partition_server.storage.schema import (
    CHECKPOINT_SCHEMA,
    COMMIT_RECORD,
    CommitRecord,
    ShardInfo,
    TensorSpec,
    record_path,
    shard_file,
)
from partition_server.storage.validation import (
    ReservationError,
    RowRanges,
    StoreError,
    check_int,
    check_network,
    check_ranges,
    count_rows,
)

__all__ = ["commit_checkpoint", "write_shard"]

log = logging.getLogger(__name__)


def write_shard(checkpoints_dir: Path, reservation: Reservation, *, partition: int,
                layers: Mapping[int, Mapping[str, np.ndarray]], ranges: Mapping[int, RowRanges]) -> ShardInfo:
    """Write partition ``partition``'s rows for the reserved checkpoint into its directory.

    See :meth:`ModelStore.write_shard` for the arguments.

    Raises:
        StoreError: see :meth:`ModelStore.write_shard`.
        OSError: if the file cannot be written.
    """
    partition = check_int(partition, "partition")
    sequence = reservation.sequence
    directory = check_reservation(checkpoints_dir, reservation, newest=True)
    if not isinstance(layers, Mapping) or not isinstance(ranges, Mapping):
        raise StoreError("layers and ranges must be mappings keyed by layer index")
    if set(layers) != set(ranges):
        raise StoreError(f"layers has layer keys {sorted(layers)} but ranges has {sorted(ranges)}")

    tensors: dict[str, np.ndarray] = {}
    info_ranges: dict[int, tuple[tuple[int, int], ...]] = {}
    info_tensors: dict[int, dict[str, TensorSpec]] = {}
    for k in ranges:
        check_int(k, "layer")
    for k in sorted(ranges):
        rr = check_ranges(ranges[k], f"ranges[{k}]")
        rows = count_rows(rr)
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

    file = shard_file(partition)
    metadata = {
        "apiVersion": CHECKPOINT_SCHEMA,
        "sequence": str(sequence),
        "partition": str(partition),
        "ranges": json.dumps({str(k): [list(r) for r in v] for k, v in info_ranges.items()}),
    }
    try:
        digest, size = save_safetensors(tensors, directory / file, metadata=metadata, exclusive=True)
    except FileExistsError:
        raise ReservationError(f"partition {partition} already wrote its shard of checkpoint {sequence} "
                               f"({directory / file}); a shard is never replaced") from None
    return ShardInfo(file=file, partition=partition, ranges=info_ranges, tensors=info_tensors,
                     sha256=digest, size=size)


def commit_checkpoint(checkpoints_dir: Path, reservation: Reservation,
                      shards: Sequence[ShardInfo | Mapping[str, Any]], *,
                      network: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> Checkpoint:
    """Make the reserved sequence a checkpoint by writing its ``commit.json``, last and exclusively.

    See :meth:`ModelStore.commit` for the arguments.

    Raises:
        StoreError: see :meth:`ModelStore.commit`.
        OSError: if the record cannot be written.
    """
    sequence = reservation.sequence
    directory = check_reservation(checkpoints_dir, reservation, newest=False)
    check_network(network)
    infos = [s if isinstance(s, ShardInfo) else ShardInfo.from_dict(s, f"shards[{i}]")
             for i, s in enumerate(shards)]
    if not infos:
        raise StoreError(f"commit of checkpoint {sequence}: no shards given")
    created = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    record = {
        "apiVersion": CHECKPOINT_SCHEMA,
        "sequence": int(sequence),
        "created": created,
        "network": dict(network),
        "meta": dict(meta or {}),
        "shards": [s.to_dict() for s in sorted(infos, key=lambda s: s.partition)],
    }
    try:
        text = json.dumps(record, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise StoreError(f"commit of checkpoint {sequence}: network and meta must be JSON-serializable: {e}") from e
    parsed = CommitRecord.from_dict(json.loads(text), str(directory / COMMIT_RECORD))
    checkpoint = Checkpoint(directory, parsed)  # validates coverage and tensors

    if record_path(directory) is not None:
        raise StoreError(f"checkpoint {sequence} is already committed at {directory}")
    for shard in infos:
        if shard.file != shard_file(shard.partition):
            raise StoreError(f"commit of checkpoint {sequence}: shard of partition {shard.partition} names file "
                             f"{shard.file!r}, expected {shard_file(shard.partition)!r}")
        path = directory / shard.file
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise StoreError(f"commit of checkpoint {sequence}: shard file {path} of partition {shard.partition} "
                             "does not exist") from None
        if size != shard.size:
            raise StoreError(f"commit of checkpoint {sequence}: shard {path} has {size} bytes, its ShardInfo says "
                             f"{shard.size} (rewritten since?)")
        digest = sha256_file(path)[0]
        if digest != shard.sha256:
            raise StoreError(f"commit of checkpoint {sequence}: shard {path} has sha256 {digest}, its ShardInfo "
                             f"says {shard.sha256} (another writer's shard?); not committed")

    # Shards were renamed into place by other processes; make those entries
    # durable before the record that points at them.
    fsync_dir(directory)
    try:
        write_atomically(directory / COMMIT_RECORD, text, exclusive=True)
    except FileExistsError:
        raise StoreError(f"checkpoint {sequence} was committed by another writer at {directory}") from None
    fsync_dir(directory.parent)
    log.info("committed checkpoint %d (%d shards) at %s", sequence, len(infos), directory)
    return checkpoint
