"""Safetensors files of the store: atomic save with the file's sha256, and hashing.

Both the checkpoint writer (shards) and the PyTorch export save through
:func:`save_safetensors`, which writes via :func:`~partition_server.storage.atomic.atomic_path`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

import numpy as np
from safetensors.numpy import save_file

from partition_server.storage.atomic import atomic_path

__all__ = ["save_safetensors", "sha256_file"]

_HASH_CHUNK = 1 << 20  # bytes read per step when hashing


def sha256_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """The sha256 hex digest and the size in bytes of the file at ``path``.

    Raises:
        OSError: if the file cannot be read.
    """
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def save_safetensors(tensors: Mapping[str, np.ndarray], target: str | os.PathLike[str], *,
                     metadata: Mapping[str, str], exclusive: bool = False) -> tuple[str, int]:
    """Write ``tensors`` as a safetensors file at ``target``, atomically and durably.

    Args:
        tensors: key -> C-contiguous array of any dtype safetensors supports.
        target: the final path; its directory must exist.
        metadata: string -> string, stored in the file's header (``__metadata__``).
        exclusive: never replace an existing ``target`` (the first writer wins).

    Returns:
        ``(sha256 hex digest, size in bytes)`` of the written file.

    Raises:
        FileExistsError: ``exclusive`` and ``target`` exists; it is untouched.
        OSError: if writing, fsyncing or renaming fails; ``target`` is then untouched.
    """
    with atomic_path(Path(target), exclusive=exclusive) as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata))
        digest, size = sha256_file(tmp)
    return digest, size
