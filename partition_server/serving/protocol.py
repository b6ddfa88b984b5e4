"""The Open Inference Protocol v2 model of one network: names, metadata, errors and the input codec.

Both bindings (gRPC in ``inference_grpc``, REST in ``rest``) describe the same model and check
requests the same way; this module is that shared part, with no I/O. The model is the network,
named by its ``metadata.name``, with one version, ``"1"``:

- input ``input``, FP32, shape ``[-1, inputs]``;
- output ``output``, FP32, shape ``[-1, units of the last layer]``.

Inputs must be FP32, as the metadata says (the spec requires the datatype to match); JSON
numbers are converted to FP32. Raw tensor bytes are little-endian and row-major.

Errors are :class:`InferenceError`: a gRPC status code plus the descriptive message that is
also the REST body's ``"error"``. INVALID_ARGUMENT / 400 for a request that does not fit the
model, NOT_FOUND / 404 for an unknown model or version, UNAVAILABLE / 503 and
DEADLINE_EXCEEDED / 504 for a pass that cannot be run (see ``inference``).

Spec: https://github.com/kserve/kserve/blob/master/docs/predict-api/v2/required_api.md
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any, Sequence

import grpc
import numpy as np

from partition_server.api.manifest import ModelSpec

__all__ = [
    "DATATYPE",
    "EXTENSIONS",
    "HTTP_STATUS",
    "INPUT",
    "MODEL_VERSION",
    "OUTPUT",
    "PLATFORM",
    "SERVER_NAME",
    "WIRE_FP32",
    "InferenceError",
    "ModelProtocol",
    "TensorIn",
    "invalid",
    "server_metadata",
]

SERVER_NAME = "mpnn"
PLATFORM = "mpnn_numpy"
MODEL_VERSION = "1"
INPUT, OUTPUT, DATATYPE = "input", "output", "FP32"
# Triton's name for the binary tensor data extension of the REST API.
EXTENSIONS = ("binary_tensor_data",)
WIRE_FP32 = np.dtype("<f4")

# The REST status of each gRPC code an InferenceError carries; any other is 500.
HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
               grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504}


class InferenceError(Exception):
    """A request the protocol answers with an error.

    Attributes:
        code: the gRPC status code.
        message: the descriptive message (the REST body's ``"error"``).
    """

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        """400, 404, 503, 504, else 500."""
        return HTTP_STATUS.get(self.code, 500)


def invalid(message: str) -> InferenceError:
    """An INVALID_ARGUMENT (400) :class:`InferenceError` with ``message``."""
    return InferenceError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class TensorIn:
    """One input tensor of a request, as either binding received it.

    Attributes:
        name: the input's name (the model has one, ``input``).
        datatype: the protocol's datatype name, e.g. ``"FP32"``.
        shape: the declared shape, e.g. ``(batch, inputs)``.
        data: the raw little-endian bytes (gRPC ``raw_input_contents``, REST binary data) or
            the elements as an array of any numeric dtype (JSON ``data``, gRPC ``contents``),
            flat or nested.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes | np.ndarray


def server_metadata() -> dict[str, Any]:
    """``$metadata_server_response``: name ``mpnn``, the installed package version, extensions."""
    try:
        version = importlib_metadata.version("mpnn")
    except importlib_metadata.PackageNotFoundError:
        version = "unknown"
    return {"name": SERVER_NAME, "version": version, "extensions": list(EXTENSIONS)}


class ModelProtocol:
    """The protocol's view of one network: metadata and request checks, without running anything.

    Args:
        name: the network's name, which is the model name.
        model: its shape (inputs, layers).
    """

    def __init__(self, name: str, model: ModelSpec):
        self.name = name
        self.model = model

    def server_metadata(self) -> dict[str, Any]:
        """``$metadata_server_response`` (see :func:`server_metadata`)."""
        return server_metadata()

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        """``$metadata_model_response``: name, versions, platform, inputs and outputs.

        Raises:
            InferenceError: NOT_FOUND for another model or version.
        """
        self.check_model(name, version)
        return {"name": self.name, "versions": [MODEL_VERSION], "platform": PLATFORM,
                "inputs": [{"name": INPUT, "datatype": DATATYPE, "shape": [-1, self.model.inputs]}],
                "outputs": [{"name": OUTPUT, "datatype": DATATYPE, "shape": [-1, self.model.layer_units[-1]]}]}

    def check_model(self, name: str, version: str = "") -> None:
        """Raise InferenceError NOT_FOUND unless ``name`` is this model and ``version`` is "" or "1"."""
        if name != self.name:
            raise InferenceError(grpc.StatusCode.NOT_FOUND,
                                 f"unknown model {name!r}; this server serves {self.name!r}")
        if version not in ("", MODEL_VERSION):
            raise InferenceError(grpc.StatusCode.NOT_FOUND,
                                 f"model {name!r} has no version {version!r}; its only version is {MODEL_VERSION!r}")

    def input_array(self, inputs: Sequence[TensorIn]) -> np.ndarray:
        """Check a request's inputs against the model and return ``x`` ``[batch, inputs]`` float32.

        Raises:
            InferenceError: INVALID_ARGUMENT naming the input and what was expected (name,
                datatype, shape, byte or element count, non-numeric data).
        """
        want = f"FP32 [-1, {self.model.inputs}]"
        names = [t.name for t in inputs]
        if names != [INPUT]:
            raise invalid(f"model {self.name!r} takes exactly one input {INPUT!r} {want}; got inputs {names}")
        t = inputs[0]
        if t.datatype != DATATYPE:
            raise invalid(f"input {INPUT!r} has datatype {t.datatype!r}, but model {self.name!r} expects {DATATYPE!r}")
        shape = tuple(t.shape)
        if len(shape) != 2 or shape[1] != self.model.inputs or shape[0] < 0:
            raise invalid(f"input {INPUT!r} has shape {list(shape)}, but model {self.name!r} expects "
                          f"[-1, {self.model.inputs}] (batch, features)")
        count = shape[0] * shape[1]
        if isinstance(t.data, (bytes, bytearray, memoryview)):
            nbytes = len(t.data)
            if nbytes != count * WIRE_FP32.itemsize:
                raise invalid(f"input {INPUT!r}: {nbytes} bytes of data do not fit shape {list(shape)} "
                              f"of {DATATYPE} ({count * WIRE_FP32.itemsize} bytes)")
            return _finite(np.frombuffer(t.data, dtype=WIRE_FP32).astype(np.float32).reshape(shape))
        data = np.asarray(t.data)
        if data.dtype.kind not in "iuf":
            raise invalid(f"input {INPUT!r}: data must be numbers, got {data.dtype.name}")
        if data.size != count:
            raise invalid(f"input {INPUT!r}: {data.size} elements do not fit shape {list(shape)} ({count} elements)")
        with np.errstate(over="ignore"):
            return _finite(data.astype(np.float32).reshape(shape))

    def check_outputs(self, names: Sequence[str]) -> None:
        """Raise InferenceError INVALID_ARGUMENT for a requested output the model does not have."""
        unknown = [n for n in names if n != OUTPUT]
        if unknown:
            raise invalid(f"unknown outputs {unknown} for model {self.name!r}; its only output is {OUTPUT!r}")

    def empty_output(self) -> np.ndarray:
        """The output of an empty batch: ``[0, units_last]`` float32."""
        return np.zeros((0, self.model.layer_units[-1]), np.float32)


def _finite(x: np.ndarray) -> np.ndarray:
    """``x``, or INVALID_ARGUMENT naming the first element that is NaN, infinite or beyond FP32."""
    bad = ~np.isfinite(x)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise invalid(f"input {INPUT!r}: element [{row}, {col}] is {x[row, col]}; inputs must be finite FP32 "
                      f"numbers ({int(bad.sum())} are not)")
    return x
