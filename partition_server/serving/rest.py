"""Open Inference Protocol v2 over HTTP/REST, with the binary tensor data extension.

Routes (``{version}``: the optional ``/versions/{v}`` segment; the model's only version is ``1``,
any other is 404):

=======  =======================================  =============================================
GET      ``/v2/health/live``                      200, empty body (the process is up)
GET      ``/v2/health/ready``                     200 ready / 400 not ready, empty body
GET      ``/v2``                                  server metadata
GET      ``/v2/models/{name}{version}``           model metadata
GET      ``/v2/models/{name}{version}/ready``     200 ready / 400 not ready / 404 unknown model
POST     ``/v2/models/{name}{version}/infer``     inference
=======  =======================================  =============================================

Inference bodies are JSON (``$inference_request``), optionally followed by raw tensor bytes: the
binary tensor data extension that tritonclient.http uses by default. With it, the
``Inference-Header-Content-Length`` header gives the JSON part's size, an input carrying
``"parameters": {"binary_data_size": N}`` takes the next N bytes (little-endian, row-major) instead
of ``"data"``, and outputs are returned as bytes when the output's ``binary_data`` parameter is
true, or when it is absent and the request's ``binary_data_output`` parameter is true; the
response then has the same header and each binary output says its ``binary_data_size``. Request
bodies may be compressed (``Content-Encoding: gzip`` or ``deflate``); responses are not.

Errors are ``{"error": "..."}`` with 400, 404, 503 or 504 (see ``inference.py``); 405 for a
known path with the wrong method, 411 without ``Content-Length``, 413 for a body above 1 GiB
(:data:`MAX_BODY_BYTES`), before or after decompression: a small compressed body cannot
expand into more memory than an uncompressed one may take.

Built on the standard library's ``ThreadingHTTPServer`` (a thread per connection, HTTP/1.1
keep-alive): six routes and one JSON codec need no framework, and the partition server image
gains no dependency. Its handler threads are joined on :meth:`RestServer.stop`.

Specs: https://github.com/kserve/kserve/blob/master/docs/predict-api/v2/required_api.md (HTTP/REST),
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from partition_server.api.channels import MAX_MESSAGE_BYTES
from partition_server.serving.inference import DATATYPE, MODEL_VERSION, OUTPUT, WIRE_FP32, InferenceError, ModelInference, TensorIn, invalid

log = logging.getLogger("mpnn.rest")

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_BODY_BYTES = MAX_MESSAGE_BYTES  # a request body, as sent and after decompression
_MODEL_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?:/(?P<action>ready|infer))?")


class RestServer:
    """The REST binding of a :class:`~partition_server.serving.inference.ModelInference`, on its own port.

    Args:
        model: what to serve.
        host: bind address.
        port: TCP port; 0 lets the OS pick one (see :attr:`port`).

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(self, model: ModelInference, host: str, port: int):
        self._httpd = _Server((host, port), _Handler)
        self._httpd.model = model
        self.port: int = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, name=f"rest-{self.port}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, end idle keep-alive connections, and join every handler thread."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.close_connections()
        self._httpd.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # so server_close() joins the handler threads
    model: ModelInference

    def __init__(self, *args: Any):
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(*args)

    def process_request(self, request, client_address):
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake handlers blocked reading an idle connection; a request being answered still finishes."""
        with self._open_lock:
            for sock in self._open:
                try:
                    sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mpnn"
    timeout = 120  # seconds a keep-alive connection may idle, or a body take to arrive
    server: _Server

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        log.debug("%s " + format, self.address_string(), *args)

    # ------------------------------------------------------------ routing

    def _dispatch(self, method: str) -> None:
        try:
            try:
                body = self._read_body()
                if body is not None:
                    self._route(method, urlsplit(self.path).path, body)
            except InferenceError as exc:
                self._send_json(exc.http_status, {"error": exc.message})
            except _Answered:
                pass
            except (ConnectionError, TimeoutError):
                raise
            except Exception as exc:  # a bug: answer, log, keep serving
                log.exception("REST request failed", extra={"path": self.path})
                self._send_json(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})
        except (ConnectionError, TimeoutError):  # the client left
            self.close_connection = True

    def _route(self, method: str, path: str, body: bytes) -> None:
        model = self.server.model
        if path in ("/v2", "/v2/"):
            self._allow(method, "GET")
            self._send_json(200, model.server_metadata())
        elif path == "/v2/health/live":
            self._allow(method, "GET")
            self._send(200)
        elif path == "/v2/health/ready":
            self._allow(method, "GET")
            self._send(200 if model.ready() else 400)
        elif (m := _MODEL_PATH.fullmatch(path)) is not None:
            name, version, action = unquote(m["name"]), unquote(m["version"] or ""), m["action"]
            if action is None:
                self._allow(method, "GET")
                self._send_json(200, model.model_metadata(name, version))
            elif action == "ready":
                self._allow(method, "GET")
                model.check_model(name, version)
                self._send(200 if model.ready() else 400)
            else:
                self._allow(method, "POST")
                model.check_model(name, version)
                self._infer(body)
        else:
            self._send_json(404, {"error": f"no such endpoint: {method} {path}"})

    def _allow(self, method: str, allowed: str) -> None:
        if method != allowed:
            self._send_json(405, {"error": f"{method} is not allowed on {self.path}; use {allowed}"},
                            {"Allow": allowed})
            raise _Answered

    # ------------------------------------------------------------ inference

    def _infer(self, body: bytes) -> None:
        model = self.server.model
        request, binary = self._split(body)
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
                data = _json_array(inp["data"], name)
            else:
                raise invalid(f'input {name!r} has neither "data" nor a binary_data_size parameter')
            tensors.append(TensorIn(name, datatype, tuple(shape), data))
        if offset != len(binary):
            raise invalid(f"{len(binary)} bytes of binary data follow the JSON header, but the inputs take {offset}")
        x = model.input_array(tensors)
        binary_out = self._binary_outputs(request)
        y = model.infer(x)

        reply: dict[str, Any] = {"model_name": model.name, "model_version": MODEL_VERSION}
        if "id" in request:
            reply["id"] = request["id"]
        output: dict[str, Any] = {"name": OUTPUT, "datatype": DATATYPE, "shape": list(y.shape)}
        blob = b""
        if binary_out:
            blob = y.astype(WIRE_FP32).tobytes()
            output["parameters"] = {"binary_data_size": len(blob)}
        else:
            output["data"] = y.ravel().tolist()
        reply["outputs"] = [output]
        header = json.dumps(reply).encode()
        if binary_out:
            self._send(200, header + blob, "application/octet-stream", {HEADER_LENGTH: str(len(header))})
        else:
            self._send(200, header, "application/json")

    def _split(self, body: bytes) -> tuple[dict, bytes]:
        """``(JSON request, the binary data after it)``."""
        length = self.headers.get(HEADER_LENGTH)
        if length is None:
            n = len(body)
        else:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if not 0 <= n <= len(body):
                raise invalid(f"{HEADER_LENGTH} {length!r} is not a size within the {len(body)}-byte body")
        try:
            request = json.loads(body[:n])
        except (ValueError, UnicodeDecodeError) as exc:
            raise invalid(f"the request is not valid JSON: {exc}") from exc
        if not isinstance(request, dict):
            raise invalid("the request must be a JSON object ($inference_request)")
        return request, body[n:]

    def _binary_outputs(self, request: dict) -> bool:
        """Whether the (only) output goes back as binary data; checks the requested outputs."""
        default = bool(_parameters(request, "request").get("binary_data_output", False))
        outputs = request.get("outputs")
        if outputs is None:
            return default
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise invalid('"outputs" must be a list of output objects')
        self.server.model.check_outputs([o.get("name") for o in outputs])
        binary = default
        for o in outputs:
            params = _parameters(o, f"output {o.get('name')!r}")
            if "classification" in params:
                raise invalid("the classification extension is not supported")
            binary = bool(params.get("binary_data", default))
        return binary

    # ------------------------------------------------------------ bytes in, bytes out

    def _read_body(self) -> bytes | None:
        """The request body, decompressed; None when an error was answered already."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._send_json(411, {"error": "send the body with a Content-Length, not chunked"})
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        limit = MAX_BODY_BYTES
        if not 0 <= length <= limit:
            self.close_connection = True
            self._send_json(413 if length > 0 else 400,
                            {"error": f"Content-Length must be 0..{limit}, "
                                      f"got {self.headers.get('Content-Length')}"})
            return None
        body = self.rfile.read(length)
        if len(body) < length:
            raise ConnectionError("request body cut short")
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding == "identity" or not body:
            return body
        if encoding not in ("gzip", "deflate"):
            raise invalid(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
        try:
            return _decompress(body, encoding, limit)
        except _TooLarge:
            self._send_json(413, {"error": f"the {encoding} request body decompresses to more than "
                                           f"{limit} bytes"})
            return None
        except zlib.error as exc:
            raise invalid(f"the {encoding} request body cannot be decompressed: {exc}") from exc

    def _send(self, status: int, body: bytes = b"", content_type: str | None = None,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers)


class _Answered(Exception):
    """Raised after an error response was sent, to leave the route."""


class _TooLarge(Exception):
    """A compressed body expands beyond the limit."""


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """``body`` decompressed (gzip, possibly several members; or zlib "deflate"), never
    producing more than ``limit`` bytes.

    Raises:
        _TooLarge: the output would exceed ``limit``.
        zlib.error: not valid compressed data, or cut short.
    """
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    parts: list[bytes] = []
    size = 0
    data = body
    while True:
        inflater = zlib.decompressobj(wbits)
        chunk = inflater.decompress(data, limit - size + 1)
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        parts.append(chunk)
        if not inflater.eof:
            raise zlib.error("the compressed data is cut short")
        data = inflater.unused_data
        # gzip members may follow each other (as gzip.decompress reads them); zeros may pad the end.
        if encoding != "gzip" or not data.strip(b"\0"):
            return b"".join(parts)


def _parameters(obj: dict, what: str) -> dict:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise invalid(f'{what}: "parameters" must be an object')
    return params


def _json_array(data: Any, name: str) -> np.ndarray:
    try:
        return np.array(data)
    except (ValueError, TypeError) as exc:
        raise invalid(f"input {name!r}: data is not a rectangular array of numbers: {exc}") from exc


def _brief(obj: Any, limit: int = 120) -> str:
    text = json.dumps(obj)
    return text if len(text) <= limit else text[:limit] + "…"
