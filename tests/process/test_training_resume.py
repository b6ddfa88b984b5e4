"""A training run survives its servers: killed mid-run and restarted, it resumes from the
last committed checkpoint, never from a partial one, and ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from partition_server.data.datasets import load_digits_dataset
from partition_server.client.driver import Driver, DriverError, TrainingDiverged
from partition_server.client.training_loop import optimizer_of, train
from partition_server.client.local import LocalDeployment
from partition_server.api.manifest import parse_neural_network, training_document
from partition_server.storage.store import ModelStore

MANIFEST = {
    "apiVersion": "mpnn.dev/v1alpha1", "kind": "NeuralNetwork", "metadata": {"name": "resume"},
    "spec": {
        "model": {"inputs": 64, "layers": [{"units": 24, "activation": "relu"},
                                           {"units": 10, "activation": "softmax"}]},
        "partitions": 3,
        "training": {"dataset": {"format": "digits"}, "epochs": 3, "batchSize": 64, "learningRate": 0.1,
                     "optimizer": "sgd", "momentum": 0.9, "checkpointEvery": 10, "runId": "r1"},
    },
}
NET = parse_neural_network(MANIFEST)


@pytest.fixture(scope="module")
def data():
    return load_digits_dataset()


def _weights(store: ModelStore) -> list[np.ndarray]:
    ckpt = store.latest()
    return [ckpt.read_layer(k, "weight") for k in range(ckpt.num_layers)]


def _run(workdir, data, progress=None):
    with LocalDeployment(NET, workdir) as dep, Driver(dep.table, timeout=30, credentials=dep.credentials) as driver:
        driver.wait_ready(60, alive=dep.check_alive)
        loaded_from = [s.checkpoint_sequence for s in driver.status()]
        store = ModelStore(dep.model_dir)
        result = train(driver, data, NET.training, store, NET.model,
                       progress=progress and (lambda p: progress(p, dep)), show_bar=False)
        return result, driver.evaluate(data.x_test, data.y_test), store, loaded_from


def test_killed_servers_resume_from_the_last_committed_checkpoint(tmp_path, data):
    baseline, base_eval, base_store, fresh = _run(tmp_path / "a", data)
    assert baseline.resumed_from is None and fresh == [-1] * NET.partitions

    def kill_at_third_checkpoint(progress, dep):
        if progress["checkpoint"] == 3:
            for proc in dep.procs:
                proc.send_signal(signal.SIGKILL)

    with pytest.raises(DriverError):
        _run(tmp_path / "b", data, kill_at_third_checkpoint)
    store = ModelStore(tmp_path / "b" / "resume")
    committed = store.latest()
    assert committed.sequence == 3
    # A writer that dies before the commit record: shards of checkpoint 4 exist, full of garbage.
    dead = store.reserve(run_id="dead")
    assert dead.sequence == 4
    fan_in = [NET.model.inputs] + NET.model.layer_units[:-1]
    for shard in committed.shards:
        rows = {k: sum(e - s for s, e in rs) for k, rs in shard.ranges.items()}
        layers = {k: {"weight": np.full((n, fan_in[k]), 1e3, np.float32), "bias": np.full((n,), 1e3, np.float32)}
                  for k, n in rows.items()}
        store.write_shard(dead, partition=shard.partition, layers=layers,
                          ranges={k: list(rs) for k, rs in shard.ranges.items()})
    assert store.latest().sequence == 3

    resumed, resumed_eval, _, loaded_from = _run(tmp_path / "b", data)
    assert loaded_from == [3] * NET.partitions  # the committed checkpoint, not the partial 4
    assert resumed.resumed_from == committed.meta["run_step"] == 23  # 10, 20, then the end of epoch 1
    assert resumed.steps == baseline.steps - 23
    # Same batches, same state: the resumed run ends where the uninterrupted one did.
    assert abs(resumed_eval.accuracy - base_eval.accuracy) <= 0.01
    for got, want in zip(_weights(store), _weights(base_store)):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_mpnn_train_command_against_running_servers(tmp_path, data):
    with LocalDeployment(NET, tmp_path) as dep, Driver(dep.table, credentials=dep.credentials) as driver:
        driver.wait_ready(60, alive=dep.check_alive)
        out = subprocess.run(
            [sys.executable, "-m", "partition_server.cli", "train", "--training", json.dumps(training_document(NET.training)),
             "--lookup", str(tmp_path / "lookup.json"), "--network", str(tmp_path / "network.json"),
             "--model-dir", str(dep.model_dir), "--peer-key-file", str(dep.key_path), "--log-level", "warning"],
            capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["run"] == "r1" and result["accuracy"] > 0.8
        assert ModelStore(dep.model_dir).latest().meta["run_step"] == 69
        assert driver.evaluate(data.x_test, data.y_test).accuracy == pytest.approx(result["accuracy"])


def test_a_retry_without_checkpoint_starts_from_the_initial_weights(tmp_path, data):
    one_epoch = parse_neural_network({**MANIFEST, "spec": {**MANIFEST["spec"], "training": {
        **MANIFEST["spec"]["training"], "epochs": 1, "checkpointEvery": 0}}})

    def run(workdir, stray_steps):
        with LocalDeployment(one_epoch, workdir) as dep, Driver(dep.table, timeout=30, credentials=dep.credentials) as driver:
            driver.wait_ready(60, alive=dep.check_alive)
            for i in range(stray_steps):  # a dead attempt's progress, never checkpointed
                driver.step(data.x_train[i * 64:(i + 1) * 64], data.y_train[i * 64:(i + 1) * 64],
                            optimizer_of(one_epoch.training))
            store = ModelStore(dep.model_dir)
            train(driver, data, one_epoch.training, store, one_epoch.model, show_bar=False)
            return _weights(store)

    for got, want in zip(run(tmp_path / "retry", 3), run(tmp_path / "clean", 0)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_diverged_run_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, data):
    spec = MANIFEST["spec"]
    wild = parse_neural_network({**MANIFEST, "spec": {
        **spec, "model": {"inputs": 64, "layers": [{"units": 24, "activation": "identity"},
                                                   {"units": 10, "activation": "softmax"}]},
        "training": {**spec["training"], "learningRate": 1e5, "checkpointEvery": 1}}})
    with LocalDeployment(wild, tmp_path) as dep, Driver(dep.table, timeout=30, credentials=dep.credentials) as driver:
        driver.wait_ready(60, alive=dep.check_alive)
        store = ModelStore(dep.model_dir)
        with pytest.raises(TrainingDiverged, match=r"training diverged: loss is (nan|inf) at step"):
            train(driver, data, wild.training, store, wild.model, show_bar=False)
        last = store.latest()
        assert last is not None and all(np.isfinite(w).all() for w in _weights(store))
        assert last.meta["run_step"] >= 1
