"""The Helm chart (helm/mpnn-operator), the generated manifests/install.yaml, the
examples and the Dockerfile, without a cluster. Helm itself lints and renders the
chart, through helm-python-sdk (Helm's Go SDK in a wheel; no helm binary).

tests/cluster/test_install.py applies the same renderings to the real control plane.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.chart import CHART, EXAMPLES, INSTALL_YAML, ROOT, TRAINER_RBAC, example_documents, helm, objects, render

STRATEGIES = ("balanced", "count", "percentage", "ids", "layers")

# The operator's permissions, derived from what it calls (operator/mpnn_operator/kube.py,
# reconcile.py, handlers.py) and what kopf needs; docs/install.md explains each line.
NAMESPACED_RULES = {
    ("mpnn.dev", "neuralnetworks"): {"get", "list", "watch", "patch"},
    ("mpnn.dev", "neuralnetworks/status"): {"patch"},
    ("mpnn.dev", "neuralnetworks/finalizers"): {"update"},
    ("mpnn.dev", "partitions"): {"list", "watch", "create", "patch", "delete"},
    ("mpnn.dev", "partitions/status"): {"patch"},
    ("", "configmaps"): {"get", "create", "patch"},
    ("", "services"): {"get", "create", "patch"},
    ("", "persistentvolumeclaims"): {"get", "list", "watch", "create", "patch", "delete"},
    ("apps", "statefulsets"): {"get", "list", "watch", "create", "patch"},
    ("policy", "poddisruptionbudgets"): {"create", "patch"},
    ("", "secrets"): {"get", "create", "delete"},
    ("networking.k8s.io", "networkpolicies"): {"get", "create", "patch", "delete"},
    ("", "pods"): {"list"},
    ("", "events"): {"create"},
    ("batch", "jobs"): {"create", "list", "watch", "delete"},
    ("", "serviceaccounts"): {"get"},
}
CLUSTER_RULES = {
    ("", "persistentvolumes"): {"list", "create", "patch", "delete"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
}
# Only when watching given namespaces: kopf lists/watches namespaces to match them.
NAMESPACE_WATCH_RULES = {("", "namespaces"): {"list", "watch"}}
# The training Jobs' identity (ClusterRole mpnn-trainer, bound per namespace by the user):
# TrainingReporter: its merge patch of status.training and its read of the status subresource.
# patch: progress reports; get: the checkpoint request before a rescale (RescaleHandshake)
TRAINER_RULES = {("mpnn.dev", "neuralnetworks/status"): {"get", "patch"}}
TRAINER_ROLE = "mpnn-trainer"
# The chart's default server resources (values.yaml serverResources), passed to the operator.
SERVER_RESOURCES_ARG = '--server-resources={"limits":{"memory":"2Gi"},"requests":{"cpu":"250m","memory":"256Mi"}}'


def chart_crds() -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        return [yaml.safe_load(c["data"]) for c in chart.crds]


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def rule_table(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs, refusing wildcards and rules that mix groups."""
    table: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource) and "*" not in rule["verbs"], rule
                table.setdefault((group, resource), set()).update(rule["verbs"])
    return table


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_install", ROOT / "hack" / "gen_install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- lint and CRDs -------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, {"watchNamespaces": ["team-a", "team-b"]},
                                    {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops"}}],
                         ids=["defaults", "watch-namespaces", "bring-your-own-rbac"])
def test_helm_lint_reports_no_errors(values):
    report = helm.lint(CHART, values, strict=True)
    errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert report["total_charts_linted"] == 1
    assert errors == [], errors


