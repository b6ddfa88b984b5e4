"""The operator's ``/metrics``: reconciles by result and duration, networks, Degraded by reason,
scraped over HTTP from the server ``mpnn operator`` starts and parsed with ``prometheus_client.parser``."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from mpnn_operator.reconcile import Reconciler
from tests.support.fake_kube import FakeKube

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.yaml"


def _adopt(child, owner):
    child["metadata"]["ownerReferences"] = [{"kind": "NeuralNetwork", "name": owner["metadata"]["name"],
                                             "uid": owner["metadata"]["uid"], "controller": True}]


def _scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.fixture
def served():
    kube = FakeKube()
    reconciler = Reconciler(kube, "cluster.local", emit=lambda *a: None, adopt=_adopt)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server, thread = start_http_server(port, addr="127.0.0.1", registry=reconciler.metrics.registry)
    yield kube, reconciler, port
    server.shutdown()
    thread.join()


def test_reconciles_networks_and_degraded_reasons_are_counted(served):
    kube, reconciler, port = served
    ok = ("mpnn_reconciles_total", (("result", "ok"),))
    assert _scrape(port)[ok] == 0
    doc = yaml.safe_load(DIGITS.read_text())
    kube.create_network(doc)
    reconciler.reconcile("ns", "digits")
    reconciler.reconcile("ns", "digits")
    bad = yaml.safe_load(DIGITS.read_text())
    bad["metadata"]["name"] = "bad"
    bad["spec"]["distribution"] = {"strategy": "count", "counts": [1, 2]}
    kube.create_network(bad)
    reconciler.reconcile("ns", "bad")
    samples = _scrape(port)
    assert samples[ok] == 3
    assert samples[("mpnn_reconcile_seconds_count", ())] == 3
    assert samples[("mpnn_networks", ())] == 2
    assert samples[("mpnn_networks_degraded", (("reason", "InvalidSpec"),))] == 1
    reconciler.cleanup(kube.objects[("NeuralNetwork", "ns", "bad")])
    samples = _scrape(port)
    assert samples[("mpnn_networks", ())] == 1
    assert ("mpnn_networks_degraded", (("reason", "InvalidSpec"),)) not in samples


def test_a_failed_reconcile_counts_as_error(served, monkeypatch):
    kube, reconciler, port = served
    kube.create_network(yaml.safe_load(DIGITS.read_text()))

    def boom(*a, **k):
        raise RuntimeError("api down")

    monkeypatch.setattr(kube, "get", boom)
    with pytest.raises(RuntimeError):
        reconciler.reconcile("ns", "digits")
    assert _scrape(port)[("mpnn_reconciles_total", (("result", "error"),))] == 1
