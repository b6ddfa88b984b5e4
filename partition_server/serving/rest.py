"""Open Inference Protocol v2 over HTTP/REST, with the binary tensor data extension, on ``aiohttp.web``.

Routes (``{version}``: the optional ``/versions/{v}`` segment; the model's only version is ``1``,
any other is 404):

=======  =======================================  =============================================
GET      ``/v2/health/live``                      200, empty body (the process is up)
GET      ``/v2/health/ready``                     200 ready / 400 not ready, empty body
GET      ``/v2``                                  server metadata
GET      ``/v2/models/{name}{version}``           model metadata
GET      ``/v2/models/{name}{version}/ready``     200 ready / 400 not ready / 404 unknown model
POST     ``/v2/models/{name}{version}/infer``     inference
GET      ``/metrics``                             Prometheus metrics (``metrics``), when given
=======  =======================================  =============================================

Bodies and replies are encoded by ``rest_codec`` (JSON, the binary tensor data extension,
gzip/deflate request bodies). Errors are ``{"error": "..."}`` (``application/json``) with 400,
404, 503 or 504 (see ``inference``); 405 with ``Allow`` for a known path with the wrong method,
404 for an unknown path, 411 for a chunked body (send ``Content-Length``), 413 for a body above
64 MiB (:data:`MAX_BODY_BYTES`, ``ServerLimits.max_request_bytes``) as sent or after decompression,
503 when the bytes of all requests in flight would exceed ``max_inflight_bytes`` (a global budget,
taken from ``Content-Length`` before the body is read and from each inflated slice before it is
kept), 408 for a body that does not arrive within :data:`IDLE_TIMEOUT`, 500 for a bug (the
answer names the exception, never a stack trace).

Threads: the server runs its own asyncio event loop in a thread of its own (``rest-<port>``).
What blocks (decompressing, parsing, the forward pass, which calls every partition over gRPC,
and readiness, which asks every partition's ``Status``) runs on a bounded pool of ``threads``
worker threads (``rest-<port>-worker``), never on the loop; two of them are kept for readiness
checks, so health probes are answered while inference requests wait for a pass slot. An
inference request's deadline (the model's ``timeout``) counts from its arrival, waiting included.
:meth:`RestServer.stop` stops accepting, lets requests being answered finish within a grace
period, closes idle keep-alive connections, and joins the loop and worker threads.

Specs: https://github.com/kserve/kserve/blob/master/docs/predict-api/v2/required_api.md (HTTP/REST),
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

import grpc
from aiohttp import web

from partition_server.serving.inference import ModelInference
from partition_server.serving.limits import ByteBudget, ServerLimits
from partition_server.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from partition_server.serving.metrics import ServerMetrics
from partition_server.serving.protocol import InferenceError
from partition_server.serving.rest_codec import HEADER_LENGTH, HttpError, decode_body, encode_reply, parse_request

__all__ = ["IDLE_TIMEOUT", "MAX_BODY_BYTES", "RestServer"]

log = logging.getLogger("mpnn.rest")

MAX_BODY_BYTES = ServerLimits().max_request_bytes  # a request body, as sent and after decompression
IDLE_TIMEOUT = 120.0                # seconds a keep-alive connection may idle, or a body take to arrive
_PROBE_THREADS = 2                  # worker threads inference requests leave to readiness checks

T = TypeVar("T")


class RestServer:
    """The REST binding of a :class:`~partition_server.serving.inference.ModelInference`, on its own port.

    The port is bound here; :meth:`start` serves it.

    Args:
        model: what to serve.
        host: bind address.
        port: TCP port; 0 lets the OS pick one (see :attr:`port`).
        threads: worker threads for the blocking work (at least 3: two stay free for readiness).
        max_body_bytes: largest request body, bytes, as sent and after decompression
            (default :data:`MAX_BODY_BYTES`).
        ssl_context: serve HTTPS with it; None: plain HTTP.
        max_inflight_bytes: request bytes all requests in flight may hold together, as sent plus
            inflated (default ``2 * max_body_bytes``, at least ``max_body_bytes``); a request
            that does not fit is answered 503 at once.
        metrics: served at ``GET /metrics``; counts inference requests (``protocol="rest"``,
            ``status``: the HTTP status). None: no ``/metrics`` route.

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(self, model: ModelInference, host: str, port: int, *, threads: int = 16,
                 max_body_bytes: int | None = None, max_inflight_bytes: int | None = None,
                 ssl_context: ssl.SSLContext | None = None, metrics: ServerMetrics | None = None):
        self.model = model
        self.ssl_context = ssl_context
        self.metrics = metrics
        self.threads = max(threads, _PROBE_THREADS + 1)
        self.max_body_bytes = MAX_BODY_BYTES if max_body_bytes is None else max_body_bytes
        self.budget = ByteBudget(max(self.max_body_bytes, 2 * self.max_body_bytes if max_inflight_bytes is None
                                     else max_inflight_bytes))
        self._sock = _bind(host, port)
        self.port: int = self._sock.getsockname()[1]
        self._executor: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._grace = 5.0
        self._inflight = 0
        self._idle: asyncio.Event | None = None
        self._gate: asyncio.Semaphore | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Serve in a background thread; returns once the server accepts connections.

        Raises:
            Exception: what setting up the server raised (the thread has ended then).
        """
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix=f"rest-{self.port}-worker")
        started = threading.Event()
        failed: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(started, failed), name=f"rest-{self.port}")
        self._thread.start()
        started.wait()
        if failed:
            self._thread.join()
            self._thread = None
            self._executor.shutdown(wait=True)
            raise failed[0]

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting; give requests being answered up to ``grace`` seconds to finish (then
        cancel them); close every connection; and join the loop and worker threads.

        A forward pass already running on a worker thread is not interrupted: the join waits for it
        (at most the model's ``timeout``).
        """
        if self._thread is not None:
            self._grace = grace
            loop, stopping = self._loop, self._stopping
            if loop is not None and stopping is not None:
                loop.call_soon_threadsafe(stopping.set)
            self._thread.join()
            self._thread = None
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._sock.close()

    def _run(self, started: threading.Event, failed: list[BaseException]) -> None:
        try:
            asyncio.run(self._serve(started))
        except BaseException as exc:  # noqa: BLE001 - handed to start(), or logged after it returned
            if started.is_set():
                log.exception("REST server failed", extra={"port": self.port})
            else:
                failed.append(exc)
        finally:
            started.set()

    async def _serve(self, started: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._gate = asyncio.Semaphore(self.threads - _PROBE_THREADS)
        runner = web.AppRunner(self._app(), handle_signals=False, access_log=None, auto_decompress=False,
                               keepalive_timeout=IDLE_TIMEOUT, shutdown_timeout=0.1)
        await runner.setup()
        try:
            site = web.SockSite(runner, self._sock, ssl_context=self.ssl_context)
            await site.start()
            started.set()
            await self._stopping.wait()
            await site.stop()  # no new connections
            try:
                await asyncio.wait_for(self._idle.wait(), self._grace)
            except asyncio.TimeoutError:
                log.warning("REST requests still running at stop are cancelled",
                            extra={"port": self.port, "requests": self._inflight})
        finally:
            await runner.cleanup()  # closes keep-alive connections, cancels what is left

    # ------------------------------------------------------------ routing

    def _app(self) -> web.Application:
        @web.middleware
        async def answer(request: web.Request, handler: Callable) -> web.StreamResponse:
            self._inflight += 1
            self._idle.clear()
            arrived = time.monotonic()
            try:
                response = await _errors_as_json(request, handler)
                if self.metrics is not None and request.method == "POST" and request.path.endswith("/infer"):
                    self.metrics.inference(protocol="rest", status=str(response.status),
                                           seconds=time.monotonic() - arrived)
                log.debug("%s %s %s", request.method, request.path_qs, response.status,
                          extra={"remote": request.remote})
                return response
            finally:
                self._inflight -= 1
                if not self._inflight:
                    self._idle.set()

        app = web.Application(middlewares=[answer], client_max_size=self.max_body_bytes)
        app.on_response_prepare.append(_server_header)
        route = app.router
        for path in ("/v2", "/v2/"):
            route.add_get(path, self._server_metadata, allow_head=False)
        route.add_get("/v2/health/live", self._live, allow_head=False)
        route.add_get("/v2/health/ready", self._ready, allow_head=False)
        for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            route.add_get(model, self._model_metadata, allow_head=False)
            route.add_get(model + "/ready", self._model_ready, allow_head=False)
            route.add_post(model + "/infer", self._infer)
        if self.metrics is not None:
            route.add_get("/metrics", self._metrics, allow_head=False)
        return app

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await self._blocking(self.metrics.exposition)
        return web.Response(status=200, body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def _server_metadata(self, request: web.Request) -> web.Response:
        return _json(200, self.model.server_metadata())

    async def _live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if await self._blocking(self.model.ready) else 400)

    async def _model_metadata(self, request: web.Request) -> web.Response:
        name, version = _model_of(request)
        return _json(200, self.model.model_metadata(name, version))

    async def _model_ready(self, request: web.Request) -> web.Response:
        name, version = _model_of(request)
        self.model.check_model(name, version)
        return web.Response(status=200 if await self._blocking(self.model.ready) else 400)

    # ------------------------------------------------------------ inference

    async def _infer(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        held = _Held(self.budget)
        try:
            body = await self._body(request, held)
            name, version = _model_of(request)
            encoding = request.headers.get("Content-Encoding", "identity")
            header_length = request.headers.get(HEADER_LENGTH)
            remaining = self.model.timeout - (time.monotonic() - arrived)
            try:
                async with asyncio.timeout(max(remaining, 0.0)):
                    await self._gate.acquire()
            except TimeoutError:
                raise InferenceError(grpc.StatusCode.UNAVAILABLE, f"model {self.model.name!r}: no free slot for a "
                                     f"forward pass within {self.model.timeout:g} s") from None
            try:
                blob, content_type, headers = await self._blocking(
                    self._answer_infer, body, name=name, version=version, encoding=encoding,
                    header_length=header_length, arrived=arrived, held=held)
            finally:
                self._gate.release()
        finally:
            held.release()
        return web.Response(status=200, body=blob, content_type=content_type, headers=headers)

    def _answer_infer(self, body: bytes, *, name: str, version: str, encoding: str, header_length: str | None,
                      arrived: float, held: "_Held") -> tuple[bytes, str, dict[str, str]]:
        """The blocking part of an inference request, on a worker thread: decode, check, run, encode."""
        body = decode_body(body, encoding=encoding, limit=self.max_body_bytes, reserve=held.take)
        self.model.check_model(name, version)
        request = parse_request(self.model, body, header_length=header_length)
        del body
        remaining = self.model.timeout - (time.monotonic() - arrived)
        y = self.model.infer(request.x, max(remaining, 0.001))
        return encode_reply(self.model.name, request, y)

    async def _body(self, request: web.Request, held: "_Held") -> bytes:
        """The request body as sent (not decompressed), within the limits; its ``Content-Length``
        is taken from the byte budget before it is read."""
        if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            raise HttpError(411, "send the body with a Content-Length, not chunked", close=True)
        length = request.content_length or 0
        if length > self.max_body_bytes:
            raise HttpError(413, f"Content-Length must be 0..{self.max_body_bytes}, "
                                 f"got {request.headers.get('Content-Length')}", close=True)
        held.take(length, close=True)
        try:
            async with asyncio.timeout(IDLE_TIMEOUT):
                return await request.read()
        except TimeoutError:
            raise HttpError(408, f"the request body did not arrive within {IDLE_TIMEOUT:g} s", close=True) from None

    async def _blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(*args, **kwargs))


class _Held:
    """The bytes one request holds of the server's :class:`ByteBudget`; :meth:`release` gives them all back."""

    def __init__(self, budget: ByteBudget):
        self.budget = budget
        self.nbytes = 0

    def take(self, nbytes: int, *, close: bool = False) -> None:
        """Take ``nbytes`` more, or raise HttpError 503 (closing the connection when ``close``:
        the body is then unread)."""
        if not self.budget.take(nbytes):
            raise HttpError(503, f"the server holds {self.budget.held} bytes of requests in flight and takes at "
                                 f"most {self.budget.capacity}; this request needs {nbytes} more; retry",
                            close=close)
        self.nbytes += nbytes

    def release(self) -> None:
        self.budget.give(self.nbytes)
        self.nbytes = 0


async def _errors_as_json(request: web.Request, handler: Callable) -> web.StreamResponse:
    """``handler(request)``, with every error answered as ``{"error": ...}``."""
    try:
        return await handler(request)
    except InferenceError as exc:
        return _json(exc.http_status, {"error": exc.message})
    except HttpError as exc:
        response = _json(exc.status, {"error": exc.message})
        if exc.close:
            response.force_close()
        return response
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return _json(405, {"error": f"{request.method} is not allowed on {request.path_qs}; use {allowed}"},
                     {"Allow": allowed})
    except web.HTTPNotFound:
        return _json(404, {"error": f"no such endpoint: {request.method} {request.path}"})
    except web.HTTPRequestEntityTooLarge:
        response = _json(413, {"error": f"the request body exceeds {request.client_max_size} bytes"})
        response.force_close()
        return response
    except web.HTTPException as exc:  # raised by aiohttp for a request it cannot take
        return _json(exc.status, {"error": exc.reason}, {k: v for k, v in exc.headers.items()
                                                          if k.lower() not in ("content-type", "content-length")})
    except (asyncio.CancelledError, ConnectionError):  # the client left, or the server stops
        raise
    except Exception as exc:  # a bug: answer, log, keep serving
        log.exception("REST request failed", extra={"path": request.path})
        return _json(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})


def _json(status: int, obj: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(obj).encode(), content_type="application/json",
                        headers=headers)


def _model_of(request: web.Request) -> tuple[str, str]:
    """``(model name, version or "")`` of a ``/v2/models/...`` route."""
    return request.match_info["name"], request.match_info.get("version", "")


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "mpnn"


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6, as ``host`` resolves). Raises OSError."""
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    return socket.create_server((host, port), family=family, backlog=128)
