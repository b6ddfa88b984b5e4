"""The reconciler against an in-memory API (:class:`tests.support.fake_kube.FakeKube`; fast,
and the real API server runs the same scenarios in tests/cluster/test_operator.py)."""

from __future__ import annotations

import contextvars
import copy
import json
import threading
import time
from pathlib import Path

import kopf
import pytest
import yaml
from kubernetes.client.rest import ApiException
from kubernetes.dynamic.exceptions import api_exception

from mpnn_operator import handlers, naming
from mpnn_operator.reconcile import Reconciler
from mpnn_operator.retry import Later, RetryLater
from mpnn_operator.volumes import VOLUME_DELETE_RETRY_SECONDS
from mpnn_operator import reconcile as reconcile_module
from partition_server.api.lookup import CONFIGMAP_LIMIT
from tests.support.fake_kube import FakeKube

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.yaml"


@pytest.fixture
def kube():
    return FakeKube()


@pytest.fixture
def events():
    return []


def _adopt(child, owner):
    child["metadata"]["ownerReferences"] = [{"kind": "NeuralNetwork", "name": owner["metadata"]["name"],
                                             "uid": owner["metadata"]["uid"], "controller": True}]


@pytest.fixture
def reconciler(kube, events):
    return Reconciler(kube, "cluster.local", emit=lambda o, t, r, m: events.append((t, r, m)), adopt=_adopt)


def _digits(storage=True):
    doc = yaml.safe_load(DIGITS.read_text())
    if storage:
        doc["spec"]["storage"] = {"nfs": {"server": "10.0.0.1", "path": "/exports/mpnn"}}
    return doc


def _partitions(kube):
    return kube.list("", "Partition", namespace="ns", label_selector=naming.children_selector("digits"))


def _report(kube, status):
    """The trainer's merge patch of the NeuralNetwork's status."""
    kube.patch_status("", "NeuralNetwork", name="digits", namespace="ns", status=status)


def _status(kube, name="digits"):
    return kube.objects[("NeuralNetwork", "ns", name)].get("status", {})


def _condition(kube, type_):
    return next(c for c in _status(kube)["conditions"] if c["type"] == type_)


def test_create_builds_every_child_and_a_second_pass_writes_nothing(kube, reconciler, events):
    kube.create_network(_digits())
    reconciler.reconcile("ns", "digits")
    kinds = sorted({k for k, _, _ in kube.objects})
    assert kinds == ["ConfigMap", "Job", "NetworkPolicy", "NeuralNetwork", "Partition", "PersistentVolume",
                     "PersistentVolumeClaim", "PodDisruptionBudget", "Secret", "Service", "StatefulSet"]
    assert kube.objects[("PersistentVolume", None, "mpnn.ns.digits")]["metadata"].get("ownerReferences") is None
    for (kind, ns, name), obj in kube.objects.items():
        if kind not in ("NeuralNetwork", "PersistentVolume"):
            assert obj["metadata"]["ownerReferences"][0]["uid"] == "uid-1", name
    status = _status(kube)
    assert status["lookupVersion"] == kube.lookup().version
    assert status["partitions"] == 4 and status["placement"] == "strategy"
    assert status["selector"] == "app.kubernetes.io/component=server,mpnn.dev/network=digits"
    assert status["observedGeneration"] == 1
    assert [e[1] for e in events] == ["Distributed", "TrainingStarted", "TrainingBlocked"]  # no ServiceAccount
    parts = _partitions(kube)
    assert [p["status"]["neurons"] for p in parts] == [51, 51, 50, 50]
    assert sum(p["status"]["parameters"] for p in parts) == 128 * 65 + 64 * 129 + 10 * 65

    kube.writes.clear()
    key = kube.objects[("Secret", "ns", "digits-peer-key")]["data"]["key"]
    reconciler.reconcile("ns", "digits")
    assert kube.writes == []
    assert kube.objects[("Secret", "ns", "digits-peer-key")]["data"]["key"] == key  # never rotated under the pods


def test_network_policy_false_deletes_the_policy_and_a_foreign_secret_name_is_a_conflict(kube, reconciler, events):
    doc = _digits()
    kube.create_network(doc)
    reconciler.reconcile("ns", "digits")
    assert ("NetworkPolicy", "ns", "digits-peers") in kube.objects
    nn = kube.objects[("NeuralNetwork", "ns", "digits")]
    nn["spec"].setdefault("server", {})["networkPolicy"] = False
    nn["metadata"]["generation"] = nn["metadata"].get("generation", 1) + 1
    reconciler.reconcile("ns", "digits")
    assert ("NetworkPolicy", "ns", "digits-peers") not in kube.objects
    # Someone else's Secret under the peer key's name is never taken over.
    kube.create_network({**_digits(), "metadata": {**_digits()["metadata"], "name": "other"}})
    kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "other-peer-key", "namespace": "ns"},
                "data": {"key": "eA=="}})
    try:
        reconciler.reconcile("ns", "other")
    except Exception:  # noqa: BLE001 - RetryLater: the conflict is retried
        pass
    status = kube.objects[("NeuralNetwork", "ns", "other")]["status"]
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "NameConflict" and "Secret other-peer-key" in degraded["message"]
    assert ("StatefulSet", "ns", "other") not in kube.objects


