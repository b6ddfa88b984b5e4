"""The IDX file format of MNIST (LeCun, Cortes and Burges), parsed here: no extra dependency.

http://yann.lecun.com/exdb/mnist/, "file formats": two zero bytes, a type code,
the number of dimensions, one big-endian uint32 per dimension, then the payload
in row-major, big-endian order; gzipped or plain.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from partition_server.data.base import DatasetError

__all__ = ["IDX_DTYPES", "read_idx"]

IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
"""IDX type code -> big-endian numpy dtype."""

_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse one IDX file (gzipped or plain) into an array.

    Format (http://yann.lecun.com/exdb/mnist/, "file formats"): two zero
    bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B short, 0x0C int,
    0x0D float, 0x0E double), the number of dimensions, one big-endian uint32
    per dimension, then the payload in row-major, big-endian order. Gzip is
    recognised by its magic bytes, not by the file name.

    Args:
        path: the file.

    Returns:
        Array of shape ``dims`` in native byte order; dtype uint8, int8,
        int16, int32, float32 or float64 per the type code.

    Raises:
        DatasetError: naming the file, if it cannot be read or decompressed,
            the magic bytes or type code are wrong, the header is cut short,
            or the payload length differs from what the dimensions require.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except OSError as e:  # includes gzip.BadGzipFile
        raise DatasetError(f"{path}: cannot read IDX file: {e}") from e
    except (EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: gzip stream is truncated or corrupt: {e}") from e

    if len(raw) < 4:
        raise DatasetError(f"{path}: IDX header needs 4 bytes, file has {len(raw)}")
    if raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path}: bad IDX magic: first two bytes are {raw[:2].hex()}, expected 0000")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise DatasetError(
            f"{path}: unknown IDX type code 0x{code:02X} "
            f"(known: {', '.join(f'0x{c:02X}' for c in IDX_DTYPES)})"
        )
    if ndim == 0:
        raise DatasetError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DatasetError(
            f"{path}: IDX header declares {ndim} dimensions ({header_len} header bytes) "
            f"but the file has only {len(raw)} bytes"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        raise DatasetError(
            f"{path}: IDX dims {list(dims)} of {dtype.name} need {expected} payload bytes, "
            f"file has {actual}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return data.astype(dtype.newbyteorder("="))
