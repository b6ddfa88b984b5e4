"""``mpnn train`` with a peer key (or TLS directory) it cannot use exits 2 at once: the Job's
podFailurePolicy fails it without retries, since a retry reads the same missing Secret."""

from __future__ import annotations

import json

import pytest

from partition_server import cli
from partition_server.api.distributor import distribute
from partition_server.api.lookup import LookupTable, loopback_addresses
from partition_server.api.manifest import network_document, parse_neural_network, training_document
from partition_server.client import trainer

NET = parse_neural_network({
    "apiVersion": "mpnn.dev/v1alpha1", "kind": "NeuralNetwork", "metadata": {"name": "keyless"},
    "spec": {"model": {"inputs": 4, "layers": [{"units": 3, "activation": "softmax"}]}, "partitions": 1,
             "training": {"dataset": {"format": "digits"}, "epochs": 1, "runId": "r1"}}})


@pytest.fixture
def workdir(tmp_path):
    table = LookupTable.build(NET.name, NET.model.layer_units, distribute(NET.model.layer_units, 1, NET.distribution),
                              loopback_addresses([1], "127.0.0.1"))
    (tmp_path / "lookup.json").write_text(table.to_json())
    (tmp_path / "network.json").write_text(json.dumps(network_document(NET)))
    (tmp_path / "short-key").write_bytes(b"k" * 16)
    (tmp_path / "good-key").write_bytes(b"k" * 32)
    return tmp_path


def _train(workdir, *extra: str) -> int:
    return cli.main(["train", "--training", json.dumps(training_document(NET.training)),
                     "--lookup", str(workdir / "lookup.json"), "--network", str(workdir / "network.json"),
                     "--model-dir", str(workdir / NET.name), "--log-level", "error", *extra])


@pytest.mark.parametrize("key", [None, "missing", "short-key", "."])
def test_a_missing_unreadable_or_short_peer_key_exits_2(workdir, capsys, monkeypatch, key):
    monkeypatch.setattr(trainer, "load_dataset", lambda *a, **k: pytest.fail("the key is checked first"))
    extra = ["--peer-key-file", str(workdir / key)] if key else ["--peer-key-file", ""]
    assert _train(workdir, *extra) == cli.EXIT_USAGE == 2
    assert "--peer-key-file" in capsys.readouterr().err


def test_an_unreadable_tls_dir_exits_2(workdir, capsys, monkeypatch):
    monkeypatch.setattr(trainer, "load_dataset", lambda *a, **k: pytest.fail("the TLS files are checked first"))
    assert _train(workdir, "--peer-key-file", str(workdir / "good-key"), "--tls-dir", str(workdir / "no-tls")) == 2
    assert "--tls-dir" in capsys.readouterr().err
