"""Training Jobs and the inference Service on the real local control plane (tests/support/kube).

kwok runs no code: a Job's pod turns Running, then Succeeded, without training
anything. So the Job and its pod are checked as objects, and the trainer's reports
are made from the test through the path `mpnn train` uses (TrainingReporter's merge
patch of the status subresource), authenticated as the trainer's ServiceAccount
bound to the chart's ClusterRole `mpnn-trainer`.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from partition_server.api.lookup import LookupTable
from partition_server.api.manifest import parse_neural_network, parse_training
from mpnn_operator.reconcile import manifest_view
from tests.support.kube.kubectl import Kubectl
from tests.support.kube.operator import (  # noqa: F401 (crds, operator: fixtures)
    ROOT, as_trainer, condition, crds, digits, events, nn, operator, token_kubeconfig, wait_ready,
)

pytestmark = pytest.mark.k8s

INSTALL_YAML = ROOT / "manifests" / "install.yaml"
TRAINER_RBAC = ROOT / "manifests" / "examples" / "trainer-rbac.yaml"
TRAINING = {"dataset": {"format": "digits"}, "epochs": 5, "batchSize": 64, "checkpointEvery": 20}


@pytest.fixture(scope="session")
def trainer_role(kubectl, crds):
    """The chart's ClusterRole mpnn-trainer, as install.yaml (generated from the chart) holds it."""
    (role,) = [d for d in yaml.safe_load_all(INSTALL_YAML.read_text())
               if d and d["kind"] == "ClusterRole" and d["metadata"]["name"] == "mpnn-trainer"]
    kubectl.apply(role)
    yield role
    kubectl("delete", "clusterrole", "mpnn-trainer", "--ignore-not-found", "--wait=false", check=False)


def jobs(kubectl, ns: str, network: str = "digits") -> list[dict]:
    return kubectl.json("get", "jobs", "-l", f"mpnn.dev/network={network}", namespace=ns)["items"]


def training(kubectl, ns: str, network: str = "digits") -> dict:
    return (kubectl.json("get", "nn", network, namespace=ns).get("status") or {}).get("training") or {}


def processed(op, what: str) -> int:
    """How often kopf has logged ``<what> is processed`` (Resuming, Updating, ...)."""
    return op.log_path.read_text().count(f"{what} is processed")


def only_job(kubectl, ns: str, name: str, wait_for) -> dict:
    def found():
        items = jobs(kubectl, ns)
        return items if [j["metadata"]["name"] for j in items] == [name] else None
    (job,) = wait_for(found, timeout=90, message=f"exactly the Job {name}")
    return job


