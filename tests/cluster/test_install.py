"""Both install paths against the real control plane (tests/support/kube), and the operator
running with exactly the permissions they grant.

- manifests/install.yaml and Helm's renderings of the chart pass a server-side
  dry run, then apply; the operator Deployment's pod is admitted in a namespace
  enforcing the restricted Pod Security Standard (its pod runs on a kwok node).
- A real ``helm install`` / ``upgrade`` / ``uninstall`` through helm-python-sdk.
- The operator (``mpnn operator``, a subprocess) authenticates as the chart's
  ServiceAccount with a token from ``kubectl create token`` (never the admin
  identity) and runs create, scale and delete of a NeuralNetwork with NFS storage,
  cluster-wide (install.yaml's ClusterRole) and per namespace (the chart's Roles),
  while its log shows no RBAC denial. Every example reconciles to Ready that way.
- ``kubectl auth can-i --as=system:serviceaccount:...`` shows what it cannot do.
"""

from __future__ import annotations

import json
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.support.kube.kubectl import Kubectl
from tests.support.chart import CHART, EXAMPLES, INSTALL_YAML, example_documents, objects, render
from tests.support.kube.operator import (
    Operator, apply_crds, assert_partitions_match, condition, digits, lookup, partitions, resource_versions,
    running_operator, token_kubeconfig, wait_ready,
)

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (a dev dependency) is not installed")

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_NS, SYSTEM_SA = "mpnn-system", "mpnn-operator"
CLUSTER_SCOPED_KINDS = ("ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy",
                        "ValidatingAdmissionPolicyBinding")


# -- helpers -----------------------------------------------------------------------------


