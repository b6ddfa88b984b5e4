"""Bytes of the REST binding: request bodies in, inference replies out. No I/O, no HTTP server.

An inference body is JSON (``$inference_request``), optionally followed by raw tensor bytes: the
binary tensor data extension that tritonclient.http uses by default. With it, the
``Inference-Header-Content-Length`` header gives the JSON part's size, an input carrying
``"parameters": {"binary_data_size": N}`` takes the next N bytes (little-endian, row-major)
instead of ``"data"``, and outputs are returned as bytes when the output's ``binary_data``
parameter is true, or when it is absent and the request's ``binary_data_output`` parameter is
true; the reply then has the same header and each binary output says its ``binary_data_size``.

Bodies may be compressed (``Content-Encoding: gzip``, exactly one member, or ``deflate``);
:func:`decode_body` inflates in slices and never more than the body limit, so a small compressed
body cannot expand into more memory than an uncompressed one may take (:class:`HttpError` 413),
and takes time linear in the body (a body of many gzip members is refused, 400).

JSON: the numeric ``"data"`` arrays of a body are parsed straight into float32 arrays (4 bytes
a number; a number takes at least 2 bytes of JSON), never into Python lists of floats (about 32
bytes a number); the JSON around them may take at most :data:`MAX_JSON_STRUCTURE_BYTES` (413),
so parsing a body never takes more than a few times its size. NaN, Infinity and numbers that
overflow FP32 are refused (400). Nesting deeper than Python's parser takes is 400. Outputs are
always valid JSON: a non-finite output element is written as ``null`` and the output's
``parameters`` say ``"non_finite": <count>`` (binary outputs carry the IEEE values as they are).

Spec: https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md
"""

from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from partition_server.serving.protocol import (DATATYPE, MODEL_VERSION, OUTPUT, WIRE_FP32, ModelProtocol, TensorIn,
                                               invalid)

__all__ = ["HEADER_LENGTH", "MAX_JSON_STRUCTURE_BYTES", "HttpError", "InferRequest", "decode_body", "encode_reply",
           "parse_request"]

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_JSON_STRUCTURE_BYTES = 1 << 20   # JSON of a request outside its numeric "data" arrays, bytes
_SLICE = 256 << 10                   # compressed bytes fed to the inflater at a time


