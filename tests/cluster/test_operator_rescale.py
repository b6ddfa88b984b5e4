"""On the real local control plane (tests/support/kube): a scale during a Running training run
waits for the trainer's checkpoint (mpnn_operator.rescale), and a partition server pod that is
not ready shows as PartitionUnavailable until it is back.

kwok runs no code, so the trainer is played from the test through the trainer's own code
(TrainingReporter: its merge patch and its GET of the status subresource), authenticated as the
trainer's ServiceAccount bound to the chart's ClusterRole mpnn-trainer. The run's Job names a
ServiceAccount that does not exist, so kwok cannot "run" and complete it: the run stays Running
as the trainer reports it. The trainer's side against real servers is
tests/process/test_trainer_rescale.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from partition_server.api import rescale as phases
from tests.cluster.test_operator_training import TRAINER_RBAC, TRAINING, trainer_role  # noqa: F401 (fixture)
from tests.support.kube.operator import (  # noqa: F401 (crds: fixture)
    Operator, as_trainer, condition, converged, crds, digits, events, lookup, nn, token_kubeconfig, wait_ready,
)

pytestmark = pytest.mark.k8s

TIMEOUT = 30  # the operator's --rescale-timeout here


@pytest.fixture
def operator(crds, kubeconfig, kubectl_bin, namespace, tmp_path, kubectl):  # noqa: F811
    op = Operator(kubeconfig, tmp_path / "operator.log", [namespace], args=["--rescale-timeout", str(TIMEOUT)])
    try:
        yield op.start()
        if op.proc is not None:
            kubectl("delete", "neuralnetworks.mpnn.dev", "--all", "--timeout=60s", namespace=namespace, check=False)
    finally:
        op.stop()
        print(f"--- operator log ({op.log_path}) ---\n{op.tail(200)}")


def _training(kubectl, ns: str) -> dict:
    return (nn(kubectl, ns).get("status") or {}).get("training") or {}


def _trainer(kubectl, kubeconfig, ns: str, tmp_path: Path):
    """Runs TrainingReporter calls as the trainer's ServiceAccount, in a process of their own."""
    config = token_kubeconfig(kubectl, kubeconfig, ns, "mpnn-trainer", tmp_path / "trainer.kubeconfig")

    return as_trainer(config, ns)


def _replicas(kubectl, ns: str) -> int:
    return kubectl.json("get", "statefulset", "digits", namespace=ns)["spec"]["replicas"]


