"""Open Inference Protocol v2 for the network a partition server belongs to, and its gRPC binding.

Every partition server answers the protocol (KServe "Predict Protocol - Version 2",
which Triton Inference Server implements) for one model: the network, named by
its ``metadata.name``, with one version, ``"1"``. Any partition is an entry
point. The server that receives an inference request runs a forward pass on
*all* partitions, itself included: it calls ``RunPass(train=false)`` on each through
the addresses of the lookup table it currently serves, with a
:class:`~partition_server.client.driver.Driver` built once per table version, so
requests follow lookup reloads.

:class:`ModelInference` holds what both bindings share (metadata, readiness,
input checks, the coordinated pass); :class:`InferenceServicer` is
``inference.GRPCInferenceService`` on the partition server's gRPC port;
``rest.py`` is the HTTP/REST binding.

Model metadata: input ``input`` FP32 ``[-1, inputs]``, output ``output`` FP32
``[-1, units of the last layer]``. Inputs must be FP32, as the metadata says (the
spec requires the datatype to match); JSON numbers are converted to FP32.

Errors (gRPC status / HTTP status, body ``{"error": "..."}``):
INVALID_ARGUMENT / 400 for a request that does not fit the model (input name,
datatype, shape, element count, unknown output); NOT_FOUND / 404 for an unknown
model or version; UNAVAILABLE / 503 while this server has no model loaded, the
partitions do not agree on the lookup table, a partition cannot be reached, or
too many requests are in flight; DEADLINE_EXCEEDED / 504 when the pass outlives
the deadline.

Load: a pass holds a thread of every partition's gRPC pool for its ``RunPass``, so an entry
point runs at most ``step_limit // P`` passes at once (``step_limit``: the inference Steps a
partition runs at once, see ``server.step_slots``; at least 1, at most ``max_inflight``), and
further requests wait for a slot within their deadline. A partition refuses a Step beyond its
limit with RESOURCE_EXHAUSTED (possible when other clients also send passes); the entry point
retries such a pass a few times with a growing pause, then answers UNAVAILABLE / 503.

Weights: a pass may overlap a training step. The entry point sends the version of its own
parameters (its optimizer step count) with every ``RunPass``, and every partition computes with
that version, so no output mixes rows from before and after an update. When a partition
no longer keeps that version (ABORTED, "weights changed during the pass"), the entry point
runs the pass again with its current version, up to twice.

Spec: https://github.com/kserve/kserve/blob/master/docs/predict-api/v2/required_api.md
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any, Callable, Sequence

import grpc
import numpy as np

from partition_server.client.driver import Driver, DriverError
from partition_server.engine.passes import WEIGHTS_CHANGED
from partition_server.api.lookup import LookupTable
from partition_server.api.manifest import ModelSpec
from partition_server.api.protos import grpc_predict_v2_pb2 as ipb
from partition_server.api.protos import grpc_predict_v2_pb2_grpc as ipb_grpc

log = logging.getLogger("mpnn.inference")

SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "mpnn"
PLATFORM = "mpnn_numpy"
MODEL_VERSION = "1"
INPUT, OUTPUT, DATATYPE = "input", "output", "FP32"
# Triton's name for the binary tensor data extension of the REST API.
EXTENSIONS = ("binary_tensor_data",)
WIRE_FP32 = np.dtype("<f4")

HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404,
               grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504}
# What a partition's failed Step means to the client of the whole pass.
_DRIVER_CODES = {grpc.StatusCode.FAILED_PRECONDITION: grpc.StatusCode.UNAVAILABLE,  # lookup versions differ
                 grpc.StatusCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
                 grpc.StatusCode.ABORTED: grpc.StatusCode.UNAVAILABLE,               # an Exchange failed
                 grpc.StatusCode.CANCELLED: grpc.StatusCode.UNAVAILABLE,
                 grpc.StatusCode.RESOURCE_EXHAUSTED: grpc.StatusCode.UNAVAILABLE,     # a partition is busy
                 grpc.StatusCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
                 grpc.StatusCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT}


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
    return InferenceError(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass(frozen=True)
class TensorIn:
    """One input tensor of a request, as either binding received it.

    ``data`` is the raw little-endian bytes (gRPC ``raw_input_contents``, REST binary
    data) or the elements as an array of any numeric dtype (JSON ``data``, gRPC
    ``contents``), flat or nested.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes | np.ndarray


