"""Tensors on the wire: raw little-endian bytes with dtype and shape (``DESIGN.md``, "Execution engine")."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from partition_server.api.protos import mpnn_pb2 as pb

__all__ = ["DTYPES", "encode_exchange", "from_tensor", "to_tensor"]

DTYPES = {name: np.dtype(name).newbyteorder("<") for name in ("float32", "float64", "int64", "int32", "uint8")}


def to_tensor(array: np.ndarray) -> pb.Tensor:
    """Encode an array as a :class:`Tensor` message. Raises ValueError for an unsupported dtype."""
    name = array.dtype.name
    if name not in DTYPES:
        raise ValueError(f"dtype {name} cannot be sent; supported: {', '.join(DTYPES)}")
    data = np.ascontiguousarray(array, dtype=DTYPES[name]).tobytes()
    return pb.Tensor(dtype=name, shape=list(array.shape), data=data)


def from_tensor(t: pb.Tensor, field: str, dtype: str | None = None,
                shape: Sequence[int | None] | None = None) -> np.ndarray:
    """Decode a :class:`Tensor`, checking it against what the caller expects.

    Args:
        field: the request field, named in errors (``inputs``).
        dtype: required dtype name, or None for any supported one.
        shape: required shape; ``None`` entries match any size (``[None, 64]``).

    Returns:
        A native-endian array (a copy; the message's buffer is not kept).

    Raises:
        ValueError: unknown or unexpected dtype, a shape that differs, or a byte
            count that does not match the shape.
    """
    if t.dtype not in DTYPES:
        raise ValueError(f"{field}: unsupported dtype {t.dtype!r}; supported: {', '.join(DTYPES)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{field}: dtype must be {dtype}, got {t.dtype}")
    dims = tuple(int(d) for d in t.shape)
    if any(d < 0 for d in dims):
        raise ValueError(f"{field}: negative dimension in shape {list(dims)}")
    if shape is not None and (len(dims) != len(shape) or any(e is not None and e != d for e, d in zip(shape, dims))):
        want = ", ".join("*" if e is None else str(e) for e in shape)
        raise ValueError(f"{field}: shape must be [{want}], got {list(dims)}")
    want_bytes = int(np.prod(dims, dtype=np.int64)) * DTYPES[t.dtype].itemsize
    if len(t.data) != want_bytes:
        raise ValueError(f"{field}: {len(t.data)} bytes do not fit shape {list(dims)} of {t.dtype} ({want_bytes} bytes)")
    return np.frombuffer(t.data, dtype=DTYPES[t.dtype]).astype(t.dtype).reshape(dims)


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint of ``value`` (negative int32/int64: 10 bytes, two's complement)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """Header of a length-delimited field ``number`` holding ``payload``'s bytes."""
    return _varint(number << 3 | 2) + _varint(len(payload))


def encode_exchange(*, lookup_version: str, pass_id: str, phase: str, layer: int, source: int,
                    array: np.ndarray) -> tuple[bytes, int]:
    """The wire bytes of an ``ExchangeRequest`` carrying ``array``, built with one copy of the
    array's data (``to_tensor`` + ``SerializeToString`` copy it three times).

    Parses as ``pb.ExchangeRequest`` with the same fields as one built by :func:`to_tensor`
    (``tests/unit/test_peer_window.py`` checks the bytes are equal).

    Returns:
        ``(bytes, payload)``: the message, and the tensor's data bytes (for traffic counters).
    Raises:
        ValueError: an unsupported dtype.
    """
    name = array.dtype.name
    if name not in DTYPES:
        raise ValueError(f"dtype {name} cannot be sent; supported: {', '.join(DTYPES)}")
    data = memoryview(np.ascontiguousarray(array, dtype=DTYPES[name]).reshape(-1)).cast("B")
    shape = b"".join(_varint(int(d)) for d in array.shape)
    dtype = name.encode()
    tensor_head = b"".join((_field(1, dtype), dtype, _field(2, shape) + shape if shape else b"",
                            _field(3, data) if len(data) else b""))
    tensor_len = len(tensor_head) + len(data)
    head = []
    for number, text in ((1, lookup_version), (2, pass_id), (3, phase)):
        if text:
            raw = text.encode()
            head += [_field(number, raw), raw]
    for number, value in ((4, layer), (5, source)):
        if value:
            head.append(_varint(number << 3) + _varint(value))
    head.append(_varint(6 << 3 | 2) + _varint(tensor_len))
    head.append(tensor_head)
    return b"".join((*head, data)), len(data)
