"""``GET /metrics`` of running partition servers (``mpnn serve`` processes of a local deployment),
parsed with ``prometheus_client.parser``: the counters move by exactly what a known number of
training steps, checkpoints and inference requests implies."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from partition_server.api.manifest import load_manifest
from partition_server.client.driver import Driver
from partition_server.client.local import LocalDeployment
from partition_server.engine import OptimizerConfig
from partition_server.storage.store import ModelStore

STEPS = 5
BATCH = 8


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of one server's ``/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum of ``name`` over every label set that contains ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    doc = {"apiVersion": "mpnn.dev/v1alpha1", "kind": "NeuralNetwork", "metadata": {"name": "m"},
           "spec": {"model": {"inputs": 6, "layers": [{"units": 5, "activation": "relu"},
                                                      {"units": 3, "activation": "softmax"}], "seed": 1},
                    "partitions": 2}}
    (root / "net.yaml").write_text(yaml.safe_dump(doc))
    net = load_manifest(root / "net.yaml")
    with LocalDeployment(net, root / "work") as dep, Driver(dep.table, credentials=dep.credentials) as driver:
        driver.wait_ready(timeout=60, alive=dep.check_alive)
        yield dep, driver


def test_counters_move_by_the_steps_taken(deployment):
    dep, driver = deployment
    before = [scrape(p) for p in dep.http_ports]
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        x = rng.normal(size=(BATCH, 6)).astype(np.float32)
        driver.step(x, rng.integers(0, 3, BATCH), OptimizerConfig("sgd", 0.1))
    sequence = driver.checkpoint(ModelStore(dep.model_dir), dep.net.model, {"run_id": "m"}).sequence
    after = [scrape(p) for p in dep.http_ports]
    for i, (b, a) in enumerate(zip(before, after)):
        peer = str(1 - i)
        assert value(a, "mpnn_training_steps_total") - value(b, "mpnn_training_steps_total") == STEPS
        # balanced over 2 partitions: both own rows of both layers. Per step, each partition sends
        # one message per layer forward and one per inner layer backward (layer 0's partials go nowhere).
        for phase, per_step in (("fwd", 2), ("bwd", 1)):
            moved = (value(a, "mpnn_exchange_messages_total", peer=peer, phase=phase)
                     - value(b, "mpnn_exchange_messages_total", peer=peer, phase=phase))
            assert moved == STEPS * per_step, (i, phase)
        sent_bytes = (total(a, "mpnn_exchange_bytes_total") - total(b, "mpnn_exchange_bytes_total"))
        # fwd: this partition's activations of each layer, [BATCH, its units] float32; bwd: the
        # partial of layer 0's width for the peer, [BATCH, peer's layer-0 units].
        mine = [dep.table.neuron_count(i)]  # sanity: owns something
        assert mine[0] > 0
        assert sent_bytes > 0 and sent_bytes % (4 * BATCH) == 0
        for phase in ("forward", "backward", "update"):
            count = (value(a, "mpnn_pass_phase_seconds_count", phase=phase)
                     - value(b, "mpnn_pass_phase_seconds_count", phase=phase))
            assert count == STEPS, (i, phase)
        assert value(a, "mpnn_checkpoint_committed_sequence") == sequence
        assert value(a, "mpnn_parameters_owned") > 0 and value(a, "mpnn_neurons_owned") > 0
        assert value(a, "mpnn_lookup_info", version=dep.table.version) == 1
        assert value(a, "mpnn_partition_info", network="m", partition=str(i)) == 1
        assert value(a, "mpnn_process_resident_memory_bytes") > 1e6
        # One stream each way between the two partitions, opened once for every step.
        for direction in ("in", "out"):
            assert value(a, "mpnn_peer_streams_open", direction=direction) == 1, (i, direction)
            assert value(a, "mpnn_peer_streams_opened_total", direction=direction) == 1, (i, direction)


def test_inference_requests_are_counted_by_protocol_and_status(deployment):
    dep, _ = deployment
    port = dep.http_ports[0]
    before = scrape(port)
    body = json.dumps({"inputs": [{"name": "input", "shape": [2, 6], "datatype": "FP32",
                                   "data": [0.5] * 12}]}).encode()
    for _ in range(3):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/m/infer", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as reply:
            assert reply.status == 200
    bad = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/m/infer", data=b"{}",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=30)
    assert err.value.code == 400
    after = scrape(port)
    assert (value(after, "mpnn_inference_requests_total", protocol="rest", status="200")
            - value(before, "mpnn_inference_requests_total", protocol="rest", status="200")) == 3
    assert (value(after, "mpnn_inference_requests_total", protocol="rest", status="400")
            - value(before, "mpnn_inference_requests_total", protocol="rest", status="400")) == 1
    assert (value(after, "mpnn_inference_request_seconds_count", protocol="rest")
            - value(before, "mpnn_inference_request_seconds_count", protocol="rest")) == 4
    # Three passes of 2 rows each ran from this entry point (the bad request ran none).
    assert (value(after, "mpnn_inference_pass_rows_count") - value(before, "mpnn_inference_pass_rows_count")) == 3
    assert (value(after, "mpnn_inference_pass_rows_sum") - value(before, "mpnn_inference_pass_rows_sum")) == 6
    # The passes ran on every partition: the other one's forward histogram moved too.
    other = scrape(dep.http_ports[1])
    assert value(other, "mpnn_pass_phase_seconds_count", phase="forward") >= 3


def test_metrics_route_is_documented():
    doc = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
    text = doc.read_text()
    for name in ("mpnn_exchange_messages_total", "mpnn_pass_phase_seconds", "mpnn_inference_requests_total",
                 "mpnn_inference_pass_rows",
                 "mpnn_training_steps_total", "mpnn_checkpoint_committed_sequence", "mpnn_lookup_info",
                 "mpnn_process_resident_memory_bytes", "mpnn_reconciles_total", "mpnn_networks_degraded"):
        assert name in text, name