def as_list(objs: list[dict[str, Any]]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": objs})


def delete_networks(kubectl, namespace: str, wait_for) -> None:
    """Delete every NeuralNetwork of ``namespace`` while the operator still runs (its
    finalizer would otherwise hold them, and the namespace, forever)."""
    kubectl("delete", "neuralnetworks.mpnn.dev", "--all", "--wait=false", namespace=namespace, check=False)
    wait_for(lambda: not kubectl.json("get", "neuralnetworks.mpnn.dev", namespace=namespace)["items"],
             timeout=90, message=f"NeuralNetworks in {namespace} to be deleted")


@pytest.fixture(scope="session")
def install_crds(kubectl) -> None:
    """The chart's CRDs (byte-identical to crds/, see test_helm.py), established and discoverable."""
    apply_crds(kubectl, CHART / "crds")


@pytest.fixture(scope="session")
def uninstall_at_end(kubectl) -> Iterator[None]:
    """At session end, delete what install.yaml created except the CRDs (other tests share them)."""
    yield
    for doc in yaml.safe_load_all(INSTALL_YAML.read_text()):
        if doc and doc["kind"] in CLUSTER_SCOPED_KINDS:
            kubectl("delete", doc["kind"].lower(), doc["metadata"]["name"], "--ignore-not-found", "--wait=false",
                    check=False)
    kubectl("delete", "namespace", SYSTEM_NS, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture(scope="session")
def installed(kubectl, install_crds, uninstall_at_end) -> None:
    """manifests/install.yaml applied (the operator's pod then "runs" on a kwok node; it
    reconciles nothing)."""
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(INSTALL_YAML))


@pytest.fixture
def other_namespace(kubectl, wait_for) -> Iterator[str]:
    """A second fresh namespace (where the operator itself is installed)."""
    name = f"t-ops-{uuid.uuid4().hex[:8]}"
    kubectl.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    wait_for(lambda: kubectl("get", "serviceaccount", "default", namespace=name, check=False).returncode == 0,
             timeout=60, message=f"ServiceAccount default in {name}")
    yield name
    kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@contextmanager
def applied_chart(kubectl, values: dict[str, Any] | None, release: str, namespace: str) -> Iterator[list[dict]]:
    """Helm's rendering of the chart, applied server-side; cluster-scoped objects deleted afterwards.
    The trainer ClusterRole is named after the release, leaving install.yaml's ``mpnn-trainer`` alone."""
    values = {**(values or {}), "rbac": {"trainerClusterRole": f"{release}-mpnn-trainer"}}
    objs = objects(render(values, name=release, namespace=namespace))
    kubectl("apply", "--server-side", "-f", "-", input=as_list(objs))
    try:
        yield objs
    finally:
        for o in objs:
            if o["kind"] in CLUSTER_SCOPED_KINDS:
                kubectl("delete", o["kind"].lower(), o["metadata"]["name"], "--ignore-not-found", check=False)


def service_account_of(objs: list[dict[str, Any]]) -> tuple[str, str]:
    (sa,) = [o for o in objs if o["kind"] == "ServiceAccount"]
    return sa["metadata"]["namespace"], sa["metadata"]["name"]


def can_i(kubectl, user: str, verb: str, resource: str, namespace: str | None = None) -> bool:
    args = ["auth", "can-i", verb, resource, f"--as={user}"]
    args.append(f"--namespace={namespace}" if namespace else "--all-namespaces")
    r = kubectl(*args, check=False)
    assert r.stdout.strip() in ("yes", "no"), (r.stdout, r.stderr)
    return r.stdout.strip() == "yes"


# -- dry runs and applies -------------------------------------------------------------------


def test_install_yaml_dry_run_then_apply(kubectl, install_crds, uninstall_at_end):
    docs = [d for d in yaml.safe_load_all(INSTALL_YAML.read_text()) if d]
    # From scratch, the cluster-scoped objects (Namespace, CRDs, ClusterRole/Binding) pass a
    # dry run on their own; the namespaced ones need the namespace to exist first (the
    # NamespaceLifecycle admission rejects them even in a dry run). A plain apply does that
    # in one go: kubectl applies the file in order, the Namespace first.
    cluster_scoped = [d for d in docs if "namespace" not in d["metadata"]]
    assert [d["kind"] for d in cluster_scoped] == ["Namespace", "CustomResourceDefinition",
                                                   "CustomResourceDefinition", "ClusterRole",  # mpnn-trainer
                                                   *CLUSTER_SCOPED_KINDS]
    kubectl("apply", "--server-side", "--dry-run=server", "--force-conflicts", "-f", "-",
            input=as_list(cluster_scoped))
    kubectl("apply", "--server-side", "-f", "-", input=as_list(docs[:1]))  # the Namespace
    out = kubectl("apply", "--server-side", "--dry-run=server", "--force-conflicts",
                  "-f", str(INSTALL_YAML)).stdout
    assert out.count("(server dry run)") == len(docs), out

    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(INSTALL_YAML))
    # Admitted under the restricted Pod Security Standard and scheduled: the pod runs on kwok.
    kubectl("rollout", "status", "deployment/mpnn-operator", "--timeout=90s", namespace=SYSTEM_NS)
    (pod,) = kubectl.json("get", "pods", "-l", "app.kubernetes.io/name=mpnn-operator", namespace=SYSTEM_NS)["items"]
    assert pod["spec"]["serviceAccountName"] == SYSTEM_SA
    assert condition(pod, "Ready").get("status") == "True"
    # Applying again changes nothing.
    before = kubectl.json("get", "deployment", "mpnn-operator", namespace=SYSTEM_NS)["metadata"]["resourceVersion"]
    kubectl("apply", "--server-side", "-f", str(INSTALL_YAML))
    after = kubectl.json("get", "deployment", "mpnn-operator", namespace=SYSTEM_NS)["metadata"]["resourceVersion"]
    assert before == after


@pytest.mark.parametrize("values", [None, {"watchNamespaces": ["NS"]}], ids=["cluster-wide", "watch-namespace"])
def test_chart_server_side_dry_run(kubectl, install_crds, namespace, values):
    if values:
        values = {"watchNamespaces": [namespace]}
    release = f"dry-{uuid.uuid4().hex[:6]}"
    objs = objects(render(values, name=release, namespace=namespace))
    out = kubectl("apply", "--server-side", "--dry-run=server", "-f", "-", input=as_list(objs)).stdout
    assert out.count("(server dry run)") == len(objs), out
    # The CRDs too (they exist already: a dry-run update, which must not conflict).
    out = kubectl("apply", "--server-side", "--dry-run=server", "--force-conflicts", "-f", str(CHART / "crds")).stdout
    assert out.count("(server dry run)") == 2, out
    # Nothing was created.
    assert kubectl("get", "clusterrole", f"{release}-mpnn-operator", check=False).returncode != 0


def test_examples_pass_a_server_side_dry_run(kubectl, install_crds, namespace):
    """The NeuralNetworks need their CRD established; then every example is accepted."""
    for path in sorted(EXAMPLES.glob("*.yaml")):
        out = kubectl("apply", "--server-side", "--dry-run=server", "-f", str(path), namespace=namespace).stdout
        assert out.count("(server dry run)") == len(example_documents(path)), (path.name, out)