class ModelInference:
    """The protocol's model for one partition server: metadata, readiness and the coordinated pass.

    Args:
        name: the network's name, which is the model name.
        model: its shape.
        table: returns the lookup table this server serves now, or None before one is loaded.
        weights_version: returns the version of this server's parameters (its optimizer step
            count), sent with every Step of a pass; None sends none (each partition's latest).
        timeout: longest forward pass, seconds, when the request sets no shorter deadline.
        ready_timeout: deadline of each partition's ``Status`` call in :meth:`ready`, seconds.
        max_inflight: passes this entry point runs at once; more wait for a slot until their deadline.
            Each pass holds a thread of every partition's gRPC pool, so this keeps those pools
            from filling with passes that wait on each other.

    Attributes:
        step_limit: inference Steps each partition runs at once (set by the partition server from
            its pool size), or None; with P partitions, this entry point runs at most
            ``max(1, min(max_inflight, step_limit // P))`` passes at once, so that P entry points
            together stay within every partition's limit.
    """

    BUSY_RETRIES = 6       # passes refused by a busy partition are tried again this often
    BUSY_PAUSE = 0.05      # seconds before the first retry; doubles up to 1 s, with jitter
    VERSION_RETRIES = 2    # passes whose weights version a partition dropped are run again this often
    BATCH = 256            # rows per pass; larger inputs go through in chunks

    def __init__(self, name: str, model: ModelSpec, table: Callable[[], LookupTable | None],
                 weights_version: Callable[[], int | None] = lambda: None,
                 timeout: float = 60.0, ready_timeout: float = 1.0, max_inflight: int = 4):
        self.name = name
        self.model = model
        self._table = table
        self._weights_version = weights_version
        self.timeout = timeout
        self.ready_timeout = ready_timeout
        self.max_inflight = max_inflight
        self.step_limit: int | None = None
        self._slots = _Slots()
        self._drivers: dict[str, Driver] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ metadata

    def server_metadata(self) -> dict[str, Any]:
        """``$metadata_server_response``: name, version, extensions."""
        try:
            version = importlib_metadata.version("mpnn")
        except importlib_metadata.PackageNotFoundError:
            version = "unknown"
        return {"name": SERVER_NAME, "version": version, "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, version: str = "") -> dict[str, Any]:
        """``$metadata_model_response``. Raises InferenceError NOT_FOUND for another model or version."""
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

    # ------------------------------------------------------------ readiness

    def ready(self) -> bool:
        """True when every partition has its weights loaded and serves this server's lookup version.

        Asks every partition's ``Status`` (itself included), each with ``ready_timeout``.
        """
        table = self._table()
        if table is None:
            return False
        try:
            replies = self._driver(table).status(timeout=self.ready_timeout)
        except DriverError:
            return False
        return all(r.ready and r.lookup_version == table.version for r in replies)

    # ------------------------------------------------------------ inference

    def input_array(self, inputs: Sequence[TensorIn]) -> np.ndarray:
        """Check a request's inputs against the model and return ``x`` ``[batch, inputs]`` float32.

        Raises:
            InferenceError: INVALID_ARGUMENT naming the input and what was expected.
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
            return np.frombuffer(t.data, dtype=WIRE_FP32).astype(np.float32).reshape(shape)
        data = np.asarray(t.data)
        if data.dtype.kind not in "iuf":
            raise invalid(f"input {INPUT!r}: data must be numbers, got {data.dtype.name}")
        if data.size != count:
            raise invalid(f"input {INPUT!r}: {data.size} elements do not fit shape {list(shape)} ({count} elements)")
        return data.astype(np.float32).reshape(shape)

    def check_outputs(self, names: Sequence[str]) -> None:
        """Raise INVALID_ARGUMENT for a requested output the model does not have."""
        unknown = [n for n in names if n != OUTPUT]
        if unknown:
            raise invalid(f"unknown outputs {unknown} for model {self.name!r}; its only output is {OUTPUT!r}")

    def infer(self, x: np.ndarray, timeout: float | None = None) -> np.ndarray:
        """Forward pass of ``x`` ``[batch, inputs]`` float32 on all partitions.

        Args:
            timeout: the request's remaining time, seconds; capped at ``self.timeout``.

        Returns:
            ``[batch, units_last]`` float32.

        Raises:
            InferenceError: UNAVAILABLE, DEADLINE_EXCEEDED, INVALID_ARGUMENT or INTERNAL, with
                the failing partition's message.
        """
        timeout = min(timeout, self.timeout) if timeout else self.timeout
        deadline = time.monotonic() + timeout
        table = self._table()
        if table is None:
            raise InferenceError(grpc.StatusCode.UNAVAILABLE, f"model {self.name!r} is not loaded yet")
        if not self._slots.acquire(self.inflight_limit(table), timeout):
            raise InferenceError(grpc.StatusCode.UNAVAILABLE,
                                 f"model {self.name!r}: no free slot for a forward pass within {timeout:g} s")
        try:
            busy = changed = 0
            while True:
                try:
                    return self._pass(self._driver(table), x, deadline)
                except DriverError as exc:
                    if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and busy < self.BUSY_RETRIES:
                        pause = min(1.0, self.BUSY_PAUSE * 2 ** busy) * random.uniform(0.5, 1.5)
                        busy += 1
                    elif (exc.code == grpc.StatusCode.ABORTED and WEIGHTS_CHANGED in str(exc)
                          and changed < self.VERSION_RETRIES):
                        pause = changed * self.BUSY_PAUSE * random.uniform(0.5, 1.5)
                        changed += 1
                    else:
                        pause = None
                    if pause is None or time.monotonic() + pause >= deadline:
                        code = _DRIVER_CODES.get(exc.code, grpc.StatusCode.INTERNAL)
                        raise InferenceError(code, f"model {self.name!r}: forward pass failed: {exc}") from exc
                    time.sleep(pause)
        finally:
            self._slots.release()

    def _pass(self, driver: Driver, x: np.ndarray, deadline: float) -> np.ndarray:
        """One forward pass of ``x`` on every partition, in chunks of ``BATCH`` rows, all with the
        weights version this server has now. Raises DriverError."""
        version = self._weights_version()
        outputs = [driver.step(x[start:start + self.BATCH], timeout=max(0.001, deadline - time.monotonic()),
                               weights_version=version)[0]
                   for start in range(0, len(x), self.BATCH)]
        return np.concatenate(outputs) if outputs else np.zeros((0, self.model.layer_units[-1]), np.float32)

    def inflight_limit(self, table: LookupTable) -> int:
        """Passes this entry point runs at once under ``table`` (see :attr:`step_limit`)."""
        if self.step_limit is None:
            return self.max_inflight
        return max(1, min(self.max_inflight, self.step_limit // table.num_partitions))

    def _driver(self, table: LookupTable) -> Driver:
        """The driver for ``table``'s version; drivers of versions before the previous one are closed."""
        with self._lock:
            driver = self._drivers.get(table.version)
            if driver is None:
                # The previous table's driver stays open for passes that started under it.
                for version in list(self._drivers)[:-1]:
                    self._drivers.pop(version).close()
                driver = self._drivers[table.version] = Driver(table, timeout=self.timeout)
            return driver

    def close(self) -> None:
        with self._lock:
            for driver in self._drivers.values():
                driver.close()
            self._drivers.clear()


class _Slots:
    """A counting semaphore whose limit is given at each acquire (it follows the lookup table)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = 0

    def acquire(self, limit: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy >= limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            self._busy += 1
            return True

    def release(self) -> None:
        with self._cond:
            self._busy -= 1
            self._cond.notify()


class InferenceServicer(ipb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` (the protocol's gRPC API) for a :class:`ModelInference`.

    Inputs arrive in ``raw_input_contents`` (what tritonclient sends) or in ``contents.fp32_contents``;
    outputs are returned in ``raw_output_contents``. Errors are aborted with the codes listed in the
    module docstring.

    Args:
        max_calls: ModelInfer calls handled at once; one more is answered UNAVAILABLE at once.
            A call waiting for a pass slot holds a thread of the partition server's gRPC pool,
            which the passes themselves need for ``RunPass`` and ``Exchange``; so the waiting is
            bounded here, and REST requests (on threads of their own) wait instead.
    """

    def __init__(self, model: ModelInference, max_calls: int = 8):
        self.model = model
        self.max_calls = max_calls
        self._calls = threading.BoundedSemaphore(max_calls)

    def ServerLive(self, request, context):
        return ipb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return ipb.ServerReadyResponse(ready=self.model.ready())

    def ModelReady(self, request, context):
        self._call(context, self.model.check_model, request.name, request.version)
        return ipb.ModelReadyResponse(ready=self.model.ready())

    def ServerMetadata(self, request, context):
        return ipb.ServerMetadataResponse(**self.model.server_metadata())

    def ModelMetadata(self, request, context):
        meta = self._call(context, self.model.model_metadata, request.name, request.version)
        tensor = ipb.ModelMetadataResponse.TensorMetadata
        return ipb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                         inputs=[tensor(**t) for t in meta["inputs"]],
                                         outputs=[tensor(**t) for t in meta["outputs"]])

    def ModelInfer(self, request, context):
        if not self._calls.acquire(blocking=False):
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          f"model {self.model.name!r}: {self.max_calls} inference calls are in progress on this "
                          f"partition's gRPC port; retry, or send requests to other partitions or over REST")
        try:
            return self._call(context, self._infer, request, context.time_remaining())
        finally:
            self._calls.release()

    def _infer(self, request: ipb.ModelInferRequest, remaining: float | None) -> ipb.ModelInferResponse:
        self.model.check_model(request.model_name, request.model_version)
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise invalid(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
        tensors = []
        for i, t in enumerate(request.inputs):
            if raw and t.HasField("contents"):
                raise invalid(f"input {t.name!r}: contents must not be set when raw_input_contents is used")
            data = raw[i] if raw else np.asarray(t.contents.fp32_contents, dtype=np.float32)
            tensors.append(TensorIn(t.name, t.datatype, tuple(t.shape), data))
        x = self.model.input_array(tensors)
        self.model.check_outputs([o.name for o in request.outputs])
        y = self.model.infer(x, remaining)
        reply = ipb.ModelInferResponse(model_name=self.model.name, model_version=MODEL_VERSION, id=request.id)
        reply.outputs.add(name=OUTPUT, datatype=DATATYPE, shape=list(y.shape))
        reply.raw_output_contents.append(y.astype(WIRE_FP32).tobytes())
        return reply

    @staticmethod
    def _call(context: grpc.ServicerContext, fn: Callable, *args: Any) -> Any:
        try:
            return fn(*args)
        except InferenceError as exc:
            context.abort(exc.code, exc.message)
