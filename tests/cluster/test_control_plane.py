"""Proof that the local control plane (tests/support/kube/cluster.py) is a real one:
scheduling onto kwok nodes, garbage collection, PV binding, CRD CEL rules,
TokenRequest and RBAC all go through the actual Kubernetes components."""

from __future__ import annotations

import uuid

import pytest

pytestmark = pytest.mark.k8s


def _ready(obj: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


def test_statefulset_pods_scheduled_on_kwok_nodes_and_ready(kubectl, namespace, wait_for):
    kubectl.apply(f"""
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: None
  selector: {{app: web}}
  ports: [{{port: 80}}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: web
spec:
  serviceName: web
  replicas: 3
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      containers:
      - name: web
        image: registry.k8s.io/pause:3.10
        resources:
          requests: {{cpu: 100m, memory: 64Mi}}
""", namespace=namespace)

    wait_for(lambda: kubectl.json("get", "statefulset", "web", namespace=namespace)
             .get("status", {}).get("readyReplicas") == 3,
             timeout=90, message="StatefulSet web to have 3 ready replicas")

    nodes = {n["metadata"]["name"]: n for n in kubectl.json("get", "nodes")["items"]}
    kwok_nodes = {name for name, n in nodes.items()
                  if n["metadata"].get("annotations", {}).get("kwok.x-k8s.io/node") == "fake"}
    assert len(kwok_nodes) >= 2 and all(_ready(nodes[n]) for n in kwok_nodes)

    pods = kubectl.json("get", "pods", "-l", "app=web", namespace=namespace)["items"]
    assert sorted(p["metadata"]["name"] for p in pods) == ["web-0", "web-1", "web-2"]
    for p in pods:
        assert p["spec"]["nodeName"] in kwok_nodes, p["spec"].get("nodeName")
        assert p["status"]["phase"] == "Running"
        assert _ready(p)
        assert p["status"].get("podIP")
        owner = p["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"]) == ("StatefulSet", "web")

    # The controller manager reacts to changes: scale down removes web-2.
    kubectl("scale", "statefulset", "web", "--replicas=2", namespace=namespace)
    wait_for(lambda: [p["metadata"]["name"] for p in
                      kubectl.json("get", "pods", "-l", "app=web", namespace=namespace)["items"]]
             == ["web-0", "web-1"], timeout=60, message="scale down to web-0, web-1")


def test_garbage_collection_through_owner_references(kubectl, namespace, wait_for):
    # Deployment -> ReplicaSet -> Pods, all linked by ownerReferences.
    kubectl("create", "deployment", "gc", "--image=registry.k8s.io/pause:3.10", "--replicas=2",
            namespace=namespace)
    wait_for(lambda: kubectl.json("get", "deployment", "gc", namespace=namespace)
             .get("status", {}).get("readyReplicas") == 2, timeout=90, message="deployment gc ready")
    assert kubectl.json("get", "replicasets", "-l", "app=gc", namespace=namespace)["items"]

    # A hand-made ownerReference to a ConfigMap is honoured as well.
    owner_uid = kubectl.json("get", "deployment", "gc", namespace=namespace)["metadata"]["uid"]
    kubectl.apply({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "gc-child", "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "Deployment", "name": "gc", "uid": owner_uid}]},
        "data": {"k": "v"},
    }, namespace=namespace)

    kubectl("delete", "deployment", "gc", "--cascade=background", "--wait=false", namespace=namespace)

    def all_gone():
        rs = kubectl.json("get", "replicasets", "-l", "app=gc", namespace=namespace)["items"]
        pods = kubectl.json("get", "pods", "-l", "app=gc", namespace=namespace)["items"]
        cm = kubectl("get", "configmap", "gc-child", namespace=namespace, check=False)
        return not rs and not pods and cm.returncode != 0 and "NotFound" in cm.stderr

    wait_for(all_gone, timeout=90, message="ReplicaSet, Pods and ConfigMap to be garbage-collected")