def test_helm_install_upgrade_uninstall(kubectl, kubeconfig, install_crds, namespace, wait_for):
    """The install path of docs/install.md, with Helm's own install (CRDs already present:
    Helm applies its crds/ copies, identical, without conflict)."""
    release = "mpnn"
    # A trainer ClusterRole of this release's own: install.yaml's mpnn-trainer is not Helm's to adopt.
    trainer_role = f"mpnn-trainer-{namespace}"
    values = {"watchNamespaces": [namespace], "rbac": {"trainerClusterRole": trainer_role}}
    with helm.Config(kubeconfig_path=kubeconfig, namespace=namespace) as cfg:
        rel = cfg.install(str(CHART), release, values, namespace=namespace, timeout=120, wait="watcher")
        assert rel["status"] == "deployed" and rel["revision"] == 1
        assert f"kubectl apply -n {namespace} -f -" in rel["notes"]
        dep = kubectl.json("get", "deployment", "mpnn-mpnn-operator", namespace=namespace)
        assert dep["status"].get("availableReplicas") == 1
        assert kubectl("get", "role", "mpnn-mpnn-operator", namespace=namespace).returncode == 0
        assert kubectl("get", "clusterrole", trainer_role).returncode == 0

        rel = cfg.upgrade(str(CHART), release, {**values, "logLevel": "debug"},
                          namespace=namespace, timeout=120, wait="watcher")
        assert rel["status"] == "deployed" and rel["revision"] == 2
        args = kubectl.json("get", "deployment", "mpnn-mpnn-operator",
                            namespace=namespace)["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--log-level=debug" in args

        # Bad values fail the upgrade before anything is changed.
        with pytest.raises(helm.HelmError, match="/image/pullPolicy': value must be one of"):
            cfg.upgrade(str(CHART), release, {"image": {"pullPolicy": "Sometimes"}}, namespace=namespace)
        assert cfg.status(release)["revision"] == 2

        cfg.uninstall(release, timeout=120, wait="watcher")
    for kind, name in (("deployment", "mpnn-mpnn-operator"), ("serviceaccount", "mpnn-mpnn-operator"),
                       ("role", "mpnn-mpnn-operator")):
        assert kubectl("get", kind, name, namespace=namespace, check=False).returncode != 0, kind
    assert kubectl("get", "clusterrole", "mpnn-mpnn-operator", check=False).returncode != 0
    assert kubectl("get", "clusterrole", trainer_role, check=False).returncode != 0
    assert kubectl("get", "validatingadmissionpolicy", "mpnn-mpnn-operator-persistentvolumes",
                   check=False).returncode != 0
    # Helm never deletes the CRDs of crds/ (nor, thereby, anyone's NeuralNetworks).
    kubectl("get", "crd", "neuralnetworks.mpnn.dev", "partitions.mpnn.dev")


# -- least privilege ---------------------------------------------------------------------------


def test_service_account_cannot_list_secrets_create_workloads_or_escalate(kubectl, installed, namespace):
    user = f"system:serviceaccount:{SYSTEM_NS}:{SYSTEM_SA}"
    # What it must be able to do (sanity: the identity is the bound one).
    for verb, resource in (("create", "partitions.mpnn.dev"), ("patch", "neuralnetworks.mpnn.dev/status"),
                           ("create", "statefulsets.apps"), ("create", "persistentvolumes"),
                           ("list", "pods"), ("create", "events"), ("create", "jobs.batch"),
                           ("delete", "jobs.batch"), ("get", "serviceaccounts"),
                           # Each network's peer key: made, read by name, deleted; nothing more.
                           ("create", "secrets"), ("get", "secrets"), ("delete", "secrets"),
                           ("create", "networkpolicies.networking.k8s.io"),
                           ("delete", "networkpolicies.networking.k8s.io")):
        assert can_i(kubectl, user, verb, resource, namespace if resource != "persistentvolumes" else None), \
            (verb, resource)
    denied = [
        ("list", "secrets"), ("watch", "secrets"), ("update", "secrets"), ("patch", "secrets"),
        ("create", "deployments.apps"), ("create", "daemonsets.apps"), ("create", "cronjobs.batch"),
        ("patch", "jobs.batch"), ("update", "jobs.batch"), ("list", "serviceaccounts"),
        ("create", "pods"), ("delete", "pods"), ("create", "pods/exec"), ("create", "pods/eviction"),
        ("create", "serviceaccounts"), ("create", "serviceaccounts/token"),
        ("update", "configmaps"), ("delete", "configmaps"), ("delete", "statefulsets.apps"),
        ("delete", "neuralnetworks.mpnn.dev"), ("create", "neuralnetworks.mpnn.dev"),
        ("create", "roles.rbac.authorization.k8s.io"), ("create", "rolebindings.rbac.authorization.k8s.io"),
        ("bind", "roles.rbac.authorization.k8s.io"), ("escalate", "roles.rbac.authorization.k8s.io"),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
        ("bind", "clusterroles.rbac.authorization.k8s.io"), ("escalate", "clusterroles.rbac.authorization.k8s.io"),
        ("impersonate", "users"), ("impersonate", "serviceaccounts"),
        ("create", "certificatesigningrequests.certificates.k8s.io"),
        ("update", "nodes"), ("get", "persistentvolumes"),
        ("create", "validatingwebhookconfigurations.admissionregistration.k8s.io"),
        ("create", "customresourcedefinitions.apiextensions.k8s.io"),
        ("list", "namespaces"),
    ]
    for scope in (namespace, None):
        allowed = [(v, r) for v, r in denied if can_i(kubectl, user, v, r, scope)]
        assert allowed == [], f"{user} may {allowed} ({scope or 'cluster-wide'})"


def persistent_volume(name: str, labels: dict[str, str] | None = None, **source: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                     **source}}