def test_scale_during_a_run_waits_for_the_trainers_checkpoint_then_for_its_deadline(
        kubectl, kubeconfig, namespace, operator, trainer_role, wait_for, tmp_path):  # noqa: F811
    ns = namespace
    kubectl("apply", "-f", str(TRAINER_RBAC), namespace=ns)
    kubectl.apply(digits(training={**TRAINING, "runId": "run-1", "serviceAccountName": "no-pods"}), namespace=ns)
    wait_ready(kubectl, ns, 4, wait_for, operator)
    wait_for(lambda: _training(kubectl, ns).get("phase") == "Blocked", timeout=60, message="the run Blocked")
    trainer = _trainer(kubectl, kubeconfig, ns, tmp_path)
    trainer("r.started()\nr.progress(epoch=1, step=40, loss=0.5, checkpoint=2)")
    before = lookup(kubectl, ns)

    # kubectl scale during the run: the request, and nothing else moves.
    kubectl("scale", "nn/digits", "--replicas=3", namespace=ns)
    request = wait_for(lambda: (lambda r: r if r.get("phase") == phases.REQUESTED else None)(
        _training(kubectl, ns).get("rescale") or {}), timeout=60, message="the operator's checkpoint request")
    assert request["partitions"] == 3 and request["lookupVersion"] != before.version
    obj = wait_for(lambda: (lambda o: o if condition(o, "Progressing").get("reason") == "WaitingForCheckpoint"
                            else None)(nn(kubectl, ns)), timeout=30, message="Progressing WaitingForCheckpoint")
    assert obj["status"]["phase"] == "Progressing" and obj["status"]["partitions"] == 4
    assert ("Normal", "RescaleRequested") in [(e["type"], e["reason"]) for e in events(kubectl, ns)]
    assert lookup(kubectl, ns).version == before.version and _replicas(kubectl, ns) == 4
    # The trainer sees it through the status subresource (its role's get), and answers.
    seen = json.loads(trainer("print(json.dumps(r.rescale_request()))"))
    assert seen["phase"] == phases.REQUESTED and seen["lookupVersion"] == request["lookupVersion"]
    assert lookup(kubectl, ns).version == before.version and _replicas(kubectl, ns) == 4
    trainer("r.rescale_checkpointed(checkpoint=3, step=47)")

    answer = wait_for(lambda: (lambda r: r if r.get("phase") == phases.PUBLISHED else None)(
        _training(kubectl, ns).get("rescale") or {}), timeout=30, message="the table published on the answer")
    after = lookup(kubectl, ns)
    assert after.num_partitions == 3 and answer["lookupVersion"] == after.version == request["lookupVersion"]
    assert (answer["checkpoint"], answer["step"]) == (3, 47)
    assert _replicas(kubectl, ns) == 3
    wait_for(lambda: converged(kubectl, ns, 3), timeout=120, message="Ready on 3 partitions")
    reasons = [(e["type"], e["reason"]) for e in events(kubectl, ns)]
    assert ("Normal", "RescalePublished") in reasons and ("Normal", "Scaled") in reasons
    trainer(f"r.rescale_completed(47, {after.version!r}, 3)")
    assert _training(kubectl, ns)["rescale"]["phase"] == phases.COMPLETED

    # A trainer that does not answer: the table is published at the deadline, with a Warning.
    kubectl("scale", "nn/digits", "--replicas=5", namespace=ns)
    wait_for(lambda: (_training(kubectl, ns).get("rescale") or {}).get("phase") == phases.REQUESTED, timeout=60,
             message="the second request")
    assert lookup(kubectl, ns).num_partitions == 3
    timed_out = wait_for(lambda: (lambda r: r if r.get("phase") == phases.TIMED_OUT else None)(
        _training(kubectl, ns).get("rescale") or {}), timeout=TIMEOUT + 60, message="the deadline")
    assert lookup(kubectl, ns).num_partitions == 5 and timed_out["lookupVersion"] == lookup(kubectl, ns).version
    assert _replicas(kubectl, ns) == 5
    # (TrainingBlocked: the Job's ServiceAccount that does not exist, on purpose)
    warnings = [e["reason"] for e in events(kubectl, ns) if e["type"] == "Warning"]
    assert sorted(set(warnings)) == ["RescaleTimedOut", "TrainingBlocked"], warnings
    wait_for(lambda: converged(kubectl, ns, 5), timeout=120, message="Ready on 5 partitions")


def _set_ready(kubectl, ns: str, pod: str, ready: bool) -> None:
    value = "True" if ready else "False"
    kubectl("patch", "pod", pod, "--subresource=status", "--type=strategic", "-p", json.dumps(
        {"status": {"conditions": [{"type": "Ready", "status": value}, {"type": "ContainersReady", "status": value}]}}),
        namespace=ns)


def _settled(kubectl, ns: str, wait_for, quiet: float = 3.0) -> None:
    seen = {"version": None, "since": 0.0}

    def quiet_for() -> bool:
        version = nn(kubectl, ns)["metadata"]["resourceVersion"]
        if version != seen["version"]:
            seen.update(version=version, since=time.monotonic())
        return time.monotonic() - seen["since"] >= quiet
    wait_for(quiet_for, timeout=60, interval=0.5, message="the NeuralNetwork's status settled")


def test_a_pod_not_ready_is_partition_unavailable_until_it_is_back(kubectl, namespace, operator, wait_for):
    ns = namespace
    kubectl.apply(digits(), namespace=ns)
    wait_ready(kubectl, ns, 4, wait_for, operator)
    # Only once the operator has settled (the status unchanged for 3 s): a pod that fails while
    # the rollout's last status writes are still in flight may be reported as RollingOut instead.
    _settled(kubectl, ns, wait_for)
    _set_ready(kubectl, ns, "digits-2", False)  # what the kubelet writes when its readiness probe fails
    obj = wait_for(lambda: (lambda o: o if condition(o, "Degraded").get("status") == "True" else None)(
        nn(kubectl, ns)), timeout=60, message="Degraded while digits-2 is not ready")
    degraded = condition(obj, "Degraded")
    assert degraded["reason"] == "PartitionUnavailable" and "digits-2 not ready" in degraded["message"]
    assert "digits-0" not in degraded["message"] and obj["status"]["phase"] == "Degraded"
    assert ("Warning", "PartitionUnavailable") in [(e["type"], e["reason"]) for e in events(kubectl, ns)]

    _set_ready(kubectl, ns, "digits-2", True)
    obj = wait_ready(kubectl, ns, 4, wait_for, operator)
    assert condition(obj, "Degraded")["status"] == "False"
