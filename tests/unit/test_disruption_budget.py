"""The partition servers' PodDisruptionBudget: ``maxUnavailable: 0`` while a run trains, 1
otherwise; shown by ``mpnn render`` and kept in step with the run by the reconciler."""

from __future__ import annotations

from pathlib import Path

import yaml

from mpnn_operator import naming
from mpnn_operator.reconcile import Reconciler
from mpnn_operator.render import render
from tests.support.fake_kube import FakeKube

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.yaml"


def _doc(*, training: bool = True, storage: bool = True) -> dict:
    doc = yaml.safe_load(DIGITS.read_text())
    if storage:
        doc["spec"]["storage"] = {"nfs": {"server": "10.0.0.1", "path": "/exports/mpnn"}}
    if not training:
        doc["spec"].pop("training", None)
    return doc


def _adopt(child, owner):
    child["metadata"]["ownerReferences"] = [{"kind": "NeuralNetwork", "name": owner["metadata"]["name"],
                                             "uid": owner["metadata"]["uid"], "controller": True}]


def _budget(objs):
    (pdb,) = [o for o in objs if o["kind"] == "PodDisruptionBudget"]
    return pdb


def test_render_shows_the_budget(tmp_path):
    for training, storage, expected in ((True, True, 0), (False, True, 1), (True, False, 1)):
        path = tmp_path / "net.yaml"
        path.write_text(yaml.safe_dump(_doc(training=training, storage=storage)))
        pdb = _budget(render(str(path), namespace="ns"))
        assert pdb["apiVersion"] == "policy/v1" and pdb["metadata"]["name"] == "digits"
        assert pdb["metadata"]["namespace"] == "ns"
        assert pdb["metadata"]["labels"] == naming.labels("digits", naming.SERVER)
        assert pdb["spec"] == {"maxUnavailable": expected, "selector": {"matchLabels": naming.selector("digits")}}, \
            (training, storage)


def test_the_budget_follows_the_run(tmp_path):
    kube = FakeKube()
    kube.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "mpnn-trainer", "namespace": "ns"}})
    reconciler = Reconciler(kube, "cluster.local", emit=lambda *e: None, adopt=_adopt)
    kube.create_network(_doc())
    reconciler.reconcile("ns", "digits")
    key = ("PodDisruptionBudget", "ns", "digits")
    assert kube.objects[key]["spec"]["maxUnavailable"] == 0  # Pending: a drain must wait
    kube.patch_status("", "NeuralNetwork", name="digits", namespace="ns",
                      status={"training": {"phase": "Running", "step": 10}})
    reconciler.refresh_training("ns", "digits")
    assert kube.objects[key]["spec"]["maxUnavailable"] == 0
    kube.patch_status("", "NeuralNetwork", name="digits", namespace="ns",
                      status={"training": {"phase": "Succeeded"}})
    reconciler.refresh_training("ns", "digits")
    assert kube.objects[key]["spec"]["maxUnavailable"] == 1
    kube.writes.clear()
    reconciler.reconcile("ns", "digits")
    assert ("apply", "PodDisruptionBudget", "digits") not in kube.writes