def test_admission_policy_confines_the_service_account_to_its_own_nfs_volumes(kubectl, installed, wait_for):
    """RBAC lets the operator create any PersistentVolume and delete every one; the
    chart's ValidatingAdmissionPolicy narrows that to its own NFS volumes."""
    user = f"--as=system:serviceaccount:{SYSTEM_NS}:{SYSTEM_SA}"
    ours = persistent_volume("mpnn.policy-test.digits", {"app.kubernetes.io/managed-by": "mpnn-operator"},
                             nfs={"server": "10.0.0.1", "path": "/exports"})
    host_path = persistent_volume(ours["metadata"]["name"], ours["metadata"]["labels"],
                                  hostPath={"path": "/"})
    unlabelled = persistent_volume("mpnn.policy-test.other", nfs={"server": "10.0.0.1", "path": "/exports"})

    def create(obj: dict[str, Any]):
        return kubectl("create", user, "--dry-run=server", "-f", "-", input=json.dumps(obj), check=False)

    # The policy is enforced once the API server has loaded it.
    wait_for(lambda: "ValidatingAdmissionPolicy" in create(host_path).stderr, timeout=30,
             message="the PersistentVolume policy to be enforced")
    assert create(ours).returncode == 0, create(ours).stderr
    r = create(unlabelled)
    assert r.returncode != 0 and "only create NFS PersistentVolumes" in r.stderr, r.stderr
    # Bound in advance: to its own network's claim only (the labels say which), and without a uid.
    ours["metadata"]["labels"].update({"mpnn.dev/namespace": "policy-test", "mpnn.dev/network": "digits"})
    own_claim = {"namespace": "policy-test", "name": "digits-model"}
    assert create({**ours, "spec": {**ours["spec"], "claimRef": own_claim}}).returncode == 0
    for claim in ({"namespace": "policy-test", "name": "secrets"}, {"namespace": "other", "name": "digits-model"},
                  {**own_claim, "uid": "0b9c6a52-1b7e-4c38-a7f2-2d1d2a7a1d11"}):
        r = create({**ours, "spec": {**ours["spec"], "claimRef": claim}})
        assert r.returncode != 0 and "bound in advance only to the claim NS/N-model" in r.stderr, (claim, r.stderr)
    # Someone else's volume: the operator may not delete it, though RBAC would allow it.
    foreign = persistent_volume(f"data-{uuid.uuid4().hex[:6]}", nfs={"server": "10.0.0.1", "path": "/data"})
    kubectl.apply(foreign)
    try:
        r = kubectl("delete", "pv", foreign["metadata"]["name"], user, "--dry-run=server", check=False)
        assert r.returncode != 0 and "only its own PersistentVolumes" in r.stderr, r.stderr
        assert kubectl("delete", "pv", foreign["metadata"]["name"], "--dry-run=server").returncode == 0  # admin
    finally:
        kubectl("delete", "pv", foreign["metadata"]["name"], "--ignore-not-found", check=False)