def test_servers_and_jobs_run_the_operators_image_unless_the_spec_names_one(kube, events):
    _trainer_account(kube)
    reconciler = Reconciler(kube, "cluster.local", emit=lambda *a: None, adopt=_adopt,
                            server_image="registry.example.com/mpnn:0.1.0")
    kube.create_network(_digits())
    reconciler.reconcile("ns", "digits")
    image = lambda kind, name: kube.objects[(kind, "ns", name)]["spec"]["template"]["spec"]["containers"][0]["image"]  # noqa: E731
    assert image("StatefulSet", "digits") == image("Job", "digits-train-digits-1") == "registry.example.com/mpnn:0.1.0"
    kube.edit("NeuralNetwork", "digits", server={"image": "example.org/mpnn:dev"})
    reconciler.reconcile("ns", "digits")
    assert image("StatefulSet", "digits") == "example.org/mpnn:dev"


def test_invalid_spec_leaves_children_untouched(kube, reconciler, events):
    kube.create_network(_digits())
    reconciler.reconcile("ns", "digits")
    before = copy.deepcopy({k: v for k, v in kube.objects.items() if k[0] != "NeuralNetwork"})
    # Passes the CRD schema, but layer 9 does not exist: only the manifest model can tell.
    kube.edit("NeuralNetwork", "digits", distribution={"strategy": "layers", "layers": [[0], [1], [2], [9]]})
    reconciler.reconcile("ns", "digits")
    assert {k: v for k, v in kube.objects.items() if k[0] != "NeuralNetwork"} == before
    degraded = _condition(kube, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "InvalidSpec"
    assert "spec.distribution.layers[3][0]" in degraded["message"] and "9" in degraded["message"]
    assert degraded["observedGeneration"] == 2 and _status(kube)["phase"] == "Degraded"
    assert events[-1][:2] == ("Warning", "InvalidSpec")
    # Reconciling again does not repeat the warning.
    reconciler.reconcile("ns", "digits")
    assert [e[1] for e in events].count("InvalidSpec") == 1


def test_manual_move_in_two_edits(kube, reconciler, events):
    kube.create_network(_digits())
    reconciler.reconcile("ns", "digits")
    first = kube.lookup()
    kube.edit("Partition", "digits-0", ranges=["0:4-31", "1:0-15", "2:0-2"])
    reconciler.partition_changed(kube.get("", "Partition", name="digits-0", namespace="ns"))
    assert kube.lookup() == first
    degraded = _condition(kube, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "InconsistentPartitions"
    assert "0:0-3 owned by no partition" in degraded["message"] and first.version in degraded["message"]
    assert events[-1][:2] == ("Warning", "InconsistentPartitions")

    kube.edit("Partition", "digits-1", ranges=["0:0-3", "0:32-63", "1:16-31", "2:3-5"])
    reconciler.partition_changed(kube.get("", "Partition", name="digits-1", namespace="ns"))
    second = kube.lookup()
    assert second.version != first.version and second.owner_of(0, 2) == 1
    assert _condition(kube, "Degraded")["status"] == "False"
    assert _status(kube)["placement"] == "manual" and _status(kube)["lookupVersion"] == second.version
    assert events[-1][1] == "Repartitioned"
    assert kube.get("", "Partition", name="digits-1", namespace="ns")["status"]["neurons"] == 55

    # The operator's own writes are not hand edits: nothing happens for them.
    kube.writes.clear()
    for i in range(4):
        reconciler.partition_changed(kube.get("", "Partition", name=f"digits-{i}", namespace="ns"))
    assert kube.writes == []

    # A spec change that leaves the distribution inputs alone keeps the hand placement ...
    kube.edit("NeuralNetwork", "digits", server={"image": "example.org/mpnn:dev", "port": 50051})
    reconciler.reconcile("ns", "digits")
    assert kube.lookup() == second
    # ... one that changes them redistributes from the strategy.
    kube.edit("NeuralNetwork", "digits", partitions=2)
    reconciler.reconcile("ns", "digits")
    assert kube.lookup().owner_of(0, 2) == 0 and kube.lookup().num_partitions == 2
    assert _status(kube)["placement"] == "strategy"


def test_scaling_rewrites_partitions_and_prunes_the_extra_ones(kube, reconciler, events):
    kube.create_network(_digits())
    reconciler.reconcile("ns", "digits")
    kube.edit("NeuralNetwork", "digits", partitions=6)
    reconciler.reconcile("ns", "digits")
    assert kube.objects[("StatefulSet", "ns", "digits")]["spec"]["replicas"] == 6
    assert len(_partitions(kube)) == 6
    assert kube.lookup().num_partitions == 6
    assert events[-1][1] == "Scaled" and "from 4 to 6" in events[-1][2]
    kube.edit("NeuralNetwork", "digits", partitions=3)
    reconciler.reconcile("ns", "digits")
    names = [p["metadata"]["name"] for p in _partitions(kube)]
    assert names == ["digits-0", "digits-1", "digits-2"]
    assert kube.lookup().num_partitions == 3 and _status(kube)["partitions"] == 3


def test_partition_status_counts_only_the_networks_neurons(kube, reconciler):
    kube.create_network(_digits())
    reconciler.reconcile("ns", "digits")
    # Layer 2 has units 0-9: 2:10-20 are no neurons, 2:5-7 belong to other partitions too.
    kube.edit("Partition", "digits-3", ranges=["0:96-127", "1:48-63", "2:5-20", "7:0-3"])
    reconciler.partition_changed(kube.get("", "Partition", name="digits-3", namespace="ns"))
    status = kube.get("", "Partition", name="digits-3", namespace="ns")["status"]
    assert status["neurons"] == 32 + 16 + 5
    assert status["parameters"] == 32 * 65 + 16 * 129 + 5 * 65
    degraded = _condition(kube, "Degraded")
    assert degraded["reason"] == "InconsistentPartitions" and "range 2:5-20 of partition 3 is outside 0-9" in \
        degraded["message"] and "layer 7 does not exist" in degraded["message"]


def test_a_refused_partition_status_does_not_fail_the_reconcile(kube, reconciler):
    patch_status = kube.patch_status

    def refuse_one(api_version, kind, *, name, namespace, status):
        if name == "digits-1":
            error = ApiException(status=422, reason="Unprocessable Entity")
            error.body = json.dumps({"kind": "Status", "reason": "Invalid", "message": "status.neurons: Invalid"})
            raise api_exception(error)
        return patch_status(api_version, kind, name=name, namespace=namespace, status=status)

    kube.patch_status = refuse_one
    kube.create_network(_digits())
    reconciler.reconcile("ns", "digits")
    parts = {p["metadata"]["name"]: p for p in _partitions(kube)}
    assert "status" not in parts["digits-1"]
    assert [parts[f"digits-{i}"]["status"]["neurons"] for i in (0, 2, 3)] == [51, 50, 50]
    assert _condition(kube, "Degraded")["status"] == "False" and _status(kube)["partitions"] == 4


def test_a_deleted_partition_is_restored_from_the_strategy(kube, reconciler):
    kube.create_network(_digits())
    reconciler.reconcile("ns", "digits")
    before = kube.lookup()
    gone = kube.get("", "Partition", name="digits-2", namespace="ns")
    kube.delete("", "Partition", name="digits-2", namespace="ns")
    reconciler.partition_changed(gone, deleted=True)
    assert kube.get("", "Partition", name="digits-2", namespace="ns")["spec"]["ranges"] == gone["spec"]["ranges"]
    assert kube.lookup() == before


def _children(kube):
    return copy.deepcopy({k: v for k, v in kube.objects.items() if k[0] != "NeuralNetwork"})


def test_a_foreign_object_with_a_childs_name_is_left_alone(kube, reconciler, events):
    mine = {"apiVersion": "v1", "kind": "ConfigMap", "data": {"mine": "yes"},
            "metadata": {"name": "digits-lookup", "namespace": "ns", "labels": {"team": "a"}}}
    kube.apply(mine)
    kube.create_network(_digits())
    before = _children(kube)
    with pytest.raises(RetryLater):
        reconciler.reconcile("ns", "digits")
    assert _children(kube) == before  # nothing applied, the ConfigMap above all
    degraded = _condition(kube, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "NameConflict"
    assert "ConfigMap digits-lookup has no controlling owner" in degraded["message"]
    assert events == [("Warning", "NameConflict", degraded["message"])]
    with pytest.raises(RetryLater):
        reconciler.reconcile("ns", "digits")
    assert len(events) == 1  # warned once
    kube.delete("v1", "ConfigMap", name="digits-lookup", namespace="ns")
    reconciler.reconcile("ns", "digits")
    assert _condition(kube, "Degraded")["status"] == "False" and kube.lookup().num_partitions == 4


def test_a_running_network_keeps_its_children_when_a_name_is_taken_by_another_owner(kube, reconciler):
    kube.create_network(_digits())
    reconciler.reconcile("ns", "digits")
    # Someone else's Service takes the inference Service's name (e.g. a network digits-inference
    # made before names ending in -inference were refused), and a Partition to come is taken too.
    kube.objects[("Service", "ns", "digits-inference")]["metadata"]["ownerReferences"] = [
        {"kind": "NeuralNetwork", "name": "digits-inference", "uid": "uid-2", "controller": True}]
    kube.apply({"apiVersion": naming.API_VERSION, "kind": "Partition",
                "metadata": {"name": "digits-5", "namespace": "ns"}, "spec": {"network": "digits", "index": 5}})
    kube.edit("NeuralNetwork", "digits", partitions=6)
    before = _children(kube)
    with pytest.raises(RetryLater):
        reconciler.reconcile("ns", "digits")
    assert _children(kube) == before
    message = _condition(kube, "Degraded")["message"]
    assert "Service digits-inference is controlled by NeuralNetwork digits-inference (uid uid-2)" in message
    assert "Partition digits-5 has no controlling owner" in message
    assert _status(kube)["partitions"] == 4


def test_a_lookup_over_the_configmap_limit_writes_nothing(kube, reconciler, events, monkeypatch):
    doc = _digits(storage=False)
    del doc["spec"]["training"]
    doc["spec"]["model"]["layers"] = [{"units": 1000}] * 256
    kube.create_network(doc)
    reconciler.reconcile("ns", "digits")
    # The lookup is O(spec + partitions) (and gzip-compressed when large): 256 x 110 fits in
    # 1 MiB with room to spare. A lower limit stands in for the API server's to exercise the
    # check that stays as the last guard: 106 more addresses go over it.
    cm = kube.objects[("ConfigMap", "ns", naming.lookup_name("digits"))]
    limit = sum(len(v.encode()) for v in cm["data"].values()) + 1024
    assert limit < CONFIGMAP_LIMIT
    monkeypatch.setattr(reconcile_module, "CONFIGMAP_LIMIT", limit)
    before = _children(kube)
    kept = kube.lookup().version
    kube.writes.clear()
    kube.edit("NeuralNetwork", "digits", partitions=110)
    reconciler.reconcile("ns", "digits")
    assert _children(kube) == before
    assert [w for w in kube.writes if w[1] != "NeuralNetwork"] == []
    degraded = _condition(kube, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "LookupTooLarge"
    size = int(degraded["message"].split(" would hold ")[1].split(" bytes")[0])
    assert size > limit and f"over the ConfigMap limit of {limit} bytes" in degraded["message"]
    assert "too many distinct runs" in degraded["message"]
    assert f"lookup table {kept} stays in force" in degraded["message"]
    assert _status(kube)["partitions"] == 4 and events[-1][:2] == ("Warning", "LookupTooLarge")
    kube.writes.clear()
    reconciler.reconcile("ns", "digits")  # nothing new: nothing written, not even the status
    assert kube.writes == []


def _api_error(status, reason=""):
    error = ApiException(status=status, reason="refused")
    error.body = json.dumps({"kind": "Status", "reason": reason, "message": f"{reason} {status}"})
    return api_exception(error)


@pytest.mark.parametrize("status, reason, retried", [
    (422, "Invalid", False), (403, "Forbidden", False), (409, "AlreadyExists", False), (400, "BadRequest", False),
    (409, "Conflict", True), (429, "TooManyRequests", True), (500, "InternalError", True), (503, "", True),
])
def test_only_api_errors_that_may_pass_are_retried(status, reason, retried):
    class Memo:
        class reconciler:
            @staticmethod
            def reconcile(namespace, name):
                raise _api_error(status, reason)

    for retry, delay in ((0, 10), (3, 80)):
        with pytest.raises(kopf.TemporaryError if retried else kopf.PermanentError) as info:
            handlers.resync_network(name="digits", namespace="ns", memo=Memo, retry=retry)
        assert f"HTTP {status}" in str(info.value)
        if retried:
            assert info.value.delay == delay


def test_a_retry_later_becomes_a_growing_kopf_retry():
    class Memo:
        class reconciler:
            @staticmethod
            def reconcile(namespace, name):
                raise RetryLater("a name is taken")

            @staticmethod
            def partition_changed(partition, deleted=False):
                raise RetryLater("a name is taken")

    delays = []
    for retry in range(7):
        with pytest.raises(kopf.TemporaryError) as info:
            handlers.reconcile_network(name="digits", namespace="ns", memo=Memo, retry=retry)
        delays.append(info.value.delay)
    assert delays == [10, 20, 40, 80, 160, 300, 300]
    handlers.partition_event(event={"type": "MODIFIED"}, body={"metadata": {}}, memo=Memo)  # not raised: logged


def test_the_volume_is_created_bound_in_advance_to_the_claim_and_then_applied_without_it(kube, reconciler):
    kube.create_network(_digits())
    reconciler.reconcile("ns", "digits")
    pv = kube.objects[("PersistentVolume", None, "mpnn.ns.digits")]
    assert pv["spec"]["claimRef"] == {"namespace": "ns", "name": "digits-model"}
    assert ("create", "PersistentVolume", "mpnn.ns.digits") in kube.writes
    # Bound: the PersistentVolume controller completes the claimRef; the operator's applies leave it alone.
    claim = kube.objects[("PersistentVolumeClaim", "ns", "digits-model")]
    pv["spec"]["claimRef"].update(uid=claim["metadata"]["uid"], kind="PersistentVolumeClaim")
    kube.writes.clear()
    reconciler.reconcile("ns", "digits")
    assert kube.writes == [] and pv["spec"]["claimRef"]["uid"] == claim["metadata"]["uid"]


def _bind(kube, phase="Bound"):
    claim = kube.objects[("PersistentVolumeClaim", "ns", "digits-model")]
    pv = kube.objects[("PersistentVolume", None, "mpnn.ns.digits")]
    claim["status"] = {"phase": phase}
    pv["spec"]["claimRef"]["uid"] = claim["metadata"]["uid"]
    pv["status"] = {"phase": "Bound"}
    return claim, pv


def test_a_claim_deleted_by_hand_gets_its_volume_back(kube, reconciler, events):
    kube.create_network(_digits())
    reconciler.reconcile("ns", "digits")
    old, pv = _bind(kube)
    kube.delete("v1", "PersistentVolumeClaim", name="digits-model", namespace="ns")
    pv["status"] = {"phase": "Released"}  # still bound to the deleted claim's uid: no new claim can bind it
    kube.writes.clear()
    reconciler.reconcile("ns", "digits")
    assert kube.writes[:3] == [("delete", "PersistentVolume", "mpnn.ns.digits"),
                               ("create", "PersistentVolume", "mpnn.ns.digits"),
                               ("apply", "PersistentVolumeClaim", "digits-model")]
    pv = kube.objects[("PersistentVolume", None, "mpnn.ns.digits")]
    assert pv["spec"]["claimRef"] == {"namespace": "ns", "name": "digits-model"} and "status" not in pv
    new = kube.objects[("PersistentVolumeClaim", "ns", "digits-model")]
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    assert events[-1][:2] == ("Normal", "VolumeRecreated") and old["metadata"]["uid"] in events[-1][2]
    assert _condition(kube, "Degraded")["status"] == "False"  # a new claim has time to bind


class FinalizingKube(FakeKube):
    """Deleting a PersistentVolume only marks it, as the pv-protection finalizer does until the
    PersistentVolume controller has seen it released."""

    def delete(self, api_version, kind, *, name, namespace=None, propagation="Background"):
        obj = self.objects.get((kind, namespace, name))
        if kind != "PersistentVolume" or obj is None:
            return super().delete(api_version, kind, name=name, namespace=namespace, propagation=propagation)
        self.writes.append(("delete", kind, name))
        obj["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
        return True

    def finalize(self, name):
        del self.objects[("PersistentVolume", None, name)]


def test_a_volume_still_being_deleted_defers_the_reconcile_instead_of_waiting(events):
    kube = FinalizingKube()
    reconciler = Reconciler(kube, "cluster.local", emit=lambda o, t, r, m: events.append((t, r, m)), adopt=_adopt)
    kube.create_network(_digits())
    reconciler.reconcile("ns", "digits")
    old, pv = _bind(kube)
    kube.delete("v1", "PersistentVolumeClaim", name="digits-model", namespace="ns")
    pv["status"] = {"phase": "Released"}
    kube.writes.clear()
    started = time.monotonic()
    with pytest.raises(RetryLater) as info:
        reconciler.reconcile("ns", "digits")
    assert time.monotonic() - started < 1  # no polling under the network's lock
    assert info.value.delay == VOLUME_DELETE_RETRY_SECONDS and "still being deleted" in str(info.value)
    assert kube.writes == [("delete", "PersistentVolume", "mpnn.ns.digits")]  # nothing else, no claim yet
    assert events[-1][:2] == ("Normal", "VolumeRecreated")
    with pytest.raises(RetryLater):  # still there: looked at, not deleted again
        reconciler.reconcile("ns", "digits")
    assert kube.writes == [("delete", "PersistentVolume", "mpnn.ns.digits")]
    assert reconciler._lock("ns", "digits").acquire(blocking=False)  # the lock was given back
    reconciler._lock("ns", "digits").release()
    kube.finalize("mpnn.ns.digits")
    reconciler.reconcile("ns", "digits")
    assert kube.writes[1:3] == [("create", "PersistentVolume", "mpnn.ns.digits"),
                                ("apply", "PersistentVolumeClaim", "digits-model")]
    new = kube.objects[("PersistentVolumeClaim", "ns", "digits-model")]
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    assert kube.objects[("PersistentVolume", None, "mpnn.ns.digits")]["spec"]["claimRef"] == \
        {"namespace": "ns", "name": "digits-model"}
    assert _condition(kube, "Degraded")["status"] == "False"
    assert [e[1] for e in events].count("VolumeRecreated") == 1


class FakeTimers:
    """Timers that run when the test says so."""

    def __init__(self):
        self.started: list[tuple[float, object]] = []
        self.cancelled = 0

    def __call__(self, delay, function):
        timers = self

        class Timer:
            def start(self):
                timers.started.append((delay, function))

            def cancel(self):
                timers.cancelled += 1

        return Timer()

    def fire(self):
        delay, function = self.started.pop(0)
        function()
        return delay


def test_a_deferred_reconcile_of_an_event_runs_again_later_with_growing_delays():
    deferred = RetryLater("volume still being deleted", delay=2)
    calls, outcomes = [], [deferred, deferred, deferred, None, deferred]

    class Memo:
        later = Later(timer=FakeTimers())

        class reconciler:
            @staticmethod
            def reconcile(namespace, name):
                calls.append((namespace, name))
                outcome = outcomes.pop(0)
                if outcome is not None:
                    raise outcome

    timers = Memo.later._timer
    claim = kopf.Body({"metadata": {"name": "digits-model", "namespace": "ns", "labels": {naming.NETWORK: "digits"}}})
    handlers.claim_event(body=claim, memo=Memo)  # deferred: not raised, but scheduled
    assert calls == [("ns", "digits")] and Memo.later.pending() == [("ns", "digits")]
    handlers.claim_event(body=claim, memo=Memo)  # one pending run per network is enough
    assert len(timers.started) == 1 and len(calls) == 2
    assert timers.fire() == 2 and calls[-1] == ("ns", "digits")  # deferred again: 2 s, then 4 s
    assert [d for d, _ in timers.started] == [4]
    assert timers.fire() == 4 and timers.started == [] and Memo.later.pending() == []  # done: no more runs
    handlers.claim_event(body=claim, memo=Memo)  # a new deferral starts from the first delay again
    assert [d for d, _ in timers.started] == [2]
    Memo.later.cancel()
    assert timers.cancelled == 1 and Memo.later.pending() == []


def test_a_volume_deferral_becomes_a_short_kopf_retry():
    class Memo:
        class reconciler:
            @staticmethod
            def reconcile(namespace, name):
                raise RetryLater("volume still being deleted", delay=2)

    delays = []
    for retry in range(9):
        with pytest.raises(kopf.TemporaryError) as info:
            handlers.reconcile_network(name="digits", namespace="ns", memo=Memo, retry=retry)
        delays.append(info.value.delay)
    assert delays == [2, 4, 8, 16, 32, 64, 128, 256, 300]


def test_a_claim_that_does_not_bind_is_reported(kube, reconciler, events):
    kube.create_network(_digits())
    reconciler.reconcile("ns", "digits")
    claim, pv = _bind(kube, phase="Pending")
    claim["metadata"]["creationTimestamp"] = "2025-01-01T00:00:00Z"
    pv["status"] = {"phase": "Available"}
    reconciler.reconcile("ns", "digits")
    degraded = _condition(kube, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "ClaimNotBound"
    assert degraded["message"].startswith("PersistentVolumeClaim digits-model is Pending, not Bound")
    assert "PersistentVolume mpnn.ns.digits is Available" in degraded["message"]
    assert events[-1][:2] == ("Warning", "ClaimNotBound") and _status(kube)["phase"] == "Degraded"
    kube.writes.clear()
    time.sleep(1.1)  # a second older: still the same verdict, so no new event and no write
    reconciler.reconcile("ns", "digits")
    assert kube.writes == [] and [e[1] for e in events].count("ClaimNotBound") == 1
    _bind(kube)
    reconciler.reconcile("ns", "digits")
    assert _condition(kube, "Degraded")["status"] == "False"


def _reconciled_then_without(kube, reconciler, key: str) -> None:
    """Create and reconcile the digits network, then remove ``spec.<key>`` and reconcile again."""
    kube.create_network(_digits())
    reconciler.reconcile("ns", "digits")
    obj = kube.get("", "NeuralNetwork", name="digits", namespace="ns")
    del obj["spec"][key]
    kube.objects[("NeuralNetwork", "ns", "digits")]["spec"] = obj["spec"]
    reconciler.reconcile("ns", "digits")


def test_removing_storage_prunes_volume_and_claim(kube, reconciler):
    _reconciled_then_without(kube, reconciler, "storage")
    assert not [k for k in kube.objects if k[0] in ("PersistentVolume", "PersistentVolumeClaim")]
    model = next(v for v in kube.objects[("StatefulSet", "ns", "digits")]["spec"]["template"]["spec"]["volumes"]
                 if v["name"] == "model")
    assert model == {"name": "model", "emptyDir": {}}


def test_cleanup_deletes_only_this_networks_volume(kube, reconciler):
    for ns in ("ns", "other"):
        doc = _digits()
        doc["metadata"].update(namespace=ns, uid=f"uid-{ns}")
        kube.apply(doc)
        reconciler.reconcile(ns, "digits")
    reconciler.cleanup(kube.get("", "NeuralNetwork", name="digits", namespace="ns"))
    assert [k[2] for k in kube.objects if k[0] == "PersistentVolume"] == ["mpnn.other.digits"]


def test_refresh_reports_readiness_from_the_statefulset(kube, reconciler):
    kube.create_network(_digits())
    reconciler.reconcile("ns", "digits")
    assert _status(kube)["phase"] == "Progressing"
    sts = kube.objects[("StatefulSet", "ns", "digits")]
    sts["status"] = {"replicas": 4, "readyReplicas": 4, "updatedReplicas": 4, "observedGeneration": 1}
    for i in range(4):
        kube.apply({"apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": f"digits-{i}", "namespace": "ns", "labels": naming.selector("digits")},
                    "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
        kube.objects[("Pod", "ns", f"digits-{i}")]["status"] = {"conditions": [{"type": "Ready", "status": "True"}]}
    reconciler.refresh_status("ns", "digits")
    assert _status(kube)["phase"] == "Ready" and _status(kube)["readyPartitions"] == 4
    assert _condition(kube, "Ready")["status"] == "True"
    assert all(p["status"]["ready"] for p in _partitions(kube))
    kube.writes.clear()
    reconciler.refresh_status("ns", "digits")
    assert kube.writes == []


# -- training ---------------------------------------------------------------------------


def _jobs(kube):
    return kube.list("batch/v1", "Job", namespace="ns", label_selector=naming.children_selector("digits"))


def _training(kube):
    return _status(kube).get("training", {})


def _trainer_account(kube, name="mpnn-trainer"):
    kube.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": "ns"}})


def _set_training(kube, **training):
    obj = kube.get("", "NeuralNetwork", name="digits", namespace="ns")
    obj["spec"]["training"].update(training)
    kube.edit("NeuralNetwork", "digits", training=obj["spec"]["training"])


def test_one_job_per_run(kube, reconciler, events):
    _trainer_account(kube)
    kube.create_network(_digits())
    reconciler.reconcile("ns", "digits")
    (job,) = _jobs(kube)
    assert job["metadata"]["name"] == "digits-train-digits-1"
    assert job["metadata"]["labels"][naming.RUN] == "digits-1"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert _training(kube) == {"run": "digits-1", "job": "digits-train-digits-1", "phase": "Pending",
                               "message": "starting Job digits-train-digits-1; waiting for the trainer"}
    assert [e[1] for e in events] == ["Distributed", "TrainingStarted"]

    kube.writes.clear()
    reconciler.reconcile("ns", "digits")
    reconciler.refresh_training("ns", "digits")
    assert kube.writes == []
    # Its Job deleted before the run finished: the run is Stopped, and not started again.
    kube.delete("batch/v1", "Job", name=job["metadata"]["name"], namespace="ns")
    kube.writes.clear()
    reconciler.reconcile("ns", "digits")
    # The run is over: its servers may be evicted one at a time again.
    assert _jobs(kube) == [] and [w for w in kube.writes if w[0] != "status"] == [
        ("apply", "PodDisruptionBudget", "digits")]
    assert kube.objects[("PodDisruptionBudget", "ns", "digits")]["spec"]["maxUnavailable"] == 1
    training = _training(kube)
    assert training["phase"] == "Stopped" and training["job"] == "digits-train-digits-1"
    assert training["message"].startswith("Job digits-train-digits-1 was deleted before the run finished")
    assert events[-1][:2] == ("Normal", "TrainingStopped")
    kube.writes.clear()
    reconciler.reconcile("ns", "digits")
    assert kube.writes == [] and [e[1] for e in events].count("TrainingStopped") == 1

    # A new runId: a new run, from a clean status.training.
    kube.objects[("NeuralNetwork", "ns", "digits")]["status"]["training"].update(epoch=3, accuracy=0.9)
    _set_training(kube, runId="digits-2")
    reconciler.reconcile("ns", "digits")
    (job,) = _jobs(kube)
    assert job["metadata"]["name"] == "digits-train-digits-2"
    assert _training(kube) == {"run": "digits-2", "job": "digits-train-digits-2", "phase": "Pending",
                               "message": "starting Job digits-train-digits-2; waiting for the trainer"}


def test_a_new_run_waits_for_the_old_job_to_be_gone(kube, reconciler, events):
    _trainer_account(kube)
    kube.create_network(_digits())
    reconciler.reconcile("ns", "digits")
    old = kube.objects[("Job", "ns", "digits-train-digits-1")]
    deleted = []
    real_delete = kube.delete

    def foreground_delete(api_version, kind, name, namespace=None, propagation="Background"):
        # The API server keeps a Job deleted in the foreground until its pods are gone.
        deleted.append((name, propagation))
        kube.objects[(kind, namespace, name)]["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
        return True

    kube.delete = foreground_delete
    _set_training(kube, runId="digits-2")
    reconciler.reconcile("ns", "digits")
    reconciler.refresh_training("ns", "digits")  # the Job's MODIFIED event: still there
    assert deleted == [("digits-train-digits-1", "Foreground")]
    assert [j["metadata"]["name"] for j in _jobs(kube)] == ["digits-train-digits-1"]
    assert events[-1][1] == "TrainingStopped" and "run digits-1" in events[-1][2]
    kube.delete = real_delete
    kube.delete("batch/v1", "Job", name=old["metadata"]["name"], namespace="ns")
    reconciler.refresh_training("ns", "digits")  # its DELETED event
    assert [j["metadata"]["name"] for j in _jobs(kube)] == ["digits-train-digits-2"]


def test_training_needs_storage(kube, reconciler, events):
    kube.create_network(_digits(storage=False))
    reconciler.reconcile("ns", "digits")
    assert _jobs(kube) == []
    training = _training(kube)
    assert training["phase"] == "Blocked" and training["run"] == "digits-1"
    assert training["message"].startswith("spec.training needs spec.storage")
    assert events[-1][:2] == ("Warning", "TrainingBlocked")
    assert _status(kube)["phase"] != "Degraded"  # the servers are fine; only training cannot run
    kube.writes.clear()
    reconciler.reconcile("ns", "digits")
    assert kube.writes == [] and [e[1] for e in events].count("TrainingBlocked") == 1


def test_a_missing_service_account_blocks_the_run_until_it_exists(kube, reconciler, events):
    doc = _digits()
    doc["spec"]["training"]["serviceAccountName"] = "trainers"
    kube.create_network(doc)
    reconciler.reconcile("ns", "digits")
    assert len(_jobs(kube)) == 1  # created anyway: its pod starts once the ServiceAccount exists
    training = _training(kube)
    assert training["phase"] == "Blocked"
    assert "ServiceAccount trainers (spec.training.serviceAccountName) does not exist" in training["message"]
    assert events[-1][:2] == ("Warning", "TrainingBlocked")
    _trainer_account(kube, "trainers")
    reconciler.refresh_training("ns", "digits")
    assert _training(kube)["phase"] == "Pending"


def test_a_foreign_job_in_the_way_blocks_the_run_once(kube, reconciler, events):
    _trainer_account(kube)
    kube.apply({"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": "digits-train-digits-1", "namespace": "ns", "labels": {"team": "other"}}})
    kube.create_network(_digits())
    reconciler.reconcile("ns", "digits")
    training = _training(kube)
    assert training["phase"] == "Blocked" and "a Job named digits-train-digits-1 exists" in training["message"]
    assert "job" not in training
    kube.writes.clear()
    reconciler.reconcile("ns", "digits")
    assert kube.writes == []
    assert [e[1] for e in events].count("TrainingBlocked") == 1
    kube.delete("batch/v1", "Job", name="digits-train-digits-1", namespace="ns")
    reconciler.reconcile("ns", "digits")
    assert _jobs(kube)[0]["metadata"]["labels"][naming.RUN] == "digits-1"
    assert _training(kube)["phase"] == "Pending" and _training(kube)["job"] == "digits-train-digits-1"


def test_trainer_reports_are_kept(kube, reconciler):
    _trainer_account(kube)
    kube.create_network(_digits())
    reconciler.reconcile("ns", "digits")
    report = {"run": "digits-1", "phase": "Running", "epoch": 2, "step": 40, "loss": 0.3, "accuracy": 0.91,
              "checkpoint": 4, "startTime": "2025-01-01T00:00:00Z", "message": None}
    _report(kube, {"training": report})
    kube.writes.clear()
    reconciler.reconcile("ns", "digits")
    reconciler.refresh_training("ns", "digits")
    assert kube.writes == []
    assert _training(kube)["epoch"] == 2 and _training(kube)["job"] == "digits-train-digits-1"


def _running_training_job(kube, reconciler, epoch: int) -> dict:
    """Reconcile the digits network with training, report it Running at ``epoch``; returns its Job."""
    _trainer_account(kube)
    kube.create_network(_digits())
    reconciler.reconcile("ns", "digits")
    _report(kube, {"training": {"phase": "Running", "epoch": epoch}})
    return kube.objects[("Job", "ns", "digits-train-digits-1")]


def test_a_failed_job_is_mirrored_when_the_trainer_could_not_say_so(kube, reconciler, events):
    job = _running_training_job(kube, reconciler, epoch=1)
    job["status"] = {"failed": 4, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
         "message": "Job has reached the specified backoff limit", "lastTransitionTime": "2025-01-01T01:00:00Z"}]}
    reconciler.refresh_training("ns", "digits")
    training = _training(kube)
    assert training["phase"] == "Failed" and training["epoch"] == 1
    assert training["message"] == ("Job digits-train-digits-1 failed (BackoffLimitExceeded): "
                                   "Job has reached the specified backoff limit")
    assert training["completionTime"] == "2025-01-01T01:00:00Z"
    assert events[-1][:2] == ("Warning", "TrainingFailed")
    kube.writes.clear()
    reconciler.refresh_training("ns", "digits")
    assert kube.writes == []
    # The trainer's own verdict (more precise) stands.
    _report(kube, {"training": {"phase": "Failed", "message": "partition 2 unavailable"}})
    kube.writes.clear()
    reconciler.refresh_training("ns", "digits")
    assert kube.writes == [] and _training(kube)["message"] == "partition 2 unavailable"


def test_a_complete_job_is_mirrored_when_the_trainer_could_not_say_so(kube, reconciler):
    job = _running_training_job(kube, reconciler, epoch=4)
    job["status"] = {"succeeded": 1, "conditions": [
        {"type": "Complete", "status": "True", "lastTransitionTime": "2025-01-01T02:00:00Z"}]}
    reconciler.refresh_training("ns", "digits")
    training = _training(kube)
    assert (training["phase"], training["epoch"], training["completionTime"]) == \
        ("Succeeded", 4, "2025-01-01T02:00:00Z")
    assert training["message"] == "Job digits-train-digits-1 completed; the trainer did not report its result"
    # The trainer's own report (with its accuracy) stands; a finished Job deleted later changes nothing.
    _report(kube, {"training": {"phase": "Succeeded", "message": "held-out accuracy 0.9600"}})
    kube.writes.clear()
    reconciler.refresh_training("ns", "digits")
    kube.delete("batch/v1", "Job", name="digits-train-digits-1", namespace="ns")
    reconciler.reconcile("ns", "digits")
    assert [w for w in kube.writes if w[0] != "delete"] == []
    assert _training(kube)["message"] == "held-out accuracy 0.9600"


def test_removing_training_stops_the_job(kube, reconciler):
    _trainer_account(kube)
    _reconciled_then_without(kube, reconciler, "training")
    assert _jobs(kube) == []
    assert _training(kube)["run"] == "digits-1"  # the last run's record stays


def test_a_deferred_reconcile_sees_the_context_of_the_event_that_deferred_it():
    """kopf.event finds kopf's event queue in context variables: a timer thread must carry them."""
    var = contextvars.ContextVar("var")
    seen, done = [], threading.Event()

    def reconcile():
        seen.append(var.get("unset"))
        done.set()

    var.set("kopf's")
    Later().defer(("ns", "digits"), reconcile, RetryLater("soon", delay=0.01))
    assert done.wait(5) and seen == ["kopf's"]
