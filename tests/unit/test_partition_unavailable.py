"""A partition server pod that goes down after the network was Ready: the NeuralNetwork is
Degraded with reason PartitionUnavailable naming the pod while it is down, and not after."""

from __future__ import annotations

from pathlib import Path

import yaml

from mpnn_operator import naming
from mpnn_operator.reconcile import Reconciler
from tests.support.fake_kube import FakeKube

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.yaml"


def _adopt(child, owner):
    child["metadata"]["ownerReferences"] = [{"kind": "NeuralNetwork", "name": owner["metadata"]["name"],
                                             "uid": owner["metadata"]["uid"], "controller": True}]


def _pods(kube, ready):
    sts = kube.objects[("StatefulSet", "ns", "digits")]
    sts["status"] = {"replicas": 4, "readyReplicas": len(ready), "updatedReplicas": 4, "observedGeneration": 1}
    for i in range(4):
        key = ("Pod", "ns", f"digits-{i}")
        if key not in kube.objects:
            kube.apply({"apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": f"digits-{i}", "namespace": "ns", "labels": naming.selector("digits")}})
        kube.objects[key]["status"] = {"conditions": [{"type": "Ready", "status": "True" if i in ready else "False"}]}


def _degraded(kube):
    status = kube.objects[("NeuralNetwork", "ns", "digits")]["status"]
    return next(c for c in status["conditions"] if c["type"] == "Degraded"), status["phase"]


def test_a_pod_down_after_ready_is_reported_until_it_is_back():
    kube, events = FakeKube(), []
    reconciler = Reconciler(kube, "cluster.local", emit=lambda o, t, r, m: events.append((t, r, m)), adopt=_adopt)
    kube.create_network(yaml.safe_load(DIGITS.read_text()))
    reconciler.reconcile("ns", "digits")
    _pods(kube, ready={0, 1})  # the first rollout: not a failure
    reconciler.refresh_status("ns", "digits")
    assert _degraded(kube)[0]["status"] == "False"
    _pods(kube, ready={0, 1, 2, 3})
    reconciler.refresh_status("ns", "digits")
    assert _degraded(kube)[1] == "Ready"

    _pods(kube, ready={0, 1, 3})
    reconciler.refresh_status("ns", "digits")
    degraded, phase = _degraded(kube)
    assert (degraded["status"], degraded["reason"], phase) == ("True", "PartitionUnavailable", "Degraded")
    assert "digits-2 not ready" in degraded["message"]
    assert events[-1][:2] == ("Warning", "PartitionUnavailable")
    reconciler.reconcile("ns", "digits")  # a full reconcile meanwhile keeps saying so
    assert _degraded(kube)[0]["reason"] == "PartitionUnavailable"
    assert [e[1] for e in events].count("PartitionUnavailable") == 1

    _pods(kube, ready={0, 1, 2, 3})
    reconciler.refresh_status("ns", "digits")
    degraded, phase = _degraded(kube)
    assert degraded["status"] == "False" and phase == "Ready"
