"""``inference.GRPCInferenceService``: the Open Inference Protocol v2 over gRPC.

It runs on the partition server's gRPC port, beside ``mpnn.v1.Partition``, and serves a
:class:`~partition_server.serving.inference.ModelInference`. Inputs arrive in
``raw_input_contents`` (what tritonclient sends) or in ``contents.fp32_contents``; outputs are
returned in ``raw_output_contents`` (little-endian FP32). Errors abort the call with the
:class:`~partition_server.serving.protocol.InferenceError`'s code and message.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import grpc
import numpy as np

from partition_server.api.protos import grpc_predict_v2_pb2 as ipb
from partition_server.api.protos import grpc_predict_v2_pb2_grpc as ipb_grpc
from partition_server.serving.inference import ModelInference
from partition_server.serving.protocol import (DATATYPE, MODEL_VERSION, OUTPUT, WIRE_FP32, InferenceError, TensorIn,
                                               invalid)

__all__ = ["SERVICE", "InferenceServicer"]

SERVICE = "inference.GRPCInferenceService"


class InferenceServicer(ipb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` (the protocol's gRPC API) for a :class:`ModelInference`.

    Args:
        model: what to serve.
        max_calls: ModelInfer calls handled at once; one more is answered UNAVAILABLE at once.
            A call waiting for a pass slot holds a thread of the partition server's gRPC pool,
            which the passes themselves need for ``RunPass`` and ``Exchange``; so the waiting is
            bounded here, and REST requests (which wait on the REST server's own threads) wait instead.
        max_request_bytes: largest ``ModelInferRequest``, bytes (RESOURCE_EXHAUSTED beyond); None: no cap
            besides the port's message limit. A port that carries only this service should also
            set its ``grpc.max_receive_message_length`` to it, so larger messages are never decoded.
        metrics: a :class:`~partition_server.serving.metrics.ServerMetrics` that counts ``ModelInfer``
            calls (``protocol="grpc"``, ``status``: the gRPC code name), or None.
    """

    def __init__(self, model: ModelInference, max_calls: int = 8, *, max_request_bytes: int | None = None,
                 metrics: Any = None):
        self.model = model
        self.metrics = metrics  # a metrics.ServerMetrics, or None
        self.max_calls = max_calls
        self.max_request_bytes = max_request_bytes
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
        arrived, status = time.monotonic(), grpc.StatusCode.OK
        try:
            return self._model_infer(request, context)
        except BaseException:
            status = context.code() or grpc.StatusCode.UNKNOWN  # set by context.abort
            raise
        finally:
            if self.metrics is not None:
                code = status.name if isinstance(status, grpc.StatusCode) else str(status)
                self.metrics.inference(protocol="grpc", status=code, seconds=time.monotonic() - arrived)

    def _model_infer(self, request, context):
        if self.max_request_bytes is not None and request.ByteSize() > self.max_request_bytes:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"model {self.model.name!r}: the request takes {request.ByteSize()} bytes, more than "
                          f"{self.max_request_bytes}")
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
