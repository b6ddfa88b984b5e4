"""A rescale during a Running run waits for the trainer's checkpoint (mpnn_operator.rescale): the
operator's decision, and the reconciler against an in-memory API, with the trainer's answers
written by the trainer's own TrainingReporter."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from mpnn_operator import naming, rescale
from mpnn_operator.reconcile import Reconciler
from mpnn_operator.retry import RetryLater
from partition_server.api import rescale as phases
from partition_server.client.trainer import TrainingReporter
from tests.support.fake_kube import FakeKube

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.yaml"
NOW = dt.datetime(2030, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
RUNNING = {"run": "r1", "phase": "Running"}


# -- the decision --------------------------------------------------------------------------


def test_no_run_no_wait():
    assert rescale.decide(None, None, desired="v2", in_force="v1", partitions=3, now=NOW) == rescale.PROCEED
    assert rescale.decide({"run": "r1", "phase": "Pending"}, "r1", desired="v2", in_force="v1", partitions=3,
                          now=NOW) == rescale.PROCEED
    # the first table is never held, nor an unchanged one
    assert rescale.decide(RUNNING, "r1", desired="v1", in_force=None, partitions=3, now=NOW) == rescale.PROCEED
    assert rescale.decide(RUNNING, "r1", desired="v1", in_force="v1", partitions=3, now=NOW) == rescale.PROCEED
    # a Running status of another run (runId changed) does not hold either
    assert not rescale.decide(RUNNING, "r2", desired="v2", in_force="v1", partitions=3, now=NOW).hold


def test_a_running_run_gets_a_request_and_the_table_waits():
    d = rescale.decide(RUNNING, "r1", desired="v2", in_force="v1", partitions=3, now=NOW, timeout=60)
    assert d.hold and d.retry_in == 60 and d.after is None
    assert d.before["phase"] == phases.REQUESTED and d.before["lookupVersion"] == "v2"
    assert d.before["partitions"] == 3 and d.before["requestTime"] == "2030-01-01T12:00:00Z"
    assert d.event[:2] == ("Normal", "RescaleRequested")
    # Asked again 20 s later: still waiting, nothing new to write.
    training = {**RUNNING, "rescale": dict(d.before)}
    later = rescale.decide(training, "r1", desired="v2", in_force="v1", partitions=3,
                           now=NOW + dt.timedelta(seconds=20), timeout=60)
    assert later.hold and later.before is None and later.event is None and later.retry_in == 40
    # Scaled again meanwhile: the same request names the new table.
    again = rescale.decide(training, "r1", desired="v3", in_force="v1", partitions=5,
                           now=NOW + dt.timedelta(seconds=20), timeout=60)
    assert again.hold and again.before == {"lookupVersion": "v3", "partitions": 5}
    assert rescale.waiting_message(training).startswith("lookup v2 (3 partitions) waits for the trainer of run r1")


def test_the_answer_publishes_and_the_deadline_publishes_anyway():
    ack = {**RUNNING, "rescale": {"phase": phases.CHECKPOINTED, "checkpoint": 7, "step": 42,
                                  "requestTime": "2030-01-01T12:00:00Z"}}
    assert rescale.answered(ack)
    d = rescale.decide(ack, "r1", desired="v2", in_force="v1", partitions=3, now=NOW)
    assert not d.hold and d.after["phase"] == phases.PUBLISHED and d.after["lookupVersion"] == "v2"
    assert d.event[:2] == ("Normal", "RescalePublished") and "checkpoint 7 of step 42" in d.event[2]

    asked = {**RUNNING, "rescale": {"phase": phases.REQUESTED, "lookupVersion": "v2", "partitions": 3,
                                    "requestTime": "2030-01-01T12:00:00Z"}}
    assert not rescale.answered(asked)
    late = rescale.decide(asked, "r1", desired="v2", in_force="v1", partitions=3,
                          now=NOW + dt.timedelta(seconds=61), timeout=60)
    assert not late.hold and late.after["phase"] == phases.TIMED_OUT and late.after["lookupVersion"] == "v2"
    assert late.event[:2] == ("Warning", "RescaleTimedOut")


def test_a_request_nobody_needs_is_answered():
    asked = {**RUNNING, "rescale": {"phase": phases.REQUESTED, "lookupVersion": "v2", "partitions": 3,
                                    "requestTime": "2030-01-01T12:00:00Z"}}
    # Scaled back to the table in force: the trainer goes on under it.
    back = rescale.decide(asked, "r1", desired="v1", in_force="v1", partitions=4, now=NOW)
    assert not back.hold and back.after["phase"] == phases.PUBLISHED and back.after["lookupVersion"] == "v1"
    # The run ended (its Job failed, say) before it answered: publish now, and say so.
    ended = {**asked, "phase": "Failed"}
    assert rescale.answered(ended)
    d = rescale.decide(ended, "r1", desired="v2", in_force="v1", partitions=3, now=NOW)
    assert not d.hold and d.after["phase"] == phases.PUBLISHED


# -- the reconciler --------------------------------------------------------------------------


def _adopt(child, owner):
    child["metadata"]["ownerReferences"] = [{"kind": "NeuralNetwork", "name": owner["metadata"]["name"],
                                             "uid": owner["metadata"]["uid"], "controller": True}]


@pytest.fixture
def setup():
    kube, events = FakeKube(), []
    doc = yaml.safe_load(DIGITS.read_text())
    doc["spec"]["storage"] = {"nfs": {"server": "10.0.0.1", "path": "/exports/mpnn"}}
    kube.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "mpnn-trainer", "namespace": "ns"}})
    kube.create_network(doc)
    reconciler = Reconciler(kube, "cluster.local", emit=lambda o, t, r, m: events.append((t, r, m)), adopt=_adopt,
                            rescale_timeout=90)
    reconciler.reconcile("ns", "digits")
    run = kube.objects[("NeuralNetwork", "ns", "digits")]["spec"]["training"]["runId"]

    def patch(status):
        kube.patch_status("", "NeuralNetwork", name="digits", namespace="ns", status=status)

    def read():
        return kube.get("", "NeuralNetwork", name="digits", namespace="ns").get("status")

    trainer = TrainingReporter(patch, run, read)
    trainer.started()
    return kube, events, reconciler, trainer


def _status(kube):
    return kube.objects[("NeuralNetwork", "ns", "digits")]["status"]


def _replicas(kube):
    return kube.objects[("StatefulSet", "ns", "digits")]["spec"]["replicas"]


def _scale(kube, partitions):
    obj = kube.get("", "NeuralNetwork", name="digits", namespace="ns")
    obj["spec"]["partitions"] = partitions
    obj.pop("status")
    kube.apply(obj)


def test_scale_during_a_run_waits_for_the_trainers_checkpoint(setup):
    kube, events, reconciler, trainer = setup
    before = kube.lookup()
    assert before.num_partitions == 4 and trainer.rescale_request() is None
    _scale(kube, 3)
    with pytest.raises(RetryLater) as held:
        reconciler.reconcile("ns", "digits")
    assert held.value.delay == 90
    # Nothing moved: the table in force, the Partitions, the StatefulSet's size.
    assert kube.lookup().version == before.version and _replicas(kube) == 4
    assert len(kube.list("", "Partition", namespace="ns", label_selector=naming.children_selector("digits"))) == 4
    status = _status(kube)
    assert status["partitions"] == 4 and status["lookupVersion"] == before.version
    request = trainer.rescale_request()
    assert request["phase"] == phases.REQUESTED and request["partitions"] == 3
    progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("True", "WaitingForCheckpoint")
    assert status["phase"] == "Progressing"
    assert events[-1][:2] == ("Normal", "RescaleRequested")
    # A StatefulSet event meanwhile keeps saying so; a second reconcile writes no second request.
    reconciler.refresh_status("ns", "digits")
    assert next(c for c in _status(kube)["conditions"] if c["type"] == "Progressing")["reason"] == \
        "WaitingForCheckpoint"
    with pytest.raises(RetryLater):
        reconciler.reconcile("ns", "digits")
    assert [e[1] for e in events].count("RescaleRequested") == 1
    assert trainer.rescale_request()["requestTime"] == request["requestTime"]

    # The trainer's answer, as `mpnn train` writes it.
    trainer.rescale_checkpointed(checkpoint=5, step=42)
    assert rescale.answered(_status(kube)["training"])
    reconciler.reconcile("ns", "digits")
    after = kube.lookup()
    assert after.num_partitions == 3 and _replicas(kube) == 3
    answer = trainer.rescale_request()
    assert answer["phase"] == phases.PUBLISHED and answer["lookupVersion"] == after.version
    assert (answer["checkpoint"], answer["step"]) == (5, 42)
    status = _status(kube)
    assert status["partitions"] == 3 and status["lookupVersion"] == after.version
    assert (status["training"]["step"], status["training"]["checkpoint"]) == (42, 5)
    assert "RescalePublished" in [e[1] for e in events] and "Scaled" in [e[1] for e in events]
    assert next(c for c in status["conditions"] if c["type"] == "Progressing")["reason"] != "WaitingForCheckpoint"
    trainer.rescale_completed(42, after.version, 3)
    assert trainer.rescale_request()["phase"] == phases.COMPLETED
    reconciler.reconcile("ns", "digits")  # settled: nothing more to hold or publish
    assert kube.lookup().version == after.version


def test_an_unanswered_request_is_published_at_its_deadline(setup):
    kube, events, reconciler, trainer = setup
    _scale(kube, 5)
    with pytest.raises(RetryLater):
        reconciler.reconcile("ns", "digits")
    # 91 s later (the request written earlier): published anyway, with a Warning.
    past = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=91)).strftime("%Y-%m-%dT%H:%M:%SZ")
    kube.patch_status("", "NeuralNetwork", name="digits", namespace="ns",
                      status={"training": {"rescale": {"requestTime": past}}})
    reconciler.reconcile("ns", "digits")
    assert kube.lookup().num_partitions == 5 and _replicas(kube) == 5
    assert trainer.rescale_request()["phase"] == phases.TIMED_OUT
    assert ("Warning", "RescaleTimedOut") in [e[:2] for e in events]


def test_a_new_run_starts_without_the_old_runs_rescale(setup):
    kube, events, reconciler, trainer = setup
    _scale(kube, 3)
    with pytest.raises(RetryLater):
        reconciler.reconcile("ns", "digits")
    obj = kube.get("", "NeuralNetwork", name="digits", namespace="ns")
    obj["spec"]["training"]["runId"] = "other"
    obj.pop("status")
    kube.apply(obj)
    reconciler.reconcile("ns", "digits")  # not that run's: published at once
    assert kube.lookup().num_partitions == 3


# -- the trainer's wait (RescaleHandshake.apply) --------------------------------------------


class _Reporter:
    """Answers ``rescale_request`` from a script; records the trainer's answers."""

    def __init__(self, script):
        self.script, self.answers = list(script), []

    def rescale_request(self):
        item = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(item, Exception):
            raise item
        return item

    def rescale_checkpointed(self, checkpoint, step):
        self.answers.append(("checkpointed", checkpoint, step))

    def rescale_completed(self, step, version, partitions):
        self.answers.append(("completed", step, version))