def test_chart_crds_are_the_repository_crds_byte_for_byte():
    ours = sorted(p.name for p in (CHART / "crds").iterdir())
    theirs = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert ours == theirs, "run `make chart-crds`"
    for name in theirs:
        assert (CHART / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes(), \
            f"helm/mpnn-operator/crds/{name} differs from crds/{name}: run `make chart-crds`"
    assert {c["metadata"]["name"] for c in chart_crds()} == {"neuralnetworks.mpnn.dev", "partitions.mpnn.dev"}


def test_chart_metadata():
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["name"] == "mpnn-operator" and meta["type"] == "application"
    assert meta["appVersion"] == "0.1.0"
    assert meta["kubeVersion"] == ">=1.30.0-0"  # ValidatingAdmissionPolicy v1
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^version = "0\.1\.0"$', pyproject, re.M), "appVersion follows the project version"


# -- rendering: defaults ------------------------------------------------------------------


def test_default_render_is_cluster_wide():
    objs = objects(render())
    assert sorted(o["kind"] for o in objs) == ["ClusterRole", "ClusterRole", "ClusterRoleBinding", "Deployment",
                                               "ServiceAccount", "ValidatingAdmissionPolicy",
                                               "ValidatingAdmissionPolicyBinding"]
    for o in objs:
        assert o["metadata"]["name"].startswith("mpnn-operator") or o["metadata"]["name"] == TRAINER_ROLE
        if o["kind"] in ("ServiceAccount", "Deployment"):
            assert o["metadata"]["namespace"] == "mpnn-system"
    roles = {r["metadata"]["name"]: r for r in by_kind(objs, "ClusterRole")}
    assert rule_table(roles["mpnn-operator"]["rules"]) == {**CLUSTER_RULES, **NAMESPACED_RULES}
    (binding,) = by_kind(objs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "mpnn-operator"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mpnn-operator", "namespace": "mpnn-system"}]


def test_rbac_never_reads_secrets_it_did_not_make_nor_grants_workloads_or_rbac():
    for values in (None, {"watchNamespaces": ["a"]}):
        objs = objects(render(values))
        for role in by_kind(objs, "ClusterRole") + by_kind(objs, "Role"):
            table = rule_table(role["rules"])
            resources = {r for _, r in table}
            assert not resources & {"deployments", "daemonsets", "serviceaccounts/token", "nodes",
                                    "pods/exec"}, resources
            # Secrets: only the peer keys it creates, by name; never list or watch (no browsing).
            assert table.get(("", "secrets"), set()) <= {"get", "create", "delete"}
            # Jobs: created once per run, never changed; ServiceAccounts: only looked at.
            assert table.get(("batch", "jobs"), set()) <= {"create", "list", "watch", "delete"}
            assert table.get(("", "serviceaccounts"), set()) <= {"get"}
            assert not {g for g, _ in table} & {"rbac.authorization.k8s.io", "certificates.k8s.io",
                                                "admissionregistration.k8s.io"}
            assert table.get(("", "pods"), {"list"}) == {"list"}
            verbs = set().union(*table.values())
            assert not verbs & {"bind", "escalate", "impersonate", "deletecollection", "*"}, verbs


def test_deployment_hardening_and_probe():
    (dep,) = by_kind(objects(render()), "Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "mpnn-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/mpnn/mpnn:0.1.0" and c["imagePullPolicy"] == "IfNotPresent"
    assert c["command"] == ["mpnn"]
    assert c["args"] == ["operator", "--cluster-domain=cluster.local", "--server-image=ghcr.io/mpnn/mpnn:0.1.0",
                         "--liveness-port=8080", SERVER_RESOURCES_ARG, "--metrics-port=8081", "--log-level=info",
                         "--rescale-timeout=120"]
    from partition_server.api.manifest import DEFAULT_IMAGE
    assert c["image"] == DEFAULT_IMAGE  # the chart's default image is the package's default server image
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["resources"]["requests"] == {"cpu": "50m", "memory": "128Mi"}
    assert c["ports"] == [{"name": "healthz", "containerPort": 8080, "protocol": "TCP"},
                          {"name": "metrics", "containerPort": 8081, "protocol": "TCP"}]
    probe = c["livenessProbe"]["httpGet"]
    assert probe == {"path": "/healthz", "port": "healthz"}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]


def test_values_reach_the_deployment():
    values = {
        "image": {"repository": "registry.example.com/mpnn", "tag": "dev", "pullPolicy": "Always"},
        "clusterDomain": "corp.internal", "logLevel": "debug", "livenessPort": 9090, "rescaleTimeout": 30,
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": 2, "memory": "2Gi"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
        "podSecurityContext": {"runAsNonRoot": True, "runAsUser": 1234, "fsGroup": 1234},
        "securityContext": {"readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}},
        "imagePullSecrets": [{"name": "regcred"}],
        "podAnnotations": {"a": "b"}, "priorityClassName": "system-cluster-critical",
        "serviceAccount": {"name": "ops", "annotations": {"x": "y"}},
    }
    objs = objects(render(values, name="prod"))
    (dep,) = by_kind(objs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert dep["metadata"]["name"] == "prod-mpnn-operator"
    assert c["image"] == "registry.example.com/mpnn:dev" and c["imagePullPolicy"] == "Always"
    # The partition servers run the operator's image (docs/install.md builds and pushes one image).
    assert c["args"] == ["operator", "--cluster-domain=corp.internal", "--server-image=registry.example.com/mpnn:dev",
                         "--liveness-port=9090", SERVER_RESOURCES_ARG, "--metrics-port=8081", "--log-level=debug",
                         "--rescale-timeout=30"]
    assert c["ports"][0]["containerPort"] == 9090
    assert c["resources"] == values["resources"]
    # Helm merges maps into the defaults (a key set to null removes a default).
    assert c["securityContext"] == {**values["securityContext"], "allowPrivilegeEscalation": False,
                                    "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    for key in ("nodeSelector", "tolerations", "affinity", "imagePullSecrets", "priorityClassName"):
        assert pod[key] == values[key], key
    assert pod["securityContext"] == {**values["podSecurityContext"], "runAsGroup": 65532,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    assert dep["spec"]["template"]["metadata"]["annotations"] == {
        "a": "b", "prometheus.io/scrape": "true", "prometheus.io/port": "8081", "prometheus.io/path": "/metrics"}
    assert pod["serviceAccountName"] == "ops"
    (sa,) = by_kind(objs, "ServiceAccount")
    assert sa["metadata"]["name"] == "ops" and sa["metadata"]["annotations"] == {"x": "y"}
    (binding,) = by_kind(objs, "ClusterRoleBinding")
    assert binding["subjects"][0]["name"] == "ops"


def test_persistent_volume_policy_confines_the_operator_service_account():
    objs = objects(render(name="mpnn", namespace="ops"))
    (policy,) = by_kind(objs, "ValidatingAdmissionPolicy")
    (binding,) = by_kind(objs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    assert spec["matchConstraints"]["resourceRules"] == [{"apiGroups": [""], "apiVersions": ["v1"],
                                                         "operations": ["CREATE", "UPDATE", "DELETE"],
                                                         "resources": ["persistentvolumes"]}]
    (condition,) = spec["matchConditions"]
    assert condition["expression"] == 'request.userInfo.username == "system:serviceaccount:ops:mpnn-mpnn-operator"'
    # The operator's own volumes are what the policy admits.
    from partition_server.api.manifest import load_manifest
    from mpnn_operator import builders
    pv = builders.persistent_volume(load_manifest(EXAMPLES / "digits-nfs.yaml"))
    assert pv["metadata"]["name"].startswith("mpnn.") and "nfs" in pv["spec"]
    assert pv["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "mpnn-operator"
    # Bound in advance to its own network's claim, as the policy's claimRef rule requires on CREATE.
    labels = pv["metadata"]["labels"]
    assert pv["metadata"]["name"] == f"mpnn.{labels['mpnn.dev/namespace']}.{labels['mpnn.dev/network']}"
    assert pv["spec"]["claimRef"] == {"namespace": labels["mpnn.dev/namespace"],
                                      "name": f"{labels['mpnn.dev/network']}-model"}
    (rule,) = [v for v in spec["validations"] if "claimRef" in v["expression"] and "CREATE" in v["expression"]]
    assert "!has(object.spec.claimRef.uid)" in rule["expression"] and "-model" in rule["expression"]
    kinds = {o["kind"] for o in objects(render({"persistentVolumePolicy": {"enabled": False}}))}
    assert not kinds & {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}


def test_trainer_cluster_role():
    """The training Jobs' identity: what TrainingReporter needs (status only), and not the spec."""
    (role,) = [r for r in by_kind(objects(render()), "ClusterRole") if r["metadata"]["name"] == TRAINER_ROLE]
    assert rule_table(role["rules"]) == TRAINER_RULES
    from partition_server.api.manifest import DEFAULT_TRAINER_SERVICE_ACCOUNT
    assert DEFAULT_TRAINER_SERVICE_ACCOUNT == TRAINER_ROLE  # the documented binding uses one name for both
    names = lambda values: {r["metadata"]["name"] for r in by_kind(objects(render(values)), "ClusterRole")}  # noqa: E731
    assert "ml-trainer" in names({"rbac": {"trainerClusterRole": "ml-trainer"}})
    assert names({"rbac": {"trainerClusterRole": ""}}) == {"mpnn-operator"}


def test_without_rbac_and_service_account_only_the_deployment_renders():
    objs = objects(render({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops"},
                           "persistentVolumePolicy": {"enabled": False}}))
    (dep,) = objs
    assert dep["kind"] == "Deployment" and dep["spec"]["template"]["spec"]["serviceAccountName"] == "ops"
    with pytest.raises(helm.HelmError, match="serviceAccount.name is required"):
        render({"serviceAccount": {"create": False}})


# -- rendering: watchNamespaces ---------------------------------------------------------


def test_watch_namespaces_render_a_role_per_namespace():
    objs = objects(render({"watchNamespaces": ["team-a", "team-b"]}, name="mpnn", namespace="ops"))
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == ["ClusterRole", "ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "Role", "RoleBinding",
                     "RoleBinding",
                     "ServiceAccount", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    roles = {r["metadata"]["name"]: r for r in by_kind(objs, "ClusterRole")}
    assert sorted(roles) == ["mpnn-mpnn-operator", TRAINER_ROLE]
    assert rule_table(roles["mpnn-mpnn-operator"]["rules"]) == {**CLUSTER_RULES, **NAMESPACE_WATCH_RULES}
    roles = {r["metadata"]["namespace"]: r for r in by_kind(objs, "Role")}
    assert sorted(roles) == ["team-a", "team-b"]
    for ns, role in roles.items():
        assert role["metadata"]["name"] == "mpnn-mpnn-operator"
        assert rule_table(role["rules"]) == NAMESPACED_RULES
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(objs, "RoleBinding")}
    assert sorted(bindings) == ["team-a", "team-b"]
    for binding in bindings.values():
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": "mpnn-mpnn-operator"}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mpnn-mpnn-operator", "namespace": "ops"}]
    (dep,) = by_kind(objs, "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-2:] == ["--namespace=team-a", "--namespace=team-b"]


def test_notes_tell_how_to_apply_the_first_network():
    notes = render()["mpnn-operator/templates/NOTES.txt"]
    assert "watching all namespaces" in notes
    assert "kubectl apply -n default -f -" in notes and "kind: NeuralNetwork" in notes
    assert "kubectl -n mpnn-system rollout status deployment/mpnn-operator" in notes
    # The network in the notes is a valid manifest.
    doc = yaml.safe_load(notes.split("<<'YAML'\n", 1)[1].split("YAML\n", 1)[0])
    from partition_server.api.manifest import parse_neural_network
    assert parse_neural_network(doc).partitions == 4
    notes = render({"watchNamespaces": ["team-a", "team-b"]})["mpnn-operator/templates/NOTES.txt"]
    assert "watching team-a, team-b" in notes and "kubectl apply -n team-a -f -" in notes


# -- the values schema ---------------------------------------------------------------------


@pytest.mark.parametrize("values, message", [
    ({"resources": "500m"}, "at '/resources': got string, want object"),
    ({"resources": {"requests": {"cpu": "lots"}}}, "/resources/requests/cpu"),
    ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy': value must be one of 'Always', 'IfNotPresent', 'Never'"),
    ({"image": {"repository": ""}}, "/image/repository"),
    ({"watchNamespaces": "team-a"}, "at '/watchNamespaces': got string, want array"),
    ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
    ({"watchNamespaces": ["a", "a"]}, "/watchNamespaces"),
    ({"logLevel": "verbose"}, "/logLevel"),
    ({"livenessPort": 0}, "/livenessPort"),
    ({"rescaleTimeout": 0}, "/rescaleTimeout"),
    ({"clusterDomain": "Cluster Local"}, "/clusterDomain"),
    ({"nodeSelector": {"disk": 1}}, "/nodeSelector/disk"),
    ({"tolerations": {"key": "x"}}, "/tolerations"),
    ({"replicas": 2}, "additional properties 'replicas' not allowed"),
], ids=["resources-string", "resources-quantity", "pull-policy", "empty-repository", "namespaces-string",
        "namespace-name", "namespaces-duplicate", "log-level", "liveness-port", "rescale-timeout", "cluster-domain",
        "node-selector", "tolerations-object", "unknown-key"])
def test_values_breaking_the_schema_are_rejected(values, message):
    with pytest.raises(helm.HelmValuesError) as info:
        render(values)
    assert message in str(info.value), str(info.value)
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(values)
    report = helm.lint(CHART, values)
    assert any(m["severity"] == 3 for m in report["messages"]) or report["errors"], report


def test_schema_covers_every_default_value():
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(defaults) <= set(schema["properties"])
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(defaults)


# -- manifests/install.yaml -----------------------------------------------------------------


def test_install_yaml_is_generated_from_the_chart():
    generated = load_generator().render()
    assert INSTALL_YAML.read_text() == generated, \
        "manifests/install.yaml is stale: run `make manifests` (python hack/gen_install.py)"


def test_install_yaml_contents():
    docs = [d for d in yaml.safe_load_all(INSTALL_YAML.read_text()) if d]
    kinds = [d["kind"] for d in docs]
    assert kinds == ["Namespace", "CustomResourceDefinition", "CustomResourceDefinition", "ServiceAccount",
                     "ClusterRole", "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy",
                     "ValidatingAdmissionPolicyBinding", "Deployment"]
    ns = docs[0]
    assert ns["metadata"]["name"] == "mpnn-system"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert docs[1:3] == sorted(chart_crds(), key=lambda c: c["metadata"]["name"])
    assert docs[3:] == sorted(objects(render()), key=lambda o: kinds.index(o["kind"]))
    assert [d["metadata"]["name"] for d in docs[3:]] == ["mpnn-operator"] * 2 + [TRAINER_ROLE, "mpnn-operator"] \
        + ["mpnn-operator-persistentvolumes"] * 2 + ["mpnn-operator"]
    for d in docs[3:]:
        if d["kind"] in ("ServiceAccount", "Deployment"):
            assert d["metadata"]["namespace"] == "mpnn-system"


def test_generator_check_mode(tmp_path, capsys):
    gen = load_generator()
    stale = tmp_path / "install.yaml"
    stale.write_text("# old\n")
    assert gen.main(["--check", "-o", str(stale)]) == 1
    assert "is stale" in capsys.readouterr().err
    assert gen.main(["-o", str(stale)]) == 0
    assert gen.main(["--check", "-o", str(stale)]) == 0


# -- manifests/examples -------------------------------------------------------------------


def example_networks() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in example_documents(path):
            if doc["kind"] == "NeuralNetwork":
                out[path.name] = doc
    return out


def test_examples_cover_every_strategy_for_digits_and_mnist():
    from partition_server.api.manifest import parse_neural_network

    nets = example_networks()
    assert len(nets) == len(list(EXAMPLES.glob("*.yaml"))) - 1, "every example but trainer-rbac.yaml is a network"
    seen = set()
    for filename, doc in nets.items():
        assert doc["apiVersion"] == "mpnn.dev/v1alpha1"
        assert "namespace" not in doc["metadata"], f"{filename}: apply with -n instead"
        assert filename == f"{doc['metadata']['name']}.yaml"
        net = parse_neural_network(doc)  # the operator's own validation, distributor included
        dataset = {64: "digits", 784: "mnist"}[net.model.inputs]
        seen.add((dataset, net.distribution.strategy))
    assert seen >= {(d, s) for d in ("digits", "mnist") for s in STRATEGIES}


def test_trainer_rbac_example_binds_the_chart_role_to_the_default_service_account():
    from partition_server.api.manifest import DEFAULT_TRAINER_SERVICE_ACCOUNT

    sa, binding = example_documents(TRAINER_RBAC)
    assert (sa["kind"], sa["metadata"]) == ("ServiceAccount", {"name": DEFAULT_TRAINER_SERVICE_ACCOUNT})
    assert binding["kind"] == "RoleBinding" and "namespace" not in binding["metadata"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": TRAINER_ROLE}
    # Without a namespace, the subject is the ServiceAccount of the binding's own namespace.
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": DEFAULT_TRAINER_SERVICE_ACCOUNT}]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["rbac"]["trainerClusterRole"] == TRAINER_ROLE


def test_storage_examples():
    nets = example_networks()
    nfs = [d for d in nets.values() if "nfs" in (d["spec"].get("storage") or {})]
    assert nfs and all(d["spec"]["storage"]["nfs"]["path"].startswith("/") for d in nfs)
    (path,) = [EXAMPLES / f for f, d in nets.items() if "existingClaim" in (d["spec"].get("storage") or {})]
    docs = example_documents(path)
    assert [d["kind"] for d in docs] == ["PersistentVolume", "PersistentVolumeClaim", "NeuralNetwork"]
    pv, pvc, nn = docs
    assert nn["spec"]["storage"]["existingClaim"] == pvc["metadata"]["name"]
    assert "namespace" not in pvc["metadata"]
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert pv["spec"]["accessModes"] == pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pv["spec"]["storageClassName"] == pvc["spec"]["storageClassName"] == ""
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    assert pv["spec"]["capacity"]["storage"] == pvc["spec"]["resources"]["requests"]["storage"]


# -- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_one_image_for_both_planes():
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in lines
    assert sum(line.startswith("FROM ${PYTHON_IMAGE}") for line in lines) == 2
    # Both planes (the operator extra), never the dev extras.
    assert any('pip install ".[operator]"' in line for line in lines)
    assert not any("[dev]" in line for line in lines)
    assert 'ENTRYPOINT ["mpnn"]' in lines
    (user,) = [line for line in lines if line.startswith("USER ")]
    from mpnn_operator.builders import RUN_AS
    assert user == f"USER {RUN_AS}:{RUN_AS}", "the image's user is the uid the pods run as"
    (dep,) = by_kind(objects(render()), "Deployment")
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == RUN_AS


def test_dockerignore_keeps_what_pip_install_needs():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            copied.update(s.rstrip("/") for s in line.split()[1:-1])
    assert copied == allowed
    pyproject = (ROOT / "pyproject.toml").read_text()
    for path in re.findall(r'"[\w.]+" = "([\w/]+)"', pyproject):  # [tool.setuptools] package-dir
        assert path.split("/")[0] in allowed, path
    assert 'readme = "README.md"' in pyproject and "README.md" in allowed


def test_docs_list_exactly_the_chart_permissions():
    """docs/install.md's two permission tables say what the chart grants."""
    text = (ROOT / "docs" / "install.md").read_text().split("## Permissions", 1)[1]
    documented: dict[tuple[str, str], set[str]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        groups = [g.strip("`").replace('""', "") for g in cells[0].split(", ")]
        resources = [r.strip("`") for r in cells[1].split(", ")]
        verbs = {v.strip() for v in cells[2].split(",")}
        for group in groups:
            for resource in resources:
                documented[(group, resource)] = verbs
    assert documented == {**NAMESPACED_RULES, **CLUSTER_RULES, **NAMESPACE_WATCH_RULES}
