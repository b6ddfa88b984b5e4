"""The trainer's side of a rescale during a run on Kubernetes (trainer.RescaleHandshake), against
real partition server processes: the operator's request arrives mid-run in status.training.rescale,
the trainer checkpoints at its next step boundary and answers, the new lookup is published and the
servers change (what the operator and the kubelet do in a cluster; here LocalDeployment.repartition),
and the run goes on under the new split. Its final parameters equal those of the run without the
rescale (bound 1e-4), and no step is lost or redone.

The NeuralNetwork's status is an in-memory merge-patched dict read and written through the same
TrainingReporter as `mpnn train --report` (tests/cluster/test_operator_rescale.py runs the same
reporter against the API server, as the trainer's ServiceAccount)."""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest

from partition_server.api import rescale as phases
from partition_server.api.manifest import parse_neural_network
from partition_server.client.driver import Driver
from partition_server.client.local import LocalDeployment
from partition_server.client.trainer import RescaleHandshake, TrainingReporter
from partition_server.client.training_loop import train
from partition_server.data.datasets import load_digits_dataset
from partition_server.storage.store import ModelStore

# 1437 samples / 58 per batch = 25 steps per epoch; 6 epochs = 150 steps.
MANIFEST = {
    "apiVersion": "mpnn.dev/v1alpha1", "kind": "NeuralNetwork", "metadata": {"name": "handshake"},
    "spec": {"model": {"inputs": 64, "layers": [{"units": 24, "activation": "relu"},
                                               {"units": 16, "activation": "tanh"},
                                               {"units": 10, "activation": "softmax"}], "seed": 11},
             "partitions": 3,
             "training": {"dataset": {"format": "digits"}, "epochs": 6, "batchSize": 58, "learningRate": 0.05,
                          "optimizer": "sgd", "momentum": 0.9, "checkpointEvery": 10, "runId": "r"}},
}
NET = parse_neural_network(MANIFEST)
TOTAL = 150


def _merge(target, patch):
    out = dict(target or {})
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            out[key] = _merge(out.get(key) if isinstance(out.get(key), dict) else {}, value)
        else:
            out[key] = value
    return out


class Status:
    """A NeuralNetwork's status: merge patches in, copies out (the API server's status subresource)."""

    def __init__(self):
        self.value, self.lock = {}, threading.Lock()

    def patch(self, status):
        with self.lock:
            self.value = _merge(self.value, status)

    def read(self):
        with self.lock:
            return copy.deepcopy(self.value)

    def training(self):
        return self.read().get("training") or {}


def _parameters(store: ModelStore) -> list[np.ndarray]:
    ckpt = store.latest()
    assert ckpt.meta["run_step"] == TOTAL
    return [ckpt.read_layer(k, t) for k in range(ckpt.num_layers) for t in ("weight", "bias")]


@pytest.fixture(scope="module")
def data():
    return load_digits_dataset()


def test_the_trainer_checkpoints_at_the_operators_request_and_goes_on_under_the_new_table(tmp_path, data):
    with LocalDeployment(NET, tmp_path / "plain") as dep, \
            Driver(dep.table, timeout=30, credentials=dep.credentials) as driver:
        driver.wait_ready(60, alive=dep.check_alive)
        plain = train(driver, data, NET.training, ModelStore(dep.model_dir), NET.model, show_bar=False)
    assert plain.steps == TOTAL

    status, seen = Status(), {}
    reporter = TrainingReporter(status.patch, "r", status.read)
    target = NET.with_partitions(5)

    with LocalDeployment(NET, tmp_path / "scaled") as dep, \
            Driver(dep.table, timeout=30, credentials=dep.credentials) as driver:
        driver.wait_ready(60, alive=dep.check_alive)
        store = ModelStore(dep.model_dir)
        handshake = RescaleHandshake(reporter, dep.workdir / "lookup.json", store, dep.credentials,
                                     wait_seconds=120, poll_seconds=0.05)

        def operator():
            """The operator's part: ask once the run is under way, publish on the trainer's answer."""
            deadline = time.monotonic() + 120
            while (status.training().get("step") or 0) < 10:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            status.patch({"training": {"rescale": {"phase": phases.REQUESTED, "lookupVersion": "next",
                                                   "partitions": 5, "requestTime": "2030-01-01T00:00:00Z"}}})
            seen["asked_at"] = status.training()["step"]
            while (status.training().get("rescale") or {}).get("phase") != phases.CHECKPOINTED:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            seen["answer"] = dict(status.training()["rescale"])
            seen["committed"] = store.get(seen["answer"]["checkpoint"])  # before later ones prune it
            time.sleep(0.3)  # the trainer is parked: nothing may step meanwhile
            seen["parked"] = status.training()["step"]
            table = dep.repartition(target)  # the new lookup file, and the servers it names
            seen["table"] = table
            status.patch({"training": {"rescale": {"phase": phases.PUBLISHED, "lookupVersion": table.version}}})

        thread = threading.Thread(target=_catch, args=(operator, seen))
        thread.start()
        try:
            reporter.started()
            result = train(driver, data, NET.training, store, NET.model, show_bar=False,
                           progress=lambda p: reporter.progress(p["epoch"], p["step"], p["loss"], p["checkpoint"]),
                           rescales=[handshake.as_rescale()])
            (new,) = handshake.drivers
            accuracy = new.evaluate(data.x_test, data.y_test).accuracy
            replies = new.status()
        finally:
            thread.join(timeout=150)
            for extra in handshake.drivers:
                extra.close()
        assert seen.get("error") is None, seen["error"]

    answer = seen["answer"]
    step = answer["step"]
    assert seen["asked_at"] <= step < TOTAL and seen["parked"] == step
    committed = seen["committed"]
    # The rescale's checkpoint was written under the old table, by the 3 partitions.
    assert committed.meta["run_step"] == step and len(committed.shards) == 3
    assert (result.steps, result.restarts) == (TOTAL, 0)
    assert [r.lookup_version for r in replies] == [seen["table"].version] * 5
    final = status.training()
    assert final["rescale"]["phase"] == phases.COMPLETED and "5 partitions" in final["rescale"]["message"]
    assert store.latest().meta["lookup_version"] == seen["table"].version
    worst = max(float(np.max(np.abs(a - b)))
                for a, b in zip(_parameters(store), _parameters(ModelStore(tmp_path / "plain" / NET.name))))
    assert worst <= 1e-4, worst
    assert accuracy > 0.5
    print(f"rescale 3->5 at the operator's request after step {step}: max abs difference {worst:.2e}")


def _catch(fn, seen):
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        seen["error"] = repr(exc)