class _Store:
    def latest(self):
        return type("Checkpoint", (), {"sequence": 7, "meta": {"run_step": 120}})()


class _Driver:
    timeout = 1.0

    def close_training(self):
        pass


def test_the_trainer_answers_a_second_request_survives_api_hiccups_and_fails_without_recovery(tmp_path):
    """A scale that overwrites the answer before the operator published is answered again (the
    checkpoint serves any table); a failed read does not end the wait; and once the table is
    published, partitions that never serve it fail the attempt with an error Recovery does not
    retry on the old driver (code None), naming the checkpoint the Job resumes from."""
    from partition_server.api.distributor import distribute
    from partition_server.api.lookup import LookupTable
    from partition_server.api.manifest import load_manifest
    from partition_server.client.driver import DriverError
    from partition_server.client.trainer import RescaleHandshake
    from partition_server.client.training_loop import Recovery

    net = load_manifest(DIGITS).with_partitions(2)
    table = LookupTable.build(net.name, net.model.layer_units, distribute(net.model.layer_units, 2, net.distribution),
                              ["127.0.0.1:9", "127.0.0.1:9"])  # the discard port: nothing serves there
    lookup = tmp_path / "lookup.json"
    lookup.write_text(table.to_json())
    reporter = _Reporter([{"phase": phases.CHECKPOINTED}, RuntimeError("API server hiccup"),
                          {"phase": phases.REQUESTED, "lookupVersion": "v-other"},
                          {"phase": phases.PUBLISHED, "lookupVersion": table.version}])
    handshake = RescaleHandshake(reporter, lookup, _Store(), None, wait_seconds=2.0, poll_seconds=0.01)
    with pytest.raises(DriverError) as info:
        handshake.apply(_Driver())
    assert reporter.answers == [("checkpointed", 7, 120), ("checkpointed", 7, 120)]
    assert info.value.code is None and not Recovery.recoverable(info.value)
    assert "checkpoint 7" in str(info.value)
    for driver in handshake.drivers:
        driver.close()
