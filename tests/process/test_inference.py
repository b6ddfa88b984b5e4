"""Open Inference Protocol v2 on the partition servers, through unmodified standard clients.

Two setups:

``served`` (module scope)
    ``mpnn run MANIFEST --serve`` as a subprocess: 3 partitions of a small network whose
    weights are imported from a safetensors file written here (random, not the seeded
    initialisation), so the expected outputs are a numpy forward pass of those weights.
    Before it, ``mpnn run --predict`` wrote the outputs for the same input and workdir. The
    endpoints are read from what ``--serve`` prints. Queried with ``tritonclient.http``,
    ``tritonclient.grpc``, ``urllib`` and ``curl``.
``in-process servers``
    ``PartitionServer`` objects on 127.0.0.1, for what a subprocess cannot show: a partition
    that is down (not ready, UNAVAILABLE / 503) and a lookup table reloaded under the server.

Outputs must equal the expected ones to 1e-5; errors must carry the protocol's status.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from partition_server.api.distributor import Distribution, distribute
from partition_server.api.peer_auth import PeerCredentials, generate_key
from partition_server.client.ports import free_ports
from partition_server.storage.atomic import write_atomically
from partition_server.api.lookup import LookupTable, loopback_addresses
from partition_server.api.manifest import DynamicBatching, LayerSpec, ModelSpec
from partition_server.engine import init_params
from partition_server.testing import ReferenceNetwork
from partition_server.serving.retry import RetryPolicy
from partition_server.serving.server import PartitionServer
from tests.support.serve_run import served_by_mpnn_run, write_imported_network

NAME = "tiny-infer"
INPUTS = 12
LAYERS = [(16, "relu"), (9, "tanh"), (6, "softmax")]
PARTITIONS = 3
TOL = dict(rtol=1e-5, atol=1e-5)
RUN_TIMEOUT = 180


def forward(params: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    """The network in plain numpy, float64: ``W`` ``[units, inputs]`` (PyTorch layout)."""
    a = x.astype(np.float64)
    for (w, b), (_, activation) in zip(params, LAYERS):
        z = a @ w.T.astype(np.float64) + b
        if activation == "relu":
            a = np.maximum(z, 0)
        elif activation == "tanh":
            a = np.tanh(z)
        else:
            e = np.exp(z - z.max(axis=1, keepdims=True))
            a = e / e.sum(axis=1, keepdims=True)
    return a


def _start_and_join(threads: list[threading.Thread], timeout: float) -> None:
    """Start every thread, then wait up to ``timeout`` seconds for each in turn."""
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)


def read_endpoints(proc: subprocess.Popen, lines: queue.Queue, timeout: float) -> dict:
    """Parse what ``--serve`` prints, up to ``Ctrl-C stops them.``."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while not seen or not seen[-1].startswith("Ctrl-C"):
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"mpnn run --serve printed no endpoints within {timeout:g}s (exit "
                                 f"{proc.poll()}); stdout so far: {seen}") from None
        if line is None:
            raise AssertionError(f"mpnn run --serve ended (exit {proc.wait()}); stdout: {seen}")
        seen.append(line.rstrip("\n"))
    rest = [ln.split("  ", 1)[1] for ln in seen if ln.startswith("REST  ")]
    grpc = [ln.split("  ", 1)[1] for ln in seen if ln.startswith("gRPC  ")]
    parts = [ln.split() for ln in seen if ln.startswith("  ")]
    assert len(rest) == len(grpc) == 1, seen
    return {"rest": rest[0], "grpc": grpc[0], "lines": seen,
            "partitions": [(p[2].removeprefix("http://"), p[4]) for p in parts]}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``mpnn run --serve`` with imported weights; yields its endpoints and the expected outputs."""
    root = tmp_path_factory.mktemp("inference")
    rng = np.random.default_rng(42)
    params = write_imported_network(root, rng, NAME, INPUTS, LAYERS, PARTITIONS)
    x = rng.uniform(0, 1, (5, INPUTS)).astype(np.float32)
    np.save(root / "x.npy", x)
    workdir = root / "work"
    cli = [sys.executable, "-m", "partition_server.cli", "run", str(root / "net.yaml"), "--workdir", str(workdir)]

    done = subprocess.run([*cli, "--predict", str(root / "x.npy"), "--output", str(root / "y.npy")],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    predicted = np.load(root / "y.npy")

    with served_by_mpnn_run([*cli, "--serve"], read_endpoints, RUN_TIMEOUT, "mpnn run --serve") as endpoints:
        yield {**endpoints, "x": x, "predicted": predicted, "expected": forward(params, x), "workdir": workdir}


@pytest.fixture
def http(served):
    client = httpclient.InferenceServerClient(served["rest"].removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture
def grpc_client(served):
    client = grpcclient.InferenceServerClient(served["grpc"])
    yield client
    client.close()


def http_input(x: np.ndarray, binary: bool = True, datatype: str = "FP32", name: str = "input"):
    inp = httpclient.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def grpc_input(x: np.ndarray, datatype: str = "FP32", name: str = "input"):
    inp = grpcclient.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


# ---------------------------------------------------------------- served: outputs


def test_predict_file_matches_the_weights(served):
    """Guard: the file ``mpnn run --predict`` wrote is the imported network, not the seeded init."""
    np.testing.assert_allclose(served["predicted"], served["expected"], **TOL)


def test_serve_prints_partition_0_first_and_every_partition(served):
    assert served["rest"].startswith("http://127.0.0.1:")
    assert len(served["partitions"]) == PARTITIONS
    assert (served["rest"].removeprefix("http://"), served["grpc"]) == served["partitions"][0]


def test_http_binary_equals_predict_on_every_partition(served):
    """tritonclient.http's defaults: binary input, binary output; any partition is an entry point."""
    for rest, _ in served["partitions"]:
        client = httpclient.InferenceServerClient(rest)
        try:
            result = client.infer(NAME, [http_input(served["x"])], request_id="abc")
        finally:
            client.close()
        out = result.as_numpy("output")
        assert out.dtype == np.float32 and out.shape == served["x"].shape[:1] + (LAYERS[-1][0],)
        np.testing.assert_allclose(out, served["predicted"], **TOL)
        assert result.get_response()["id"] == "abc"
        assert result.get_output("output")["parameters"]["binary_data_size"] == out.nbytes


