"""Atomic, durable file writes: the one helper every writer of shared files uses.

A file is written to a temporary file beside its target (same directory, so the
same filesystem), flushed and fsynced, moved into place with ``os.replace``
(or, ``exclusive``, hard-linked, which fails instead of replacing), and then the
directory is fsynced so the rename itself survives a crash. A reader sees either
the old file or the complete new one, never a partial file, under the real name;
after a crash only a ``.<name>.<random>.tmp`` file may be left behind.

Used by the checkpoint store (shards, commit records, exports), the dataset
downloader and local mode (``lookup.json``, ``network.json``).
"""

from __future__ import annotations

import errno
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "fsync_dir", "write_atomically"]

_TEMP_ATTEMPTS = 100


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory ``path`` (renames, links, unlinks) durable.

    Filesystems that cannot fsync a directory (EINVAL, EBADF, ENOTSUP, EROFS)
    and directories that cannot be opened are skipped silently.

    Raises:
        OSError: any other fsync failure (e.g. EIO), which means the data may be lost.
    """
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


def _create_temp(target: Path) -> Path:
    """A new empty ``.<name>.<random>.tmp`` beside ``target``, with the permissions a plain
    ``open(..., "w")`` would give (0o666 less the umask)."""
    for _ in range(_TEMP_ATTEMPTS):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside {target}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: str | os.PathLike[str], *, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on a clean exit, move it into place durably.

    Write the complete file to the yielded path inside the ``with`` block (by
    any means, e.g. ``safetensors.numpy.save_file``). On exit the file is
    fsynced, renamed over ``target`` with ``os.replace`` (or, ``exclusive``,
    hard-linked to it, so an existing ``target`` is never replaced), and the
    directory is fsynced. If the block raises, the temporary file is removed
    and ``target`` is untouched.

    Args:
        target: the final path; its directory must exist.
        exclusive: refuse to replace an existing ``target``.

    Raises:
        FileExistsError: ``exclusive`` and ``target`` exists (another writer won).
        OSError: the directory is missing or not writable, or a write or fsync failed.
    """
    target = Path(target)
    tmp = _create_temp(target)
    try:
        yield tmp
        _fsync_file(tmp)
        if exclusive:
            os.link(tmp, target)
            tmp.unlink()
        else:
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def write_atomically(path: str | os.PathLike[str], data: str | bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` atomically and durably (see :func:`atomic_path`).

    Args:
        path: the final path; its directory must exist.
        data: the whole content; ``str`` is encoded as UTF-8.
        exclusive: refuse to replace an existing file.

    Raises:
        FileExistsError: ``exclusive`` and ``path`` exists.
        OSError: the directory is missing or not writable, or a write or fsync failed.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_path(path, exclusive=exclusive) as tmp:
        with open(tmp, "wb") as f:
            f.write(payload)