def test_one_job_per_run(kubectl, namespace, operator, trainer_role, wait_for):
    ns = namespace
    kubectl("apply", "-f", str(TRAINER_RBAC), namespace=ns)
    kubectl.apply(digits(training={**TRAINING, "runId": "run-1"}), namespace=ns)
    obj = wait_ready(kubectl, ns, 4, wait_for, operator)
    job = only_job(kubectl, ns, "digits-train-run-1", wait_for)
    (ref,) = job["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("NeuralNetwork", "digits",
                                                                         obj["metadata"]["uid"], True)
    labels = job["metadata"]["labels"]
    assert labels["mpnn.dev/run"] == "run-1" and labels["app.kubernetes.io/managed-by"] == "mpnn-operator"
    assert labels["app.kubernetes.io/component"] == "training"
    status = training(kubectl, ns)
    # Pending until the trainer reports; kwok's pods finish at once, so the Job may be done already.
    assert (status["run"], status["job"]) == ("run-1", "digits-train-run-1")
    assert status["phase"] in ("Pending", "Succeeded"), status
    assert ("Normal", "TrainingStarted") in [(e["type"], e["reason"]) for e in events(kubectl, ns)]
    # kwok "runs" the pod: the Job completes without a report (no code ran), which the operator mirrors.
    wait_for(lambda: condition(kubectl.json("get", "job", "digits-train-run-1", namespace=ns),
                               "Complete").get("status") == "True", timeout=90, message="the Job to complete")
    status = wait_for(lambda: (lambda t: t if t.get("phase") == "Succeeded" else None)(training(kubectl, ns)),
                      timeout=30, message="status.training Succeeded, mirrored from the Job")
    assert status["message"] == "Job digits-train-run-1 completed; the trainer did not report its result"
    assert status["completionTime"].endswith("Z")
    uid = job["metadata"]["uid"]

    # Applying the same spec again, and restarting the operator, change nothing.
    kubectl.apply(digits(training={**TRAINING, "runId": "run-1"}), namespace=ns)
    time.sleep(2)
    before, resumed = nn(kubectl, ns)["metadata"]["resourceVersion"], processed(operator, "Resuming")
    operator.stop()
    operator.start()
    wait_for(lambda: processed(operator, "Resuming") > resumed, timeout=60,
             message="the restarted operator to resume")
    time.sleep(5)
    assert [j["metadata"]["uid"] for j in jobs(kubectl, ns)] == [uid]
    assert nn(kubectl, ns)["metadata"]["resourceVersion"] == before

    # A new runId: the old run's Job goes first, then the new run starts with a clean status.
    kubectl("patch", "nn", "digits", "--type=merge", "-p",
            json.dumps({"spec": {"training": {"runId": "run-2"}}}), namespace=ns)
    job = only_job(kubectl, ns, "digits-train-run-2", wait_for)
    assert job["metadata"]["labels"]["mpnn.dev/run"] == "run-2"
    wait_for(lambda: training(kubectl, ns).get("run") == "run-2", timeout=30, message="status.training of run-2")
    status = training(kubectl, ns)  # nothing of run-1 is left; run-2's Job may have completed already
    assert status in ({"run": "run-2", "job": "digits-train-run-2", "phase": "Pending",
                       "message": "starting Job digits-train-run-2; waiting for the trainer"},
                      {"run": "run-2", "job": "digits-train-run-2", "phase": "Succeeded",
                       "message": "Job digits-train-run-2 completed; the trainer did not report its result",
                       "completionTime": status.get("completionTime")}), status
    assert any(e["reason"] == "TrainingStopped" and "digits-train-run-1" in e["message"]
               for e in events(kubectl, ns))

    # Its Job deleted, a run is not started again, whatever reconciles the network.
    kubectl("delete", "job", "digits-train-run-2", "--wait=true", "--timeout=60s", namespace=ns)
    updates = processed(operator, "Updating")
    kubectl("annotate", "nn", "digits", "mpnn.test/poke=1", namespace=ns)
    wait_for(lambda: processed(operator, "Updating") > updates, timeout=60, message="a reconcile after the poke")
    time.sleep(2)
    assert jobs(kubectl, ns) == []
    # Stopped if it had not finished (docs/training.md); a finished run keeps its outcome.
    assert training(kubectl, ns)["phase"] in ("Stopped", "Succeeded")