class HttpError(Exception):
    """A request answered with an HTTP status that no protocol error maps to (408, 411, 413).

    Attributes:
        status: the HTTP status.
        message: the body's ``"error"``.
        close: whether the connection is closed after the answer (the body may be unread).
    """

    def __init__(self, status: int, message: str, *, close: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


@dataclass(frozen=True)
class InferRequest:
    """A parsed and checked inference request.

    Attributes:
        x: the input, ``[batch, inputs]`` float32.
        fields: the JSON request object (``id`` is echoed in the reply).
        binary_output: whether the output goes back as binary tensor data.
    """

    x: np.ndarray
    fields: dict
    binary_output: bool


def decode_body(body: bytes, *, encoding: str, limit: int, reserve: Callable[[int], None] | None = None) -> bytes:
    """``body`` as sent with ``Content-Encoding: encoding``, decompressed to at most ``limit`` bytes.

    ``reserve(n)`` is called before each slice of ``n`` inflated bytes is kept (it may raise to stop).

    Raises:
        HttpError: 413 when it decompresses to more than ``limit`` bytes (found without inflating more).
        InferenceError: INVALID_ARGUMENT for an unsupported encoding or data that cannot be decompressed.
    """
    encoding = encoding.strip().lower()
    if encoding == "identity" or not body:
        return body
    if encoding not in ("gzip", "deflate"):
        raise invalid(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    try:
        return _decompress(body, encoding, limit, reserve or (lambda n: None))
    except zlib.error as exc:
        raise invalid(f"the {encoding} request body cannot be decompressed: {exc}") from exc


def _decompress(body: bytes, encoding: str, limit: int, reserve: Callable[[int], None]) -> bytes:
    """``body`` decompressed (exactly one gzip member, or zlib "deflate"), fed to the inflater in
    slices of :data:`_SLICE` bytes and never producing more than ``limit`` bytes, in time linear in
    ``len(body) + limit``. Raises HttpError 413, InferenceError 400 (data after the member), or zlib.error."""
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    out = bytearray()
    view = memoryview(body)
    for start in range(0, len(body), _SLICE):
        pending = view[start:start + _SLICE]
        while pending and not inflater.eof:
            chunk = inflater.decompress(pending, min(_SLICE * 4, limit - len(out) + 1))
            if len(out) + len(chunk) > limit:
                raise HttpError(413, f"the {encoding} request body decompresses to more than {limit} bytes")
            reserve(len(chunk))
            out += chunk
            pending = inflater.unconsumed_tail
        if inflater.eof:
            rest = bytes(inflater.unused_data) + bytes(view[start + _SLICE:])
            # zeros may pad the end (gzip accepts them); another member may not follow.
            if rest.strip(b"\0"):
                raise invalid(f"the {encoding} request body must be exactly one compressed member; "
                              f"{len(rest)} bytes follow the first")
            return bytes(out)
    raise zlib.error("the compressed data is cut short")


def parse_request(model: ModelProtocol, body: bytes, *, header_length: str | None) -> InferRequest:
    """Parse an inference body and check it against ``model``.

    Args:
        model: the protocol model the inputs and outputs must fit.
        body: the decoded body: JSON, then the binary tensor data.
        header_length: the ``Inference-Header-Content-Length`` header, or None (all JSON).

    Raises:
        InferenceError: INVALID_ARGUMENT naming what does not fit.
    """
    request, binary = _split(body, header_length)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise invalid('"inputs" must be a list of input objects')
    tensors, offset = [], 0
    for inp in inputs:
        name, datatype, shape = inp.get("name"), inp.get("datatype"), inp.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise invalid(f'every input needs a string "name" and "datatype"; got {_brief(inp)}')
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise invalid(f'input {name!r}: "shape" must be a list of integers, got {shape!r}')
        size = _parameters(inp, f"input {name!r}").get("binary_data_size")
        if size is not None:
            if "data" in inp:
                raise invalid(f'input {name!r}: give either "data" or binary_data_size, not both')
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise invalid(f"input {name!r}: binary_data_size {size!r} does not fit the "
                              f"{len(binary) - offset} bytes of binary data left")
            data: bytes | np.ndarray = binary[offset:offset + size]
            offset += size
        elif "data" in inp:
            data = _json_array(inp["data"], name, shape)
        else:
            raise invalid(f'input {name!r} has neither "data" nor a binary_data_size parameter')
        tensors.append(TensorIn(name, datatype, tuple(shape), data))
    if offset != len(binary):
        raise invalid(f"{len(binary)} bytes of binary data follow the JSON header, but the inputs take {offset}")
    x = model.input_array(tensors)
    return InferRequest(x, request, _binary_output(model, request))


def encode_reply(model_name: str, request: InferRequest, y: np.ndarray) -> tuple[bytes, str, dict[str, str]]:
    """The ``$inference_response`` for output ``y`` ``[batch, units_last]``.

    Returns:
        ``(body, content type, extra headers)``: JSON (``application/json``), or JSON followed by
        the output's little-endian FP32 bytes (``application/octet-stream``, with
        ``Inference-Header-Content-Length``) when the request asked for binary output.
    """
    reply: dict[str, Any] = {"model_name": model_name, "model_version": MODEL_VERSION}
    if "id" in request.fields:
        reply["id"] = request.fields["id"]
    output: dict[str, Any] = {"name": OUTPUT, "datatype": DATATYPE, "shape": list(y.shape)}
    blob = b""
    if request.binary_output:
        blob = y.astype(WIRE_FP32).tobytes()
        output["parameters"] = {"binary_data_size": len(blob)}
    else:
        flat = y.ravel()
        finite = np.isfinite(flat)
        if finite.all():
            output["data"] = flat.tolist()
        else:  # JSON has no NaN or Infinity: null, and say how many
            output["data"] = [float(v) if ok else None for v, ok in zip(flat.tolist(), finite.tolist())]
            output["parameters"] = {"non_finite": int((~finite).sum())}
    reply["outputs"] = [output]
    header = json.dumps(reply, allow_nan=False).encode()
    if request.binary_output:
        return header + blob, "application/octet-stream", {HEADER_LENGTH: str(len(header))}
    return header, "application/json", {}


def _split(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """``(JSON request, the binary data after it)``; numeric ``"data"`` arrays come back as float32 arrays."""
    if header_length is None:
        n = len(body)
    else:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise invalid(f"{HEADER_LENGTH} {header_length!r} is not a size within the {len(body)}-byte body")
    structure, arrays = _extract_arrays(body[:n])
    if len(structure) > MAX_JSON_STRUCTURE_BYTES:
        raise HttpError(413, f"the request's JSON outside its numeric \"data\" arrays takes {len(structure)} bytes, "
                             f"more than {MAX_JSON_STRUCTURE_BYTES}; send data as plain numbers or as binary data")
    try:
        request = json.loads(structure, parse_constant=_refuse_constant)
    except RecursionError:
        raise invalid("the request JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"the request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise invalid("the request must be a JSON object ($inference_request)")
    inputs = request.get("inputs")
    if isinstance(inputs, list):
        for inp in inputs:
            if isinstance(inp, dict) and isinstance(inp.get("data"), str) and inp["data"] in arrays:
                inp["data"] = arrays[inp["data"]]
    return request, body[n:]


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_DATA_VALUE = re.compile(rb'\s*:\s*(?=\[)')
_NUMBER_BYTES = b"0123456789.eE+-, \t\r\n"
_LAST_ROW = re.compile(rb"\][ \t\r\n]*\]")


def _numeric_array_end(text: bytes, start: int) -> int | None:
    """The end of the JSON array at ``text[start] == "["`` if it is flat, or a list of flat rows,
    and holds nothing but number characters; else None. Only C-speed operations (find, count,
    translate, one regex search), so a large array does not hold the GIL for long."""
    close = text.find(b"]", start + 1)
    if close < 0:
        return None
    if text.find(b"[", start + 1, close) < 0:  # flat
        return close + 1 if not text[start + 1:close].translate(None, _NUMBER_BYTES) else None
    last = _LAST_ROW.search(text, start + 1)  # nested: rows "[...]" up to a row's "]" followed by "]"
    if last is None:
        return None
    inner = text[start + 1:last.start() + 1]
    if inner.translate(None, _NUMBER_BYTES) != b"[]" * inner.count(b"["):
        return None
    return last.end()


class _Numbers:
    """A ``"data"`` array of plain JSON numbers, as text, counted but not yet parsed."""

    def __init__(self, text: bytes):
        self.text = text
        self.count = text.count(b",") + 1 if text.strip() else 0

    def parse(self, name: str) -> np.ndarray:
        """The numbers as float32, parsed in C (4 bytes a number, no Python object per number).

        Raises:
            InferenceError: INVALID_ARGUMENT for a number beyond FP32.
        """
        try:
            array = np.fromstring(self.text, dtype=np.float32, sep=",") if self.count else np.zeros(0, np.float32)
        except ValueError:
            array = None
        if array is None or len(array) != self.count:
            raise invalid(f"input {name!r}: data must be a list of JSON numbers")
        if not np.isfinite(array).all():
            raise invalid(f"input {name!r}: data holds a number beyond FP32 (largest finite: "
                          f"{float(np.finfo(np.float32).max):g})")
        return array


def _extract_arrays(text: bytes) -> tuple[bytes, dict[str, _Numbers]]:
    """Cut every ``"data": [...]`` array of plain JSON numbers (flat, or a list of flat rows of equal
    length) out of ``text``, unparsed (:class:`_Numbers`).

    Returns:
        ``(text with each array replaced by a placeholder string, {placeholder: numbers})``. Arrays
        of anything else (strings, ``true``, deeper nesting) stay in the text for ``json.loads``.
    Raises:
        InferenceError: INVALID_ARGUMENT for nested rows of different lengths.
    """
    pieces: list[bytes] = []
    arrays: dict[str, _Numbers] = {}
    pos = 0
    for m in _JSON_STRING.finditer(text):
        if m.group() != b'"data"' or m.start() < pos:
            continue
        colon = _DATA_VALUE.match(text, m.end())
        if colon is None:
            continue
        start = colon.end()
        end = _numeric_array_end(text, start)
        if end is None:
            continue
        inner = text[start + 1:end - 1]
        numbers = inner.translate(None, b"[]")
        if not _rectangular(inner):
            raise invalid("input data is not a rectangular array of numbers: its rows differ in length")
        key = f"\u0000mpnn-data-{len(arrays)}"
        pieces += [text[pos:start], json.dumps(key).encode()]
        arrays[key] = _Numbers(numbers)
        pos = end
    if not arrays:
        return text, arrays
    pieces.append(text[pos:])
    return b"".join(pieces), arrays


def _rectangular(inner: bytes) -> bool:
    """Whether the rows ``[...]`` in ``inner`` (the text between a nested array's outer brackets)
    all hold as many numbers (as many commas); True for a flat array."""
    b = np.frombuffer(inner, np.uint8)
    starts = np.flatnonzero(b == ord("["))
    if len(starts) < 2:
        return True
    # Commas from each row's "[" to the next row's "[": its own, plus the one between the rows.
    commas = np.add.reduceat((b == ord(",")).view(np.uint8), starts, dtype=np.int64)
    commas[:-1] -= 1
    return bool((commas == commas[0]).all())


def _refuse_constant(name: str) -> Any:
    raise invalid(f"the request JSON holds {name}, which is not a JSON number; inputs must be finite")


def _binary_output(model: ModelProtocol, request: dict) -> bool:
    """Whether the (only) output goes back as binary data; checks the requested outputs."""
    default = bool(_parameters(request, "request").get("binary_data_output", False))
    outputs = request.get("outputs")
    if outputs is None:
        return default
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise invalid('"outputs" must be a list of output objects')
    model.check_outputs([o.get("name") for o in outputs])
    binary = default
    for o in outputs:
        params = _parameters(o, f"output {o.get('name')!r}")
        if "classification" in params:
            raise invalid("the classification extension is not supported")
        binary = bool(params.get("binary_data", default))
    return binary


def _parameters(obj: dict, what: str) -> dict:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise invalid(f'{what}: "parameters" must be an object')
    return params


def _json_array(data: Any, name: str, shape: list[int]) -> np.ndarray:
    if isinstance(data, _Numbers):  # cut out by _extract_arrays: count first, then parse
        want = math.prod(shape)
        if data.count != want:
            raise invalid(f"input {name!r}: {data.count} elements do not fit shape {shape} ({want} elements)")
        return data.parse(name)
    try:
        return np.array(data)
    except (ValueError, TypeError) as exc:
        raise invalid(f"input {name!r}: data is not a rectangular array of numbers: {exc}") from exc


def _brief(obj: Any, limit: int = 120) -> str:
    text = json.dumps(obj, default=lambda a: f"<{getattr(a, 'count', '?')} numbers>")
    return text if len(text) <= limit else text[:limit] + "…"