def test_namespaced_service_account_is_confined_to_its_namespaces(kubectl, install_crds, namespace,
                                                                  other_namespace):
    release = f"ns-{uuid.uuid4().hex[:6]}"
    with applied_chart(kubectl, {"watchNamespaces": [namespace]}, release, other_namespace) as objs:
        sa_ns, sa = service_account_of(objs)
        user = f"system:serviceaccount:{sa_ns}:{sa}"
        assert can_i(kubectl, user, "create", "partitions.mpnn.dev", namespace)
        assert can_i(kubectl, user, "create", "persistentvolumes")
        assert can_i(kubectl, user, "list", "namespaces")  # kopf, to match --namespace
        assert can_i(kubectl, user, "get", "secrets", namespace)  # its networks' peer keys, by name
        for verb, resource in (("list", "neuralnetworks.mpnn.dev"), ("create", "partitions.mpnn.dev"),
                               ("list", "pods"), ("create", "configmaps"), ("get", "secrets")):
            # Not where it runs, not in any other namespace, not cluster-wide.
            assert not can_i(kubectl, user, verb, resource, other_namespace), (verb, resource)
            assert not can_i(kubectl, user, verb, resource, "default"), (verb, resource)
            assert not can_i(kubectl, user, verb, resource), (verb, resource)
        for verb, resource in (("list", "secrets"), ("watch", "secrets"), ("create", "pods"),
                               ("create", "deployments.apps"),
                               ("bind", "roles.rbac.authorization.k8s.io"),
                               ("escalate", "roles.rbac.authorization.k8s.io")):
            assert not can_i(kubectl, user, verb, resource, namespace), (verb, resource)


# -- the operator under the chart's identity ----------------------------------------------------


def create_scale_delete(kubectl, ns: str, op: Operator, wait_for) -> None:
    """The operator scenario: NFS-backed digits with training, 4 partitions Ready; scale to 6; delete."""
    kubectl.apply(digits(training={"runId": "install-1"}), namespace=ns)  # a training Job too
    obj = wait_ready(kubectl, ns, 4, wait_for, op)
    table = lookup(kubectl, ns)
    assert table.num_partitions == 4 and obj["status"]["lookupVersion"] == table.version
    assert_partitions_match(kubectl, ns, table)
    children = resource_versions(kubectl, ns)
    kinds = sorted(k.split("/")[0] for k in children)
    assert kinds == ["ConfigMap", "Partition", "Partition", "Partition", "Partition", "PersistentVolume",
                     "PersistentVolumeClaim", "Service", "Service", "StatefulSet"], kinds
    (job,) = kubectl.json("get", "jobs", "-l", "mpnn.dev/network=digits", namespace=ns)["items"]
    assert job["metadata"]["labels"]["mpnn.dev/run"] == "install-1"
    assert kubectl.json("get", "pvc", "digits-model", namespace=ns)["status"]["phase"] == "Bound"
    pods = kubectl.json("get", "pods", "-l", obj["status"]["selector"], namespace=ns)["items"]
    assert len(pods) == 4 and all(condition(p, "Ready").get("status") == "True" for p in pods)
    # Events are posted under the operator's identity too.
    reasons = [e["reason"] for e in kubectl.json("get", "events", "--field-selector",
                                                 "involvedObject.kind=NeuralNetwork", namespace=ns)["items"]]
    assert "Distributed" in reasons, reasons

    kubectl("scale", "nn/digits", "--replicas=6", namespace=ns)
    obj = wait_ready(kubectl, ns, 6, wait_for, op)
    table = lookup(kubectl, ns)
    assert table.num_partitions == 6 and obj["status"]["lookupVersion"] == table.version
    assert len(partitions(kubectl, ns)) == 6
    assert kubectl.json("get", "statefulset", "digits", namespace=ns)["spec"]["replicas"] == 6

    kubectl("delete", "nn", "digits", "--timeout=90s", namespace=ns)

    def gone():
        pods = kubectl.json("get", "pods", "-l", "mpnn.dev/network=digits", namespace=ns)["items"]
        return not resource_versions(kubectl, ns) and not pods

    wait_for(gone, timeout=120, message="every child of digits (the PersistentVolume too) to be deleted")
    assert op.rbac_denials() == [], "\n".join(op.rbac_denials())