def test_job_pod_runs_the_driver_and_the_trainer_reports_as_its_service_account(
        kubectl, kubeconfig, namespace, operator, trainer_role, wait_for, tmp_path):
    ns = namespace
    kubectl("apply", "-f", str(TRAINER_RBAC), namespace=ns)
    kubectl.apply(digits(training={**TRAINING, "runId": "run-1"}), namespace=ns)
    obj = wait_ready(kubectl, ns, 4, wait_for, operator)
    job = only_job(kubectl, ns, "digits-train-run-1", wait_for)

    # The Job's pod: the driver, pointed at the servers by the mounted lookup table.
    spec = job["spec"]
    assert spec["backoffLimit"] == 3
    pod_spec = spec["template"]["spec"]
    assert pod_spec["restartPolicy"] == "Never" and pod_spec["serviceAccountName"] == "mpnn-trainer"
    (c,) = pod_spec["containers"]
    assert c["command"] == ["mpnn", "train"] and c["args"][0] == "--training"
    assert c["args"][2:] == ["--report", "--namespace", ns]
    assert parse_training(json.loads(c["args"][1])) == parse_neural_network(manifest_view(obj)).training
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env == {"MPNN_LOOKUP": "/etc/mpnn/lookup.json", "MPNN_NETWORK": "/etc/mpnn/network.json",
                   "MPNN_MODEL_DIR": "/var/lib/mpnn/digits", "MPNN_PEER_KEY_FILE": "/var/run/mpnn/peer-key/key"}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    assert volumes[next(n for n, p in mounts.items() if p == "/etc/mpnn")]["configMap"]["name"] == "digits-lookup"
    # The trainer signs its peer calls with the network's key, from the operator's Secret.
    assert volumes[next(n for n, p in mounts.items() if p == "/var/run/mpnn/peer-key")]["secret"]["secretName"] \
        == "digits-peer-key"
    assert volumes[next(n for n, p in mounts.items() if p == "/var/lib/mpnn")]["persistentVolumeClaim"] == \
        {"claimName": "digits-model"}
    cm = kubectl.json("get", "configmap", "digits-lookup", namespace=ns)
    table = LookupTable.from_dict(json.loads(cm["data"]["lookup.json"]))
    # Lookup addresses name the peer port.
    assert table.addresses == tuple(f"digits-{i}.digits.{ns}.svc.cluster.local:50052" for i in range(4))
    # The Job controller made the pod, as the trainer's ServiceAccount (it exists).
    (pod,) = wait_for(lambda: kubectl.json("get", "pods", "-l", "batch.kubernetes.io/job-name=digits-train-run-1",
                                           namespace=ns)["items"], timeout=90, message="the Job's pod")
    assert pod["spec"]["serviceAccountName"] == "mpnn-trainer"
    assert pod["spec"]["containers"][0]["args"] == c["args"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "training"  # no Service selects it

    # The trainer's reports, as the trainer's ServiceAccount (bound by trainer-rbac.yaml).
    config = token_kubeconfig(kubectl, kubeconfig, ns, "mpnn-trainer", tmp_path / "trainer.kubeconfig")
    trainer_kubectl = Kubectl(kubectl.binary, config)
    assert trainer_kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}").stdout == \
        f"system:serviceaccount:{ns}:mpnn-trainer"

    report = as_trainer(config, ns)

    # kwok's pod exits at once and the operator mirrors the complete Job (no report came): wait
    # for that, so that the reports below, which a real trainer makes before its pod ends, come after.
    wait_for(lambda: training(kubectl, ns).get("phase") == "Succeeded", timeout=90,
             message="the complete Job mirrored into status.training")
    report("r.started()\nr.progress(epoch=3, step=150, loss=0.21, checkpoint=4, accuracy=0.9511)")
    status = training(kubectl, ns)
    assert {k: status.get(k) for k in ("run", "job", "phase", "epoch", "step", "loss", "checkpoint", "accuracy")} \
        == {"run": "run-1", "job": "digits-train-run-1", "phase": "Running", "epoch": 3, "step": 150,
            "loss": 0.21, "checkpoint": 4, "accuracy": 0.9511}
    assert status["startTime"].endswith("Z") and "message" not in status
    header, row = kubectl("get", "nn", "digits", namespace=ns).stdout.splitlines()
    cells = dict(zip(header.split(), row.split()))
    assert (cells["EPOCH"], cells["ACCURACY"], cells["PHASE"]) == ("3", "0.9511", "Ready")
    wide = kubectl("get", "nn", "digits", "-o", "wide", namespace=ns).stdout.splitlines()
    assert dict(zip(wide[0].split(), wide[1].split()))["TRAINING"] == "Running"

    report("r.finished(accuracy=0.9622, loss=0.15)")
    status = training(kubectl, ns)
    assert (status["phase"], status["accuracy"], status["message"]) == ("Succeeded", 0.9622,
                                                                         "held-out accuracy 0.9622")
    assert status["completionTime"] >= status["startTime"]

    # The trainer's identity writes the status, and nothing else.
    r = trainer_kubectl("patch", "nn", "digits", "--type=merge", "-p", '{"spec":{"partitions":2}}', namespace=ns,
                   check=False)
    assert r.returncode != 0 and "forbidden" in r.stderr.lower(), r.stderr
    assert nn(kubectl, ns)["spec"]["partitions"] == 4
    for verb, resource, where in (("get", "neuralnetworks.mpnn.dev", ns),  # reporting needs no read
                                  ("patch", "neuralnetworks.mpnn.dev", ns), ("delete", "neuralnetworks.mpnn.dev", ns),
                                  ("patch", "partitions.mpnn.dev/status", ns), ("create", "pods", ns),
                                  ("patch", "neuralnetworks.mpnn.dev/status", "default")):
        assert trainer_kubectl("auth", "can-i", verb, resource, namespace=where, check=False).stdout.strip() == "no", \
            (verb, resource, where)