def test_pvc_binds_to_readwritemany_nfs_pv(kubectl, namespace, wait_for):
    pv = f"nfs-{namespace}"
    storage_class = f"nfs-{uuid.uuid4().hex[:8]}"  # unique: no other claim can take this PV
    kubectl.apply({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": pv},
        "spec": {
            "capacity": {"storage": "5Gi"},
            "accessModes": ["ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": storage_class,
            "nfs": {"server": "nfs.example.invalid", "path": "/exports/models"},
        },
    })
    try:
        kubectl.apply({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "models"},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": storage_class,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }, namespace=namespace)

        pvc = wait_for(lambda: (lambda c: c if c.get("status", {}).get("phase") == "Bound" else None)(
            kubectl.json("get", "pvc", "models", namespace=namespace)),
            timeout=60, message="PVC models to be Bound")
        assert pvc["spec"]["volumeName"] == pv
        assert pvc["status"]["accessModes"] == ["ReadWriteMany"]
        assert pvc["status"]["capacity"]["storage"] == "5Gi"
        bound = kubectl.json("get", "pv", pv)
        assert bound["status"]["phase"] == "Bound"
        assert bound["spec"]["claimRef"]["namespace"] == namespace
        assert bound["spec"]["claimRef"]["name"] == "models"
    finally:
        kubectl("delete", "pvc", "models", "--ignore-not-found", "--wait=false",
                namespace=namespace, check=False)
        kubectl("delete", "pv", pv, "--ignore-not-found", "--wait=false", check=False)


def test_crd_cel_validation_rule_rejects_invalid_object(kubectl, namespace, wait_for):
    group = f"t{uuid.uuid4().hex[:8]}.mpnn.test"
    crd = f"widgets.{group}"
    message = "minReplicas must not exceed maxReplicas"
    kubectl.apply({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": crd},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"spec": {
                        "type": "object",
                        "properties": {"minReplicas": {"type": "integer"},
                                       "maxReplicas": {"type": "integer"}},
                        "x-kubernetes-validations": [{
                            "rule": "self.minReplicas <= self.maxReplicas", "message": message}],
                    }},
                }},
            }],
        },
    })
    try:
        kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")

        def widget(name: str, lo: int, hi: int) -> dict:
            return {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": name},
                    "spec": {"minReplicas": lo, "maxReplicas": hi}}

        # Discovery of the new group can lag a moment behind Established.
        wait_for(lambda: kubectl.apply(widget("good", 1, 3), namespace=namespace, check=False)
                 .returncode == 0, timeout=30, message="valid Widget to be accepted")

        bad = kubectl.apply(widget("bad", 5, 2), namespace=namespace, check=False)
        assert bad.returncode != 0
        assert message in bad.stderr, bad.stderr
        assert "Invalid value" in bad.stderr, bad.stderr
        assert kubectl("get", "widgets", "bad", namespace=namespace, check=False).returncode != 0
    finally:
        kubectl("delete", "crd", crd, "--ignore-not-found", "--wait=false", check=False)


def test_token_request_and_rbac(kubectl, namespace):
    # TokenRequest works (service-account signing key is configured) ...
    token = kubectl("create", "token", "default", namespace=namespace).stdout.strip()
    assert token.count(".") == 2  # a JWT
    # ... and RBAC is enforced: a fresh service account may not create pods ...
    sa = f"system:serviceaccount:{namespace}:default"
    r = kubectl("auth", "can-i", "create", "pods", f"--as={sa}", namespace=namespace, check=False)
    assert r.stdout.strip() == "no"
    # ... until a RoleBinding grants it.
    kubectl("create", "rolebinding", "edit", "--clusterrole=edit", f"--serviceaccount={namespace}:default",
            namespace=namespace)
    r = kubectl("auth", "can-i", "create", "pods", f"--as={sa}", namespace=namespace, check=False)
    assert r.stdout.strip() == "yes"