def test_http_json_and_compressed_equal_predict(served, http):
    json_out = httpclient.InferRequestedOutput("output", binary_data=False)
    result = http.infer(NAME, [http_input(served["x"], binary=False)], outputs=[json_out], model_version="1")
    assert "data" in result.get_output("output")
    np.testing.assert_allclose(result.as_numpy("output"), served["predicted"], **TOL)
    result = http.infer(NAME, [http_input(served["x"])], request_compression_algorithm="gzip")
    np.testing.assert_allclose(result.as_numpy("output"), served["predicted"], **TOL)


def test_grpc_equals_predict_on_every_partition(served):
    for _, address in served["partitions"]:
        client = grpcclient.InferenceServerClient(address)
        try:
            result = client.infer(NAME, [grpc_input(served["x"])], request_id="7",
                                  outputs=[grpcclient.InferRequestedOutput("output")])
        finally:
            client.close()
        np.testing.assert_allclose(result.as_numpy("output"), served["predicted"], **TOL)
        response = result.get_response()
        assert (response.model_name, response.model_version, response.id) == (NAME, "1", "7")


def test_one_row_and_an_empty_batch(served, http, grpc_client):
    x = served["x"]
    np.testing.assert_allclose(http.infer(NAME, [http_input(x[2:3])]).as_numpy("output"),
                               served["predicted"][2:3], **TOL)
    empty = grpc_client.infer(NAME, [grpc_input(x[:0])]).as_numpy("output")
    assert empty.shape == (0, LAYERS[-1][0])


# ---------------------------------------------------------------- served: errors


