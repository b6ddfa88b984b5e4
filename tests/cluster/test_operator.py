"""The operator against the real local control plane (tests/support/kube): kube-apiserver,
controller-manager, scheduler and kwok nodes where the partition server pods turn
Running and Ready. The operator runs as a subprocess (`mpnn operator`) watching only
the test's namespace, and is always stopped at teardown."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time

import pytest
import yaml

from partition_server.api.coverage import check_coverage
from tests.support.kube.operator import (  # noqa: F401 (crds, operator: fixtures)
    CHILD_KINDS, NFS, ROOT, SELECTOR, Operator, assert_partitions_match, condition, crds, digits, events, lookup,
    nn, operator, partitions, resource_versions, token_kubeconfig, wait_ready,
)

pytestmark = pytest.mark.k8s

def test_create_deploys_ready_partition_servers(kubectl, namespace, operator, wait_for):
    ns = namespace
    kubectl.apply(digits(), namespace=ns)
    obj = wait_ready(kubectl, ns, 4, wait_for, operator)
    uid = obj["metadata"]["uid"]

    table = lookup(kubectl, ns)
    assert table.num_partitions == 4 and table.layer_units == (128, 64, 10)
    assert check_coverage(table.layer_units, table.owners_by_layer) == []
    assert table.addresses[2] == f"digits-2.digits.{ns}.svc.cluster.local:50052"  # the peer port
    assert obj["status"]["lookupVersion"] == table.version
    assert obj["status"]["selector"] == "app.kubernetes.io/component=server,mpnn.dev/network=digits"
    assert_partitions_match(kubectl, ns, table)

    for kind in CHILD_KINDS:
        items = kubectl.json("get", kind, "-l", SELECTOR, namespace=ns)["items"]
        assert items, kind
        for item in items:
            (ref,) = item["metadata"]["ownerReferences"]
            assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("NeuralNetwork", "digits", uid, True)

    svc = kubectl.json("get", "service", "digits", namespace=ns)
    assert svc["spec"]["clusterIP"] == "None"
    pvc = kubectl.json("get", "pvc", "digits-model", namespace=ns)
    assert pvc["status"]["phase"] == "Bound" and pvc["spec"]["volumeName"] == f"mpnn.{ns}.digits"
    pv = kubectl.json("get", "pv", f"mpnn.{ns}.digits")
    assert pv["status"]["phase"] == "Bound" and pv["spec"]["nfs"] == NFS["nfs"]
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    sts = kubectl.json("get", "statefulset", "digits", namespace=ns)
    assert sts["spec"]["replicas"] == 4 and sts["status"]["readyReplicas"] == 4
    pods = kubectl.json("get", "pods", "-l", obj["status"]["selector"], namespace=ns)["items"]
    assert sorted(p["metadata"]["name"] for p in pods) == [f"digits-{i}" for i in range(4)]
    assert all(condition(p, "Ready").get("status") == "True" for p in pods)

    wait_for(lambda: all((p.get("status") or {}).get("ready") for p in partitions(kubectl, ns)),
             timeout=60, message="every Partition to report its pod ready")
    assert [p["status"]["neurons"] for p in partitions(kubectl, ns)] == [51, 51, 50, 50]

    header, row = kubectl("get", "nn", namespace=ns).stdout.splitlines()
    assert header.split() == ["NAME", "PARTITIONS", "READY", "STRATEGY", "PHASE", "EPOCH", "ACCURACY", "AGE"]
    assert row.split()[:5] == ["digits", "4", "4", "balanced", "Ready"]
    assert len(row.split()) == 6  # no training: EPOCH and ACCURACY are blank
    listed = kubectl("get", "mpnn", "-o", "name", namespace=ns).stdout.split()
    assert "neuralnetwork.mpnn.dev/digits" in listed and "partition.mpnn.dev/digits-3" in listed
    assert obj["status"]["placement"] == "strategy"
    reasons = [(e["type"], e["reason"]) for e in events(kubectl, ns)]
    assert ("Normal", "Distributed") in reasons
    assert not [r for r in reasons if r[0] == "Warning" or r[1] == "Repartitioned"], reasons


def settled_digits(kubectl, ns: str, operator, wait_for) -> None:
    """The digits network applied, Ready, every Partition reporting its pod ready, status writes done."""
    kubectl.apply(digits(), namespace=ns)
    wait_ready(kubectl, ns, 4, wait_for, operator)
    wait_for(lambda: all((p.get("status") or {}).get("ready") for p in partitions(kubectl, ns)),
             timeout=60, message="every Partition to report its pod ready")
    time.sleep(2)  # let the last status writes settle


def test_restart_changes_no_children(kubectl, namespace, operator, wait_for):
    ns = namespace
    settled_digits(kubectl, ns, operator, wait_for)
    before = resource_versions(kubectl, ns)
    nn_before = nn(kubectl, ns)["metadata"]["resourceVersion"]
    operator.stop()
    operator.start()
    wait_for(lambda: "Resuming is processed" in operator.tail(400),
             timeout=60, message="the restarted operator to resume digits")
    time.sleep(5)
    assert resource_versions(kubectl, ns) == before
    assert nn(kubectl, ns)["metadata"]["resourceVersion"] == nn_before


def test_scale_with_kubectl_scale(kubectl, namespace, operator, wait_for):
    ns = namespace
    kubectl.apply(digits(), namespace=ns)
    wait_ready(kubectl, ns, 4, wait_for, operator)
    versions = {lookup(kubectl, ns).version}
    for n in (6, 3):
        kubectl("scale", "nn/digits", f"--replicas={n}", namespace=ns)
        obj = wait_ready(kubectl, ns, n, wait_for, operator)
        table = lookup(kubectl, ns)
        assert table.num_partitions == n and table.version not in versions
        versions.add(table.version)
        assert obj["status"]["lookupVersion"] == table.version
        assert kubectl.json("get", "statefulset", "digits", namespace=ns)["spec"]["replicas"] == n
        assert_partitions_match(kubectl, ns, table)
        scale = json.loads(kubectl("get", "--raw",
                                   f"/apis/mpnn.dev/v1alpha1/namespaces/{ns}/neuralnetworks/digits/scale").stdout)
        assert scale["spec"]["replicas"] == n and scale["status"]["replicas"] == n
    reasons = [(e["type"], e["reason"]) for e in events(kubectl, ns)]
    assert reasons.count(("Normal", "Scaled")) >= 2
    # The operator's own Partition writes while scaling are never taken for hand edits.
    assert not [r for r in reasons if r[0] == "Warning" or r[1] == "Repartitioned"], reasons
    assert nn(kubectl, ns)["status"]["placement"] == "strategy"


def test_scale_refused_when_the_strategy_lists_do_not_fit(kubectl, namespace, crds):
    kubectl.apply(digits(distribution={"strategy": "count", "counts": [51, 51, 50, 50]}), namespace=namespace)
    r = kubectl("scale", "nn/digits", "--replicas=5", namespace=namespace, check=False)
    assert r.returncode != 0
    assert "spec.distribution.counts must have one entry per partition" in r.stderr, r.stderr
    assert nn(kubectl, namespace)["spec"]["partitions"] == 4


def test_manual_move_in_two_edits(kubectl, namespace, operator, wait_for):
    ns = namespace
    kubectl.apply(digits(), namespace=ns)
    wait_ready(kubectl, ns, 4, wait_for, operator)
    first = lookup(kubectl, ns)
    assert partitions(kubectl, ns)[0]["spec"]["ranges"] == ["0:0-31", "1:0-15", "2:0-2"]

    # Edit 1: partition 0 gives up 0:0-3, nobody owns those neurons yet.
    kubectl("patch", "partitions.mpnn.dev", "digits-0", "--type=merge",
            "-p", json.dumps({"spec": {"ranges": ["0:4-31", "1:0-15", "2:0-2"]}}), namespace=ns)
    obj = wait_for(lambda: (lambda o: o if condition(o, "Degraded").get("status") == "True" else None)(nn(kubectl, ns)),
                   timeout=60, message="Degraded condition after the first edit")
    degraded = condition(obj, "Degraded")
    assert degraded["reason"] == "InconsistentPartitions"
    assert "neurons 0:0-3 owned by no partition" in degraded["message"]
    assert lookup(kubectl, ns) == first and obj["status"]["lookupVersion"] == first.version
    assert any(e["reason"] == "InconsistentPartitions" and e["type"] == "Warning" for e in events(kubectl, ns))

    # Edit 2: partition 1 takes them: consistent again, a new lookup version.
    kubectl("patch", "partitions.mpnn.dev", "digits-1", "--type=merge",
            "-p", json.dumps({"spec": {"ranges": ["0:0-3", "0:32-63", "1:16-31", "2:3-5"]}}), namespace=ns)
    wait_for(lambda: nn(kubectl, ns)["status"].get("lookupVersion") != first.version,
             timeout=60, message="a new lookup version after the second edit")
    obj = wait_ready(kubectl, ns, 4, wait_for, operator)
    table = lookup(kubectl, ns)
    assert table.version == obj["status"]["lookupVersion"] != first.version
    assert [table.owner_of(0, u) for u in (0, 3, 4, 32)] == [1, 1, 0, 1]
    assert condition(obj, "Degraded")["status"] == "False" and obj["status"]["placement"] == "manual"
    assert_partitions_match(kubectl, ns, table)


def test_invalid_spec_leaves_the_deployment_untouched(kubectl, namespace, operator, wait_for):
    ns = namespace
    settled_digits(kubectl, ns, operator, wait_for)
    before = resource_versions(kubectl, ns)
    # Accepted by the schema (layer indices are not cross-checked there), refused by the model.
    kubectl.apply(digits(distribution={"strategy": "layers", "layers": [[0], [1], [2], [9]]}), namespace=ns)
    obj = wait_for(lambda: (lambda o: o if condition(o, "Degraded").get("reason") == "InvalidSpec" else None)(
        nn(kubectl, ns)), timeout=60, message="Degraded InvalidSpec")
    message = condition(obj, "Degraded")["message"]
    assert "spec.distribution.layers[3][0]" in message and "9" in message
    assert condition(obj, "Degraded")["observedGeneration"] == obj["metadata"]["generation"]
    assert obj["status"]["phase"] == "Degraded"
    assert any(e["reason"] == "InvalidSpec" and e["type"] == "Warning" for e in events(kubectl, ns))
    time.sleep(2)
    assert resource_versions(kubectl, ns) == before


@pytest.mark.parametrize("spec, message", [
    ({"distribution": {"strategy": "percentage", "percentages": [30, 30, 20, 10]}},
     "spec.distribution.percentages must sum to 100"),
    ({"distribution": {"strategy": "count", "counts": [101, 101]}},
     "spec.distribution.counts must have one entry per partition"),
    ({"distribution": {"strategy": "count", "counts": [50, 50, 50, 50]}},
     "spec.distribution.counts must sum to the number of neurons"),
    ({"storage": {"nfs": NFS["nfs"], "existingClaim": "models"}},
     "spec.storage: set exactly one of nfs and existingClaim"),
    ({"partitions": 300}, "spec.partitions must be at most the number of neurons"),
    ({"server": {"port": 8000, "httpPort": 8000}}, "spec.server.httpPort must differ from spec.server.port"),
    ({"model": {"inputs": 64, "layers": [{"units": 10, "activation": "softmax"}, {"units": 10}]}},
     "spec.model.layers: softmax is allowed on the last layer only"),
], ids=["percentages-90", "counts-length", "counts-sum", "both-storages", "too-many-partitions", "same-ports",
        "softmax"])
def test_invalid_resources_are_refused_by_the_api_server(kubectl, namespace, crds, spec, message):
    r = kubectl.apply(digits(**spec), namespace=namespace, check=False)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert kubectl("get", "nn", "digits", namespace=namespace, check=False).returncode != 0


def test_a_name_ending_in_inference_is_refused(kubectl, namespace, crds):
    doc = digits()
    doc["metadata"]["name"] = "digits-inference"  # would hold the Service name of network digits' inference
    r = kubectl.apply(doc, namespace=namespace, check=False)
    assert r.returncode != 0 and "metadata.name must not end in '-inference'" in r.stderr, r.stderr


def test_partition_ranges_with_huge_numbers_are_refused(kubectl, namespace, crds):
    part = {"apiVersion": "mpnn.dev/v1alpha1", "kind": "Partition", "metadata": {"name": "digits-0"},
            "spec": {"network": "digits", "index": 0, "ranges": ["0:0-31", "2:5-99999999999999999999999999"]}}
    r = kubectl.apply(part, namespace=namespace, check=False)
    assert r.returncode != 0 and "spec.ranges[1]" in r.stderr, r.stderr


def test_storage_cannot_change_in_place(kubectl, namespace, crds):
    kubectl.apply(digits(), namespace=namespace)
    r = kubectl.apply(digits(storage={"nfs": {"server": "10.0.0.2", "path": "/exports/mpnn"}}),
                      namespace=namespace, check=False)
    assert r.returncode != 0 and "spec.storage is immutable" in r.stderr, r.stderr
    # Nor removed: the servers would move onto emptyDirs and the volume would be pruned.
    r = kubectl("patch", "nn", "digits", "--type=json", "-p", '[{"op": "remove", "path": "/spec/storage"}]',
                namespace=namespace, check=False)
    assert r.returncode != 0 and "spec.storage is immutable: it cannot be added or removed" in r.stderr, r.stderr
    assert nn(kubectl, namespace)["spec"]["storage"]["nfs"] == NFS["nfs"]


def test_storage_cannot_be_added(kubectl, namespace, crds):
    plain = digits()
    del plain["spec"]["storage"]
    kubectl.apply(plain, namespace=namespace)
    r = kubectl("patch", "nn", "digits", "--type=merge", "-p", json.dumps({"spec": {"storage": NFS}}),
                namespace=namespace, check=False)
    assert r.returncode != 0 and "spec.storage is immutable: it cannot be added or removed" in r.stderr, r.stderr
    assert "storage" not in nn(kubectl, namespace)["spec"]


def test_a_claim_deleted_by_hand_is_made_again_and_bound(kubectl, namespace, operator, wait_for):
    ns = namespace
    kubectl.apply(digits(), namespace=ns)
    wait_ready(kubectl, ns, 4, wait_for, operator)
    old = kubectl.json("get", "pvc", "digits-model", namespace=ns)
    pv = kubectl.json("get", "pv", f"mpnn.{ns}.digits")
    ref = pv["spec"]["claimRef"]  # bound in advance by name, completed by the PersistentVolume controller
    assert (ref["namespace"], ref["name"], ref["uid"]) == (ns, "digits-model", old["metadata"]["uid"])
    kubectl("delete", "pvc", "digits-model", "--wait=false", namespace=ns)
    # The claim goes once no scheduled pod uses it; the new pods cannot be scheduled onto a deleted claim.
    kubectl("delete", "pods", "-l", SELECTOR, "--wait=false", namespace=ns)

    def rebound():
        claim = kubectl.json("get", "pvc", "digits-model", namespace=ns, check=False) if kubectl(
            "get", "pvc", "digits-model", namespace=ns, check=False).returncode == 0 else None
        if claim and claim["metadata"]["uid"] != old["metadata"]["uid"] and claim["status"].get("phase") == "Bound":
            return claim
        return None

    claim = wait_for(rebound, timeout=120, message="a new claim digits-model, Bound")
    pv = kubectl.json("get", "pv", f"mpnn.{ns}.digits")
    assert pv["spec"]["claimRef"]["uid"] == claim["metadata"]["uid"] and pv["status"]["phase"] == "Bound"
    obj = wait_ready(kubectl, ns, 4, wait_for, operator)
    assert condition(obj, "Degraded")["status"] == "False"
    assert any(e["reason"] == "VolumeRecreated" for e in events(kubectl, ns)), operator.tail()


def test_peer_key_secret_network_policy_and_split_services(kubectl, namespace, operator, wait_for, tmp_path):
    """Issue 10 on live objects: the peer-key Secret (owned, 32 random bytes, never rewritten),
    mounted by the servers; the NetworkPolicy keeping the peer port to the network's pods and
    removed by ``networkPolicy: false``; the peer port only in the headless Service. And
    ``mpnn render`` of the same manifest shows the policy and the Secret reference, never the Secret."""
    ns = namespace
    doc = digits()
    kubectl.apply(doc, namespace=ns)
    uid = wait_ready(kubectl, ns, 4, wait_for, operator)["metadata"]["uid"]
    peer, grpc, http = 50052, 50051, 8080

    secret = kubectl.json("get", "secret", "digits-peer-key", namespace=ns)
    (ref,) = secret["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == ("NeuralNetwork", "digits", uid, True)
    assert secret["type"] == "Opaque" and list(secret["data"]) == ["key"]
    assert len(base64.b64decode(secret["data"]["key"])) == 32

    pod = kubectl.json("get", "statefulset", "digits", namespace=ns)["spec"]["template"]["spec"]
    (vol,) = [v for v in pod["volumes"] if (v.get("secret") or {}).get("secretName") == "digits-peer-key"]
    (server,) = [c for c in pod["containers"] if c["name"] == "server"] or pod["containers"][:1]
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    assert mounts[vol["name"]]["mountPath"] == "/var/run/mpnn/peer-key" and mounts[vol["name"]]["readOnly"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports.get("peer") == peer and peer not in (ports.get("grpc"), ports.get("http"))
    grpc, http = ports["grpc"], ports["http"]

    headless = kubectl.json("get", "service", "digits", namespace=ns)["spec"]
    assert headless["clusterIP"] == "None"
    assert [(p["name"], p["port"]) for p in headless["ports"]] == [("peer", peer)]
    inference = kubectl.json("get", "service", "digits-inference", namespace=ns)["spec"]
    assert sorted((p["name"], p["port"]) for p in inference["ports"]) == [("grpc", grpc), ("http", http)]
    assert not [p for p in inference["ports"] if peer in (p["port"], p.get("targetPort"))
                or p.get("targetPort") == "peer"]

    policy = kubectl.json("get", "networkpolicy", "digits-peers", namespace=ns)
    (ref,) = policy["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["uid"], ref["controller"]) == ("NeuralNetwork", uid, True)
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"]["mpnn.dev/network"] == "digits"
    assert spec["policyTypes"] == ["Ingress"]
    by_port = {}
    for rule in spec["ingress"]:
        for p in rule["ports"]:
            by_port.setdefault(p["port"], []).append(rule.get("from"))
    assert set(by_port) == {peer, grpc, http}, spec
    assert by_port[peer] == [[{"podSelector": {"matchLabels": {"mpnn.dev/network": "digits"}}}]], spec
    assert by_port[grpc] == [None] and by_port[http] == [None], spec  # from anywhere

    # A later reconcile (a scale) keeps the key: rotating it would cut running pods off each other.
    kubectl("scale", "nn/digits", "--replicas=5", namespace=ns)
    wait_ready(kubectl, ns, 5, wait_for, operator)
    again = kubectl.json("get", "secret", "digits-peer-key", namespace=ns)
    assert again["metadata"]["resourceVersion"] == secret["metadata"]["resourceVersion"]
    assert again["data"] == secret["data"]

    kubectl("patch", "nn", "digits", "--type=merge", "-p", json.dumps({"spec": {"server": {"networkPolicy": False}}}),
            namespace=ns)
    wait_for(lambda: not kubectl.json("get", "networkpolicy", "-l", SELECTOR, namespace=ns)["items"],
             timeout=60, message="the NetworkPolicy to be deleted")
    wait_ready(kubectl, ns, 5, wait_for, operator)
    assert kubectl.json("get", "secret", "digits-peer-key", namespace=ns)["data"] == secret["data"]

    # `mpnn render` of the same manifest: the policy and the Secret reference, never the Secret.
    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(doc))
    r = subprocess.run([sys.executable, "-m", "partition_server.cli", "render", str(path), "--namespace", ns],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    rendered = list(yaml.safe_load_all(r.stdout))
    kinds = [o["kind"] for o in rendered]
    assert "Secret" not in kinds and "kind: Secret" not in r.stdout
    (rpolicy,) = [o for o in rendered if o["kind"] == "NetworkPolicy"]
    assert rpolicy["metadata"]["name"] == "digits-peers" and rpolicy["spec"] == spec
    (rsts,) = [o for o in rendered if o["kind"] == "StatefulSet"]
    assert vol in rsts["spec"]["template"]["spec"]["volumes"]
    rsvc = {o["metadata"]["name"]: o["spec"] for o in rendered if o["kind"] == "Service"}
    assert [p["port"] for p in rsvc["digits"]["ports"]] == [peer]
    assert sorted(p["port"] for p in rsvc["digits-inference"]["ports"]) == sorted([grpc, http])


def test_delete_removes_every_child(kubectl, namespace, operator, wait_for):
    ns = namespace
    kubectl.apply(digits(), namespace=ns)
    wait_ready(kubectl, ns, 4, wait_for, operator)
    # Partitions; ConfigMap, the two Services, StatefulSet, PVC; PV
    assert len(resource_versions(kubectl, ns)) == 4 + 5 + 1
    kubectl("delete", "nn", "digits", "--timeout=60s", namespace=ns)

    def gone():
        left = resource_versions(kubectl, ns)
        pods = kubectl.json("get", "pods", "-l", "mpnn.dev/network=digits", namespace=ns)["items"]
        return not left and not pods

    wait_for(gone, timeout=120, message="every child of digits to be deleted")


def _documented_rules() -> list[dict]:
    """The permission table of docs/operator.md as RBAC rules (keeps the doc honest)."""
    text = (ROOT / "docs" / "operator.md").read_text().split("## Permissions", 1)[1].split("\n## ", 1)[0]
    rules = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        groups = [g.strip("`").replace('""', "") for g in cells[0].split(", ")]
        resources = [r.split("`")[1] for r in cells[1].split(", ")]
        verbs = [v.strip() for v in cells[2].split("(")[0].split(",")]
        rules.append({"apiGroups": groups, "resources": resources, "verbs": verbs})
    assert len(rules) >= 8, rules
    return rules


def test_documented_permissions_suffice(kubectl, kubeconfig, namespace, crds, wait_for, tmp_path):
    ns, name = namespace, f"mpnn-operator-{namespace}"
    kubectl.apply([
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "mpnn-operator", "namespace": ns}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
         "rules": _documented_rules()},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": "mpnn-operator", "namespace": ns}]},
    ])
    try:
        config = token_kubeconfig(kubectl, kubeconfig, ns, "mpnn-operator", tmp_path / "operator.kubeconfig")
        op = Operator(config, tmp_path / "operator.log", [ns]).start()
        try:
            # With training: the operator creates its Job and looks for the trainer's ServiceAccount.
            kubectl.apply(digits(training={"runId": "perm-1"}), namespace=ns)
            wait_ready(kubectl, ns, 4, wait_for, op)
            wait_for(lambda: kubectl.json("get", "jobs", "-l", SELECTOR, namespace=ns)["items"], timeout=60,
                     message="the training Job")
            # The servers' disruption budget follows the run: none evicted while it can train (Pending,
            # Running), one at a time while it cannot (Blocked here: no trainer ServiceAccount).

            def budget_follows_the_run():
                phase = (kubectl.json("get", "nn", "digits", namespace=ns).get("status") or {}).get(
                    "training", {}).get("phase")
                pdb = kubectl.json("get", "poddisruptionbudget", "digits", namespace=ns)
                want = 0 if phase in ("Pending", "Running") else 1
                return phase and pdb["spec"]["maxUnavailable"] == want and \
                    (pdb.get("status") or {}).get("expectedPods") == 4
            wait_for(budget_follows_the_run, timeout=60, message="the disruption budget to follow the run")
            kubectl("scale", "nn/digits", "--replicas=5", namespace=ns)
            wait_ready(kubectl, ns, 5, wait_for, op)
            assert any(e["reason"] == "Scaled" for e in events(kubectl, ns)), op.tail()
            kubectl("delete", "nn", "digits", "--timeout=60s", namespace=ns)
            wait_for(lambda: not resource_versions(kubectl, ns), timeout=120, message="children deleted")
            assert "Forbidden" not in op.log_path.read_text() and "403" not in op.log_path.read_text(), op.tail()
        finally:
            op.stop()
            print(f"--- operator log ---\n{op.tail(200)}")
    finally:
        kubectl("delete", "clusterrolebinding,clusterrole", name, "--ignore-not-found", check=False)