def test_operator_with_install_yaml_rbac_cluster_wide(kubectl, kubeconfig, installed, namespace, tmp_path,
                                                      wait_for):
    """install.yaml's ServiceAccount, ClusterRole and binding; the operator watches every namespace."""
    config = token_kubeconfig(kubectl, kubeconfig, SYSTEM_NS, SYSTEM_SA, tmp_path / "sa.kubeconfig")
    whoami = Kubectl(kubectl.binary, config)("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
    assert whoami.stdout == f"system:serviceaccount:{SYSTEM_NS}:{SYSTEM_SA}"
    with running_operator(config, tmp_path / "operator.log") as op:
        try:
            create_scale_delete(kubectl, namespace, op, wait_for)
        finally:
            delete_networks(kubectl, namespace, wait_for)


def test_operator_with_chart_rbac_per_namespace(kubectl, kubeconfig, install_crds, namespace, other_namespace,
                                                tmp_path, wait_for):
    """The chart installed in one namespace, watching another: Role + RoleBinding there,
    and the small ClusterRole (PersistentVolumes, CRDs, namespaces)."""
    release = f"op-{uuid.uuid4().hex[:6]}"
    with applied_chart(kubectl, {"watchNamespaces": [namespace]}, release, other_namespace) as objs:
        assert [o["metadata"]["namespace"] for o in objs if o["kind"] in ("Role", "RoleBinding")] == [namespace] * 2
        config = token_kubeconfig(kubectl, kubeconfig, *service_account_of(objs), tmp_path / "sa.kubeconfig")
        with running_operator(config, tmp_path / "operator.log", namespaces=[namespace]) as op:
            try:
                create_scale_delete(kubectl, namespace, op, wait_for)
            finally:
                delete_networks(kubectl, namespace, wait_for)


def test_every_example_reconciles_to_ready(kubectl, kubeconfig, install_crds, namespace, tmp_path, wait_for):
    """All of manifests/examples/ at once in one watched namespace, the operator running
    under the chart's per-namespace identity."""
    release = f"ex-{uuid.uuid4().hex[:6]}"
    pv_name = f"mpnn-models-{namespace}"[:63]  # PVs are cluster-scoped: one per test run
    docs: list[dict[str, Any]] = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in example_documents(path):
            if doc["kind"] == "PersistentVolume":
                doc["metadata"]["name"] = pv_name
            elif doc["kind"] == "PersistentVolumeClaim":
                doc["spec"]["volumeName"] = pv_name
            docs.append(doc)
    nets = {d["metadata"]["name"]: d["spec"]["partitions"] for d in docs if d["kind"] == "NeuralNetwork"}
    assert len(nets) == len(list(EXAMPLES.glob("*.yaml"))) - 1  # and trainer-rbac.yaml

    with applied_chart(kubectl, {"watchNamespaces": [namespace]}, release, namespace) as objs:
        config = token_kubeconfig(kubectl, kubeconfig, *service_account_of(objs), tmp_path / "sa.kubeconfig")
        with running_operator(config, tmp_path / "operator.log", namespaces=[namespace]) as op:
            try:
                kubectl("apply", "--server-side", "-f", "-", input=as_list(docs), namespace=namespace)

                def not_ready() -> dict[str, Any]:
                    out = {}
                    for item in kubectl.json("get", "nn", namespace=namespace)["items"]:
                        st, name = item.get("status") or {}, item["metadata"]["name"]
                        ok = (st.get("phase") == "Ready" and st.get("readyPartitions") == nets[name]
                              and st.get("observedGeneration") == item["metadata"]["generation"]
                              and condition(item, "Ready").get("status") == "True")
                        if not ok:
                            out[name] = st.get("phase"), st.get("readyPartitions"), condition(item, "Degraded")
                    return out

                try:
                    wait_for(lambda: not not_ready(), timeout=240, message="every example Ready")
                except Exception as exc:
                    raise AssertionError(f"{exc}\nnot ready: {not_ready()}\noperator log:\n{op.tail()}") from exc
                for name, n in nets.items():
                    parts = kubectl.json("get", "partitions.mpnn.dev", "-l", f"mpnn.dev/network={name}",
                                         namespace=namespace)["items"]
                    assert len(parts) == n, name
                claim = kubectl.json("get", "pvc", "mpnn-models", namespace=namespace)
                assert claim["status"]["phase"] == "Bound" and claim["spec"]["volumeName"] == pv_name
                assert op.rbac_denials() == [], "\n".join(op.rbac_denials())
            finally:
                delete_networks(kubectl, namespace, wait_for)
                kubectl("delete", "pvc", "mpnn-models", "--ignore-not-found", "--wait=false",
                        namespace=namespace, check=False)
                kubectl("delete", "pv", pv_name, "--ignore-not-found", "--wait=false", check=False)
