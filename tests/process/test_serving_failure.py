"""A partition server killed while ``mpnn run --serve`` serves: requests answer 503 / UNAVAILABLE
naming the missing partition and readiness is false; once the server is back (restarted by
``mpnn run``, loading the current checkpoint) answers match ``--predict`` again, with no manual step."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import yaml

from partition_server.api.protos import grpc_predict_v2_pb2 as ipb
from partition_server.api.protos import grpc_predict_v2_pb2_grpc as ipb_grpc
from tests.process.test_local_mode import reaper  # noqa: F401 - fixture
from tests.support.dataplane import serve_processes, wait_until

NAME = "serve-failover"
MODEL = {"inputs": 64, "layers": [{"units": 20, "activation": "relu"}, {"units": 10, "activation": "softmax"}],
         "seed": 9}


def _manifest(path: Path, training: bool) -> Path:
    spec = {"model": MODEL, "partitions": 3}
    if training:
        spec["training"] = {"dataset": {"format": "digits"}, "epochs": 1, "batchSize": 64, "learningRate": 0.1,
                            "optimizer": "sgd", "momentum": 0.9, "runId": "s1"}
    path.write_text(yaml.safe_dump({"apiVersion": "mpnn.dev/v1alpha1", "kind": "NeuralNetwork",
                                    "metadata": {"name": NAME}, "spec": spec}))
    return path


def _mpnn(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "partition_server.cli", *args], cwd=cwd, capture_output=True,
                         text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    return out


def _infer(rest: str, x: np.ndarray) -> tuple[int, dict]:
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    req = urllib.request.Request(f"{rest}/v2/models/{NAME}/infer", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _ready(rest: str) -> bool:
    try:
        with urllib.request.urlopen(f"{rest}/v2/health/ready", timeout=30) as reply:
            return reply.status == 200
    except urllib.error.HTTPError:
        return False


def _outputs(reply: dict) -> np.ndarray:
    (out,) = reply["outputs"]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def test_requests_name_the_missing_partition_and_recover_after_its_restart(tmp_path, reaper):  # noqa: F811
    procs, workdirs = reaper
    workdir = tmp_path / "work"
    workdirs.append(workdir)
    _mpnn("run", str(_manifest(tmp_path / "train.yaml", True)), "--json", "--workdir", str(workdir), cwd=tmp_path)
    serve = _manifest(tmp_path / "serve.yaml", False)
    x = np.random.default_rng(3).uniform(0, 16, size=(5, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    _mpnn("run", str(serve), "--workdir", str(workdir), "--predict", str(tmp_path / "x.npy"),
          "--output", str(tmp_path / "want.npy"), cwd=tmp_path)
    want = np.load(tmp_path / "want.npy")

    proc = subprocess.Popen([sys.executable, "-m", "partition_server.cli", "run", str(serve), "--serve",
                             "--workdir", str(workdir)], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(proc)
    endpoints = {}
    while len(endpoints) < 3:
        line = proc.stdout.readline()
        assert line, f"mpnn run --serve ended: {proc.communicate()}"
        m = re.match(r"\s+(\d+)\s+REST (\S+)\s+gRPC (\S+)", line)
        if m:
            endpoints[int(m.group(1))] = (m.group(2), m.group(3))
    rest, grpc_address = endpoints[0]
    status, reply = _infer(rest, x)
    assert status == 200, reply
    np.testing.assert_allclose(_outputs(reply), want, atol=1e-5)

    victim = 2
    os.kill(serve_processes(workdir)[victim], signal.SIGKILL)
    killed = time.monotonic()
    status, reply = _infer(rest, x)
    assert status == 503, reply
    assert f"partition {victim} (" in reply["error"], reply
    assert not _ready(rest)
    with grpc.insecure_channel(grpc_address) as channel:
        request = ipb.ModelInferRequest(model_name=NAME, inputs=[ipb.ModelInferRequest.InferInputTensor(
            name="input", datatype="FP32", shape=list(x.shape))], raw_input_contents=[x.tobytes()])
        try:
            ipb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
            raise AssertionError("ModelInfer answered while partition 2 was down")
        except grpc.RpcError as exc:
            # The restart may already be under way: either way the partition is named.
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            assert f"partition {victim} (" in exc.details(), exc.details()

    wait_until(lambda: _ready(rest), timeout=120, interval=0.2, what="the restarted partition to be ready")
    back = time.monotonic() - killed
    for i, (entry, _) in endpoints.items():  # every entry point, the restarted one included
        status, reply = _infer(entry, x)
        assert status == 200, (i, reply)
        np.testing.assert_allclose(_outputs(reply), want, atol=1e-5)
    print(f"serving recovery: kill -> ready again {back:.2f} s")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