def status_and_message(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status(), info.value.message()


def test_http_errors(served, http):
    x = served["x"]
    cases = {
        "shape": (lambda: http.infer(NAME, [http_input(np.zeros((2, INPUTS + 1), np.float32))]), "400",
                  f"shape [2, {INPUTS + 1}]"),
        "rank": (lambda: http.infer(NAME, [http_input(x[0])]), "400", "expects [-1, 12]"),
        "datatype": (lambda: http.infer(NAME, [http_input(x.astype(np.float64), datatype="FP64")]), "400",
                     "datatype 'FP64'"),
        "input name": (lambda: http.infer(NAME, [http_input(x, name="pixels")]), "400", "'pixels'"),
        "output name": (lambda: http.infer(NAME, [http_input(x)], outputs=[httpclient.InferRequestedOutput("y")]),
                        "400", "unknown outputs ['y']"),
        "model": (lambda: http.infer("nope", [http_input(x)]), "404", "unknown model 'nope'"),
        "version": (lambda: http.infer(NAME, [http_input(x)], model_version="2"), "404", "no version '2'"),
    }
    for what, (call, status, text) in cases.items():
        got_status, message = status_and_message(call)
        assert (got_status, text in message) == (status, True), f"{what}: {got_status} {message!r}"


def test_grpc_errors(served, grpc_client):
    x = served["x"]
    cases = {
        "shape": (lambda: grpc_client.infer(NAME, [grpc_input(np.zeros((2, 3), np.float32))]),
                  "StatusCode.INVALID_ARGUMENT", "shape [2, 3]"),
        "datatype": (lambda: grpc_client.infer(NAME, [grpc_input(x.astype(np.int32), datatype="INT32")]),
                     "StatusCode.INVALID_ARGUMENT", "datatype 'INT32'"),
        "model": (lambda: grpc_client.infer("nope", [grpc_input(x)]), "StatusCode.NOT_FOUND", "unknown model"),
        "metadata": (lambda: grpc_client.get_model_metadata("nope"), "StatusCode.NOT_FOUND", "unknown model"),
        "ready": (lambda: grpc_client.is_model_ready(NAME, "3"), "StatusCode.NOT_FOUND", "no version '3'"),
    }
    for what, (call, status, text) in cases.items():
        got_status, message = status_and_message(call)
        assert (got_status, text in message) == (status, True), f"{what}: {got_status} {message!r}"


# ---------------------------------------------------------------- served: health and metadata


MODEL_METADATA = {"name": NAME, "versions": ["1"], "platform": "mpnn_numpy",
                  "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, INPUTS]}],
                  "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, LAYERS[-1][0]]}]}


def test_http_health_and_metadata(http):
    assert http.is_server_live() and http.is_server_ready()
    assert http.is_model_ready(NAME) and http.is_model_ready(NAME, "1")
    assert not http.is_model_ready("nope")
    meta = http.get_server_metadata()
    assert meta["name"] == "mpnn" and "binary_tensor_data" in meta["extensions"] and meta["version"]
    assert http.get_model_metadata(NAME) == MODEL_METADATA
    assert http.get_model_metadata(NAME, "1") == MODEL_METADATA


def test_grpc_health_and_metadata(grpc_client):
    assert grpc_client.is_server_live() and grpc_client.is_server_ready() and grpc_client.is_model_ready(NAME)
    meta = grpc_client.get_server_metadata(as_json=True)
    assert meta["name"] == "mpnn" and meta["extensions"] == ["binary_tensor_data"]
    got = grpc_client.get_model_metadata(NAME, as_json=True)
    for t in got["inputs"] + got["outputs"]:
        t["shape"] = [int(d) for d in t["shape"]]  # MessageToJson writes int64 as strings
    assert got == MODEL_METADATA


# ---------------------------------------------------------------- served: raw REST


def request(url: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None):
    """``(status, headers, body)``, for error statuses too."""
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, err.read()


def test_rest_json_with_urllib(served):
    base, x = served["rest"], served["x"]
    body = json.dumps({"id": "q1", "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                               "data": x.tolist()}]}).encode()
    status, headers, raw = request(f"{base}/v2/models/{NAME}/versions/1/infer", body,
                                   {"Content-Type": "application/json"})
    assert status == 200 and headers["Content-Type"] == "application/json", raw
    assert "Inference-Header-Content-Length" not in headers
    reply = json.loads(raw)
    assert (reply["model_name"], reply["model_version"], reply["id"]) == (NAME, "1", "q1")
    [out] = reply["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("output", "FP32", [len(x), LAYERS[-1][0]])
    np.testing.assert_allclose(np.array(out["data"]).reshape(out["shape"]), served["predicted"], **TOL)

    # JSON in, binary out for the whole request (binary_data_output), decoded by hand.
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}], "parameters": {"binary_data_output": True}})
    status, headers, raw = request(f"{base}/v2/models/{NAME}/infer", body.encode())
    n = int(headers["Inference-Header-Content-Length"])
    [out] = json.loads(raw[:n])["outputs"]
    assert status == 200 and out["parameters"]["binary_data_size"] == len(raw) - n
    np.testing.assert_allclose(np.frombuffer(raw[n:], "<f4").reshape(out["shape"]), served["predicted"], **TOL)


def test_rest_errors_and_health_with_urllib(served):
    base = served["rest"]
    good = {"name": "input", "shape": [1, INPUTS], "datatype": "FP32", "data": [0.5] * INPUTS}
    cases = [  # (method, path, body, status, text in "error")
        ("POST", "/v2/models/nope/infer", {"inputs": [good]}, 404, "unknown model"),
        ("POST", f"/v2/models/{NAME}/infer", b"{not json", 400, "not valid JSON"),
        ("POST", f"/v2/models/{NAME}/infer", {"inputs": [{**good, "data": [[1, 2], [3]]}]}, 400, "rectangular"),
        ("POST", f"/v2/models/{NAME}/infer", {"inputs": [{**good, "data": ["a"] * INPUTS}]}, 400, "numbers"),
        ("POST", f"/v2/models/{NAME}/infer", {"inputs": [{**good, "data": [0.5] * 3}]}, 400, "3 elements"),
        ("POST", f"/v2/models/{NAME}/infer", {"inputs": [good, good]}, 400, "exactly one input"),
        ("POST", f"/v2/models/{NAME}/infer", {"inputs": []}, 400, "exactly one input 'input'"),
        ("GET", f"/v2/models/{NAME}/infer", None, 405, "use POST"),
        ("GET", "/v2/nothing", None, 404, "no such endpoint"),
    ]
    for method, path, body, status, text in cases:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        got, headers, raw = request(base + path, data, method=method)
        assert got == status and text in json.loads(raw)["error"], (method, path, got, raw)
        assert headers["Content-Type"] == "application/json"
    for path, status in [("/v2/health/live", 200), ("/v2/health/ready", 200), (f"/v2/models/{NAME}/ready", 200),
                         (f"/v2/models/{NAME}/versions/1/ready", 200)]:
        got, _, raw = request(base + path)
        assert (got, raw) == (status, b""), path
    got, _, raw = request(f"{base}/v2")
    assert got == 200 and json.loads(raw)["name"] == "mpnn"
    # The binary extension's header must fit the body.
    got, _, raw = request(f"{base}/v2/models/{NAME}/infer", b"{}", {"Inference-Header-Content-Length": "9"})
    assert got == 400 and "Inference-Header-Content-Length" in json.loads(raw)["error"]
    got, _, raw = request(f"{base}/v2/models/{NAME}/infer", gzip.compress(json.dumps({"inputs": [good]}).encode()),
                          {"Content-Encoding": "gzip"})
    assert got == 200, raw


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_json(served):
    """JSON over curl, as docs/inference.md shows it."""
    x = served["x"][:1]
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, INPUTS], "datatype": "FP32", "data": x.tolist()}]})
    out = subprocess.run(["curl", "-sS", "--fail-with-body", "-X", "POST", "-H", "Content-Type: application/json",
                          "-d", body, f"{served['rest']}/v2/models/{NAME}/infer"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr + out.stdout
    [output] = json.loads(out.stdout)["outputs"]
    np.testing.assert_allclose(np.array(output["data"]).reshape(output["shape"]), served["predicted"][:1], **TOL)


# ---------------------------------------------------------------- in-process servers

MODEL = ModelSpec(INPUTS, tuple(LayerSpec(u, a) for u, a in LAYERS), seed=5)


class Servers:
    """``PartitionServer`` objects for one lookup table on 127.0.0.1, with REST on OS-picked ports."""

    def __init__(self, root: Path, partitions: int, start: list[int], workers: int = 32,
                 batching: DynamicBatching | None = None):
        self.root, self.lookup = root, root / "lookup.json"
        self.addresses = loopback_addresses(free_ports(partitions))
        self.servers: dict[int, PartitionServer] = {}
        self.credentials = PeerCredentials(NAME, generate_key())
        (root / NAME).mkdir()
        self.write_table(Distribution())
        try:
            for i in start:
                self.servers[i] = PartitionServer(i, NAME, MODEL, self.lookup, root / NAME, poll_seconds=3600,
                                                  credentials=self.credentials, batching=batching)
                self.servers[i].start("127.0.0.1", 0, peer_port=self.port(i), workers=workers, http_port=0)
        except BaseException:
            self.stop()
            raise

    def write_table(self, distribution: Distribution) -> LookupTable:
        assignment = distribute(MODEL.layer_units, len(self.addresses), distribution)
        table = LookupTable.build(NAME, MODEL.layer_units, assignment, self.addresses)
        write_atomically(self.lookup, table.to_json())
        return table

    def port(self, i: int) -> int:
        return int(self.addresses[i].rsplit(":", 1)[1])

    def rest(self, i: int) -> str:
        return f"http://127.0.0.1:{self.servers[i].http_port}"

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop(grace=0.5)


def rest_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("rest-")]


@contextlib.contextmanager
def serving(root: Path, partitions: int, start: list[int]) -> Iterator[Servers]:
    """Servers for the with-block; afterwards every one is stopped and no REST thread is left."""
    servers = Servers(root, partitions=partitions, start=start)
    try:
        yield servers
    finally:
        servers.stop()
    time.sleep(0.2)
    assert not rest_threads()


def infer_json(base: str, x: np.ndarray) -> tuple[int, dict]:
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    status, _, raw = request(f"{base}/v2/models/{NAME}/infer", body)
    return status, json.loads(raw)


@pytest.fixture
def expected_init():
    x = np.random.default_rng(3).uniform(0, 1, (4, INPUTS)).astype(np.float32)
    net = ReferenceNetwork(MODEL.inputs, MODEL.layers, init_params(MODEL.inputs, MODEL.layers, MODEL.seed))
    return x, net.forward(x)


def test_not_ready_and_unavailable_while_a_partition_is_down(tmp_path, expected_init):
    x, _ = expected_init
    with serving(tmp_path, partitions=2, start=[0]) as servers:
        base = servers.rest(0)
        assert request(f"{base}/v2/health/live")[0] == 200
        assert request(f"{base}/v2/health/ready")[0] == 400
        assert request(f"{base}/v2/models/{NAME}/ready")[0] == 400
        status, reply = infer_json(base, x)
        assert status == 503 and "partition 1" in reply["error"], reply
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{servers.servers[0].port}")
        try:
            assert client.is_server_live() and not client.is_server_ready() and not client.is_model_ready(NAME)
            status, message = status_and_message(lambda: client.infer(NAME, [grpc_input(x)]))
            assert status == "StatusCode.UNAVAILABLE" and "partition 1" in message
        finally:
            client.close()


def test_follows_a_lookup_reload(tmp_path, expected_init):
    """A new table: not ready while the partitions disagree, then correct outputs under the new one."""
    x, expected = expected_init
    with serving(tmp_path, partitions=2, start=[0, 1]) as servers:
        base = servers.rest(1)
        status, reply = infer_json(base, x)
        assert status == 200, reply
        np.testing.assert_allclose(np.array(reply["outputs"][0]["data"]).reshape(x.shape[0], -1), expected, **TOL)

        table = servers.write_table(Distribution("layers", layers=((0, 2), (1,))))
        servers.servers[1].load()
        assert request(f"{base}/v2/health/ready")[0] == 400
        status, reply = infer_json(base, x)
        assert status == 503 and "lookup version" in reply["error"], reply

        servers.servers[0].load()
        assert request(f"{base}/v2/health/ready")[0] == 200
        status, reply = infer_json(base, x)
        assert status == 200, reply
        np.testing.assert_allclose(np.array(reply["outputs"][0]["data"]).reshape(x.shape[0], -1), expected, **TOL)
        assert servers.servers[1]._loaded.table.version == table.version


def test_grpc_calls_beyond_the_cap_are_unavailable_at_once(tmp_path, expected_init):
    """A waiting ModelInfer would hold a thread the passes need: beyond workers // 4 calls, UNAVAILABLE."""
    x, _ = expected_init
    servers = Servers(tmp_path, partitions=2, start=[0], workers=4)  # one ModelInfer call at a time
    # Partition 1 accepts connections and never answers: a pass hangs until its deadline.
    hole = socket.create_server(("127.0.0.1", servers.port(1)))
    outcomes: list[tuple[str, str, float]] = []

    def call():
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{servers.servers[0].port}")
        began = time.monotonic()
        try:
            client.infer(NAME, [grpc_input(x)], client_timeout=3)
            outcomes.append(("ok", "", time.monotonic() - began))
        except InferenceServerException as exc:
            outcomes.append((exc.status(), exc.message(), time.monotonic() - began))
        finally:
            client.close()

    try:
        _start_and_join([threading.Thread(target=call) for _ in range(2)], 30)
    finally:
        hole.close()
        servers.stop()
    refused = [o for o in outcomes if "inference calls are in progress" in o[1]]
    assert len(outcomes) == 2 and len(refused) == 1, outcomes
    assert refused[0][0] == "StatusCode.UNAVAILABLE" and refused[0][2] < 2, outcomes


def test_serve_rejects_a_bad_http_port(tmp_path):
    out = subprocess.run([sys.executable, "-m", "partition_server.cli", "serve", "--http-port", "70000"],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert out.returncode == 2 and "argument --http-port: port must be 0-65535, got 70000" in out.stderr, out.stderr


def test_many_entry_points_and_clients_do_not_starve_the_exchanges(tmp_path, expected_init):
    """Every pass holds a RunPass on every partition; with 8 entry points and 32 clients the Exchange
    calls the passes wait for must still find a thread of each partition's pool (32 workers)."""
    x, expected = expected_init
    partitions, clients, per_client = 8, 32, 2
    servers = Servers(tmp_path, partitions=partitions, start=list(range(partitions)))
    for server in servers.servers.values():
        server.inference.timeout = 10.0  # a starved pass fails after this, not after 60 s
    outcomes: list[tuple[int, dict]] = []

    def client(i: int) -> None:
        for _ in range(per_client):
            outcomes.append(infer_json(servers.rest(i % partitions), x))

    try:
        _start_and_join([threading.Thread(target=client, args=(i,)) for i in range(clients)], 120)
    finally:
        servers.stop()
    assert len(outcomes) == clients * per_client
    failed = [(status, reply.get("error")) for status, reply in outcomes if status != 200]
    assert not failed, f"{len(failed)} of {len(outcomes)} failed, e.g. {failed[:3]}"
    for _, reply in outcomes:
        got = np.array(reply["outputs"][0]["data"]).reshape(x.shape[0], -1)
        np.testing.assert_allclose(got, expected, **TOL)


def test_dynamic_batching_shares_passes_and_answers_each_request_with_its_rows(tmp_path):
    """Single-row requests sent together over REST and gRPC to one entry point run in fewer passes
    than requests, and each answer is the reference forward pass of its own row."""
    x = np.random.default_rng(5).uniform(0, 1, (8, INPUTS)).astype(np.float32)
    net = ReferenceNetwork(MODEL.inputs, MODEL.layers, init_params(MODEL.inputs, MODEL.layers, MODEL.seed))
    expected = net.forward(x)
    servers = Servers(tmp_path, partitions=2, start=[0, 1],
                      batching=DynamicBatching(max_delay_us=300_000, max_batch_size=64))
    entry = servers.servers[0]
    results: dict[int, np.ndarray | str] = {}
    start = threading.Barrier(len(x))

    def rest(i: int) -> None:
        start.wait()
        status, reply = infer_json(servers.rest(0), x[i:i + 1])
        results[i] = np.array(reply["outputs"][0]["data"]).reshape(1, -1) if status == 200 else str(reply)

    def grpc_call(i: int) -> None:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{entry.port}")
        try:
            start.wait()
            results[i] = client.infer(NAME, [grpc_input(x[i:i + 1])]).as_numpy("output")
        except InferenceServerException as exc:
            results[i] = str(exc)
        finally:
            client.close()

    try:
        _start_and_join([threading.Thread(target=rest if i % 2 else grpc_call, args=(i,)) for i in range(len(x))], 60)
    finally:
        servers.stop()
    assert sorted(results) == list(range(len(x))), results
    for i in range(len(x)):
        assert not isinstance(results[i], str), results[i]
        np.testing.assert_allclose(results[i], expected[i:i + 1], **TOL)
    batcher = entry.inference.batcher
    assert batcher.rows == len(x) and batcher.passes < len(x), (batcher.passes, batcher.rows)


def test_a_busy_partition_is_retried_then_unavailable(tmp_path, expected_init):
    x, expected = expected_init
    servers = Servers(tmp_path, partitions=2, start=[0, 1])
    busy = servers.servers[1]
    try:
        assert servers.servers[0].inference.inflight_limit(servers.servers[0]._loaded.table) >= 1
        servers.servers[0].inference.retry = RetryPolicy(busy_retries=2)
        for _ in range(busy.pass_limit):
            assert busy._pass_slots.acquire(blocking=False)
        status, reply = infer_json(servers.rest(0), x)
        assert status == 503 and "forward passes are running" in reply["error"], reply
        for _ in range(busy.pass_limit):
            busy._pass_slots.release()
        status, reply = infer_json(servers.rest(0), x)
        assert status == 200, reply
        np.testing.assert_allclose(np.array(reply["outputs"][0]["data"]).reshape(x.shape[0], -1), expected, **TOL)
    finally:
        servers.stop()


def test_compressed_bodies_may_not_expand_beyond_the_body_limit(tmp_path, expected_init, monkeypatch):
    """A small gzip/deflate body that inflates past the limit is 413, without inflating it all."""
    import zlib

    x, expected = expected_init
    monkeypatch.setenv("MPNN_MAX_REQUEST_BYTES", str(1 << 20))
    servers = Servers(tmp_path, partitions=1, start=[0])
    try:
        url = f"{servers.rest(0)}/v2/models/{NAME}/infer"
        bomb = b'{"inputs": [' + b" " * (8 << 20) + b"]}"  # 8 MiB of JSON; compresses to a few KiB
        for encoding, packed in (("gzip", gzip.compress(bomb)), ("deflate", zlib.compress(bomb))):
            assert len(packed) < 64 << 10
            status, _, raw = request(url, packed, {"Content-Encoding": encoding})
            assert status == 413 and "decompresses to more than 1048576 bytes" in json.loads(raw)["error"], raw
        # Within the limit: one gzip member is a body; two members are refused (tests/security
        # shows that many members take linear time).
        body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        half = len(body) // 2
        status, _, raw = request(url, gzip.compress(body[:half]) + gzip.compress(body[half:]),
                                 {"Content-Encoding": "gzip"})
        assert status == 400 and "exactly one compressed member" in json.loads(raw)["error"], raw
        status, _, raw = request(url, gzip.compress(body), {"Content-Encoding": "gzip"})
        assert status == 200, raw
        np.testing.assert_allclose(np.array(json.loads(raw)["outputs"][0]["data"]).reshape(x.shape[0], -1),
                                   expected, **TOL)
        status, _, raw = request(url, gzip.compress(body)[:-9], {"Content-Encoding": "gzip"})
        assert status == 400 and "cannot be decompressed" in json.loads(raw)["error"], raw
    finally:
        servers.stop()
