"""Reserving a checkpoint sequence before any shard is written, and checking a reservation.

The driver reserves a sequence by creating its directory (``os.mkdir``: exactly
one of several racing drivers succeeds) and then, exclusively, its
``reservation.json``, which names the run and a random 256-bit token::

    {"apiVersion": "mpnn.dev/reservation/v1", "sequence": 7, "run": "run-2",
     "token": "<64 hex digits>", "created": "2025-01-01T00:00:00Z"}

A partition server writes its shard, and the driver commits, only for a
reservation whose run and token match the request (:func:`check_reservation`);
a server also refuses a reservation that a newer one has superseded. Nothing
but the driver creates directories under ``checkpoints/``, so a stray request
can neither write a shard nor push the next sequence out of range.

Directories without a commit record (abandoned reservations, dead writers,
leftovers of older versions) are ignored by :meth:`ModelStore.next_sequence` and
removed by :func:`stale_directories` / :meth:`ModelStore.prune_stale` once
nothing in them changed for a grace period.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from partition_server.storage.atomic import fsync_dir, write_atomically
from partition_server.storage.schema import (
    MAX_SEQUENCE,
    RESERVATION,
    RESERVATION_SCHEMA,
    SEQUENCE_DIR,
    record_path,
)
from partition_server.storage.validation import (
    ForeignReservationError,
    ReservationError,
    StoreError,
    check_int,
)

__all__ = [
    "MAX_RUN_ID",
    "RESERVE_ATTEMPTS",
    "Reservation",
    "check_reservation",
    "create_reservation",
    "has_reservation",
    "newest_activity",
    "read_reservation",
]

MAX_RUN_ID = 253
"""Longest run id in characters (a Kubernetes object name)."""
RESERVE_ATTEMPTS = 1000
"""Existing directories :func:`create_reservation` steps over before it gives up."""
_TOKEN = re.compile(r"[0-9a-f]{64}")
_MAX_RESERVATION_BYTES = 4096


def _check_run_id(run_id: Any, field: str = "run_id") -> str:
    if not isinstance(run_id, str) or not run_id or len(run_id) > MAX_RUN_ID \
            or any(not c.isprintable() for c in run_id):
        raise StoreError(f"{field} must be 1..{MAX_RUN_ID} printable characters, got {run_id!r}")
    return run_id


@dataclass(frozen=True)
class Reservation:
    """A reserved checkpoint sequence: what a shard write and the commit must present.

    Attributes:
        sequence: the reserved number, 0 .. :data:`MAX_SEQUENCE`.
        run_id: the training run that reserved it.
        token: 64 lowercase hex digits (256 random bits), known to the reserving
            driver and, through its Checkpoint requests, to the servers.
    """

    sequence: int
    run_id: str
    token: str

    def __repr__(self) -> str:  # the token stays out of logs
        return f"Reservation(sequence={self.sequence}, run_id={self.run_id!r})"

    @classmethod
    def of(cls, *, sequence: Any, run_id: Any, token: Any) -> "Reservation":
        """A reservation from untrusted fields (e.g. a Checkpoint request), validated.

        Raises:
            StoreError: naming the field and value: ``sequence`` not in 0..10**12-1, ``run_id``
                empty, too long or not printable, ``token`` not 64 lowercase hex digits.
        """
        sequence = check_int(sequence, "sequence", maximum=MAX_SEQUENCE)
        _check_run_id(run_id)
        if not isinstance(token, str) or not _TOKEN.fullmatch(token):
            shown = token if not isinstance(token, str) else f"{len(token)} characters"
            raise StoreError(f"reservation token must be 64 lowercase hex digits, got {shown!r}")
        return cls(sequence, run_id, token)


def create_reservation(checkpoints_dir: Path, first: int, *, run_id: str) -> Reservation:
    """Reserve the lowest free sequence from ``first`` on: exclusive ``mkdir``, then ``reservation.json``.

    Args:
        checkpoints_dir: ``<root>/checkpoints`` (created if missing).
        first: the lowest sequence to try (:meth:`ModelStore.next_sequence`).
        run_id: the reserving run.

    Raises:
        StoreError: ``run_id`` invalid, the sequence would exceed 10**12-1, or
            :data:`RESERVE_ATTEMPTS` directories in a row already exist.
        OSError: the volume is not writable.
    """
    _check_run_id(run_id)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    sequence = check_int(first, "first sequence")
    for _ in range(RESERVE_ATTEMPTS):
        if sequence > MAX_SEQUENCE:
            raise StoreError(f"cannot reserve a checkpoint sequence: the next one, {sequence}, "
                             f"exceeds {MAX_SEQUENCE}")
        directory = checkpoints_dir / f"{sequence:012d}"
        try:
            os.mkdir(directory)
        except FileExistsError:
            sequence += 1  # another driver's, or a leftover: never adopted
            continue
        reservation = Reservation(sequence, run_id, secrets.token_hex(32))
        created = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        body = {"apiVersion": RESERVATION_SCHEMA, "sequence": sequence, "run": run_id,
                "token": reservation.token, "created": created}
        write_atomically(directory / RESERVATION, json.dumps(body, indent=2) + "\n", exclusive=True)
        fsync_dir(checkpoints_dir)
        return reservation
    raise StoreError(f"cannot reserve a checkpoint sequence: {RESERVE_ATTEMPTS} directories from {first} on "
                     f"already exist under {checkpoints_dir} (prune stale ones with ModelStore.prune_stale)")


def has_reservation(directory: Path) -> bool:
    """Whether ``directory`` holds a ``reservation.json`` (not parsed)."""
    return (directory / RESERVATION).is_file()


def read_reservation(directory: Path, sequence: int) -> Reservation:
    """The reservation recorded in checkpoint ``directory``.

    Raises:
        ReservationError: there is none, or it is unreadable, too large or malformed.
    """
    path = directory / RESERVATION
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_RESERVATION_BYTES + 1)
    except FileNotFoundError:
        raise ReservationError(f"checkpoint sequence {sequence} is not reserved ({path} does not exist); "
                               "the driver reserves a sequence before any shard is written") from None
    except OSError as e:
        raise ReservationError(f"{path}: unreadable: {e}") from e
    try:
        if len(raw) > _MAX_RESERVATION_BYTES:
            raise ValueError(f"larger than {_MAX_RESERVATION_BYTES} bytes")
        obj = json.loads(raw)
        if not isinstance(obj, dict) or obj.get("apiVersion") != RESERVATION_SCHEMA:
            raise ValueError(f"apiVersion must be {RESERVATION_SCHEMA}")
        if obj.get("sequence") != sequence:
            raise ValueError(f"sequence is {obj.get('sequence')!r}, the directory's is {sequence}")
        return Reservation.of(sequence=sequence, run_id=obj.get("run"), token=obj.get("token"))
    except (ValueError, StoreError) as e:
        raise ReservationError(f"{path}: malformed reservation: {e}") from None


def check_reservation(checkpoints_dir: Path, reservation: Reservation, *, newest: bool) -> Path:
    """Check that ``reservation`` may write: reserved with that run and token, not committed.

    Args:
        checkpoints_dir: ``<root>/checkpoints``.
        reservation: what the writer presents.
        newest: also refuse if a higher sequence is reserved or committed (a newer
            trainer superseded this one); servers check this before writing a shard.

    Returns:
        The checkpoint directory.

    Raises:
        ReservationError: not reserved, already committed, or superseded.
        ForeignReservationError: reserved by another run or with another token.
    """
    sequence = reservation.sequence
    directory = checkpoints_dir / f"{sequence:012d}"
    on_disk = read_reservation(directory, sequence)
    if on_disk.run_id != reservation.run_id:
        raise ForeignReservationError(f"checkpoint sequence {sequence} is reserved by run {on_disk.run_id!r}, "
                                      f"not {reservation.run_id!r}")
    if not hmac.compare_digest(on_disk.token, reservation.token):
        raise ForeignReservationError(f"checkpoint sequence {sequence} of run {reservation.run_id!r}: "
                                      "the reservation token does not match")
    if record_path(directory) is not None:
        raise ReservationError(f"checkpoint {sequence} is already committed at {directory}; "
                               "checkpoints are immutable")
    if newest:
        try:
            names = os.listdir(checkpoints_dir)
        except OSError as e:
            raise ReservationError(f"{checkpoints_dir}: unreadable: {e}") from e
        newer = sorted(int(n) for n in names if SEQUENCE_DIR.match(n) and int(n) > sequence
                       and (has_reservation(checkpoints_dir / n) or record_path(checkpoints_dir / n) is not None))
        if newer:
            raise ReservationError(f"checkpoint sequence {sequence} of run {reservation.run_id!r} is superseded "
                                   f"by sequence {newer[-1]}, reserved or committed since by another trainer")
    return directory


def newest_activity(directory: Path) -> float:
    """The latest modification time (seconds since the epoch) of ``directory`` and its entries."""
    newest = directory.stat().st_mtime
    for entry in os.scandir(directory):
        try:
            newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
        except FileNotFoundError:
            continue
    return newest