def test_inference_service_selects_the_ready_servers(kubectl, namespace, operator, wait_for):
    ns = namespace
    kubectl.apply(digits(server={"port": 50051, "httpPort": 8080}), namespace=ns)
    obj = wait_ready(kubectl, ns, 4, wait_for, operator)
    svc = kubectl.json("get", "service", "digits-inference", namespace=ns)
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["clusterIP"] not in ("", "None")
    assert svc["spec"]["selector"] == kubectl.json("get", "statefulset", "digits",
                                                   namespace=ns)["spec"]["selector"]["matchLabels"]
    assert [(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [("grpc", 50051, "grpc"),
                                                                                     ("http", 8080, "http")]
    (ref,) = svc["metadata"]["ownerReferences"]
    assert ref["uid"] == obj["metadata"]["uid"]
    # The named target ports resolve on every ready server pod: the containers declare both.
    pods = {p["status"]["podIP"] for p in kubectl.json("get", "pods", "-l", obj["status"]["selector"],
                                                      namespace=ns)["items"]}

    def endpoints():
        slices = kubectl.json("get", "endpointslices", "-l", "kubernetes.io/service-name=digits-inference",
                              namespace=ns)["items"]
        ready = {a for s in slices for e in s.get("endpoints") or [] if (e.get("conditions") or {}).get("ready")
                 for a in e["addresses"]}
        ports = {(p["name"], p["port"]) for s in slices for p in s.get("ports") or []}
        return (ready, ports) if ready == pods and len(pods) == 4 else None

    _, ports = wait_for(endpoints, timeout=60, message="the inference Service's endpoints")
    assert ports == {("grpc", 50051), ("http", 8080)}


def test_training_that_cannot_start_says_why(kubectl, namespace, operator, wait_for):
    ns = namespace
    # Storage, but the trainer's ServiceAccount does not exist yet.
    kubectl.apply(digits(training={**TRAINING, "runId": "run-1", "serviceAccountName": "trainers"}), namespace=ns)
    # No storage: no Job at all.
    plain = digits(training={**TRAINING, "runId": "run-1"})
    plain["metadata"]["name"] = "plain"
    del plain["spec"]["storage"]
    kubectl.apply(plain, namespace=ns)

    blocked = wait_for(lambda: (lambda t: t if t.get("phase") == "Blocked" else None)(training(kubectl, ns)),
                       timeout=60, message="digits' run Blocked")
    assert blocked["message"].startswith(
        f"ServiceAccount trainers (spec.training.serviceAccountName) does not exist in namespace {ns}")
    assert len(jobs(kubectl, ns)) == 1  # it starts once the ServiceAccount exists
    status = wait_for(lambda: (lambda t: t if t.get("phase") == "Blocked" else None)(training(kubectl, ns, "plain")),
                      timeout=60, message="plain's run Blocked")
    assert status["message"].startswith("spec.training needs spec.storage") and jobs(kubectl, ns, "plain") == []
    warnings = {(e["involvedObject"]["name"], e["reason"]) for e in events(kubectl, ns) if e["type"] == "Warning"}
    assert warnings == {("digits", "TrainingBlocked"), ("plain", "TrainingBlocked")}, warnings

    kubectl("create", "serviceaccount", "trainers", namespace=ns)
    wait_for(lambda: training(kubectl, ns).get("phase") == "Pending", timeout=150,
             message="the run Pending once its ServiceAccount exists (the Job's pod created)")
    assert all(item["status"].get("phase") != "Degraded"
               for item in kubectl.json("get", "nn", namespace=ns)["items"])
