"""``mpnn render`` and the builders it shares with the operator (no cluster needed)."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from mpnn_operator import builders, naming
from partition_server import cli
from mpnn_operator.reconcile import Reconciler
from mpnn_operator.render import render
from partition_server.api.coverage import check_coverage
from partition_server.api.distributor import parse_neuron_ids, Range
from partition_server.api.lookup import LookupTable
from partition_server.api.manifest import DEFAULT_IMAGE, LayerSpec, ManifestError, ModelSpec, load_manifest, parse_training
from tests.support.fake_kube import FakeKube

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits.yaml"


def _with_storage(tmp_path: Path, storage: dict, name: str = "digits") -> Path:
    doc = yaml.safe_load(DIGITS.read_text())
    doc["metadata"] = {"name": name, "namespace": "ml"}
    doc["spec"]["storage"] = storage
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _by_kind(objs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for o in objs:
        out.setdefault(o["kind"], []).append(o)
    return out


def test_digits_renders_every_child_with_labels_and_no_owner():
    objs = render(str(DIGITS))
    # digits.yaml has training but no storage: no Job.
    assert [o["kind"] for o in objs] == (["Service", "Service", "NetworkPolicy", "ConfigMap"] + ["Partition"] * 4
                                         + ["PodDisruptionBudget", "StatefulSet"])
    for o in objs:
        meta = o["metadata"]
        assert meta["namespace"] == "default"
        assert meta["labels"][naming.MANAGED_BY] == "mpnn-operator"
        assert meta["labels"][naming.NETWORK] == "digits"
        assert meta["labels"]["app.kubernetes.io/name"] == "mpnn"
        assert "ownerReferences" not in meta
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert {("Service", "digits"), ("Service", "digits-inference"), ("ConfigMap", "digits-lookup"),
            ("StatefulSet", "digits")} <= names
    assert {n for k, n in names if k == "Partition"} == {f"digits-{i}" for i in range(4)}


def test_lookup_configmap_holds_a_valid_table_and_the_network_document():
    cm = _by_kind(render(str(DIGITS)))["ConfigMap"][0]
    table = LookupTable.from_dict(json.loads(cm["data"]["lookup.json"]))
    assert table.layer_units == (128, 64, 10)
    # The lookup names the peer port.
    assert table.addresses == tuple(f"digits-{i}.digits.default.svc.cluster.local:50052" for i in range(4))
    assert check_coverage(table.layer_units, table.owners_by_layer) == []
    assert cm["metadata"]["annotations"]["mpnn.dev/lookup-version"] == table.version
    network = json.loads(cm["data"]["network.json"])
    assert network["name"] == "digits" and network["inputs"] == 64
    assert [layer["units"] for layer in network["layers"]] == [128, 64, 10]


def test_partitions_hold_exactly_the_lookup_ranges():
    by_kind = _by_kind(render(str(DIGITS)))
    table = LookupTable.from_dict(json.loads(by_kind["ConfigMap"][0]["data"]["lookup.json"]))
    owners: list[list[Range]] = [[] for _ in table.layer_units]
    for p in by_kind["Partition"]:
        assert p["apiVersion"] == "mpnn.dev/v1alpha1"
        assert p["spec"]["network"] == "digits"
        assert p["metadata"]["labels"][naming.PARTITION] == str(p["spec"]["index"])
        for text in p["spec"]["ranges"]:
            layer, start, end = parse_neuron_ids(text, "ranges")
            owners[layer].append(Range(p["spec"]["index"], start, end))
    assert [sorted(o, key=lambda r: r.start) for o in owners] == [table.owners(k) for k in range(3)]
    # balanced: 128/4, 64/4, 10 -> 3,3,2,2
    assert by_kind["Partition"][0]["spec"]["ranges"] == ["0:0-31", "1:0-15", "2:0-2"]


def test_statefulset_runs_servers_in_parallel_with_lookup_mounted_as_directory():
    by_kind = _by_kind(render(str(DIGITS)))
    sts, svc = by_kind["StatefulSet"][0], by_kind["Service"][0]
    spec = sts["spec"]
    assert spec["replicas"] == 4 and spec["podManagementPolicy"] == "Parallel"
    assert spec["serviceName"] == svc["metadata"]["name"] == "digits"
    assert svc["spec"]["clusterIP"] == "None"
    template = spec["template"]
    labels = template["metadata"]["labels"]
    assert all(labels[k] == v for k, v in spec["selector"]["matchLabels"].items())
    assert svc["spec"]["selector"] == spec["selector"]["matchLabels"]
    pod = template["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MPNN_PARTITION"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['apps.kubernetes.io/pod-index']"
    assert env["MPNN_LOOKUP"]["value"] == "/etc/mpnn/lookup.json"
    assert env["MPNN_NETWORK"]["value"] == "/etc/mpnn/network.json"
    assert env["MPNN_MODEL_DIR"]["value"] == "/var/lib/mpnn/digits"
    assert env["MPNN_PORT"]["value"] == "50051"
    assert env["MPNN_PEER_PORT"]["value"] == "50052"
    assert env["MPNN_HTTP_PORT"]["value"] == "8000"
    # Readiness is the server's own gRPC health, not /v2/health/ready (which needs every peer).
    assert container["readinessProbe"] == {"grpc": {"port": 50051}, "periodSeconds": 5, "failureThreshold": 3}
    assert container["ports"] == [{"name": "grpc", "containerPort": 50051, "protocol": "TCP"},
                                  {"name": "peer", "containerPort": 50052, "protocol": "TCP"},
                                  {"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["lookup"]["configMap"]["name"] == "digits-lookup"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/mpnn"]["name"] == "lookup" and "subPath" not in mounts["/etc/mpnn"]
    assert mounts["/var/lib/mpnn"]["name"] == "model"
    assert volumes["model"] == {"name": "model", "emptyDir": {}}  # digits.yaml has no storage


def test_servers_run_unprivileged():
    sts = _by_kind(render(str(DIGITS)))["StatefulSet"][0]
    pod = sts["spec"]["template"]["spec"]
    sc = pod["containers"][0]["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False


def test_nfs_storage_renders_a_retained_readwritemany_volume_and_its_claim(tmp_path):
    objs = render(str(_with_storage(tmp_path, {"nfs": {"server": "10.0.0.1", "path": "/exports/mpnn"},
                                              "size": "5Gi"})))
    assert [o["kind"] for o in objs][:2] == ["PersistentVolume", "PersistentVolumeClaim"]
    pv, pvc = objs[0], objs[1]
    assert pv["metadata"]["name"] == "mpnn.ml.digits" and "namespace" not in pv["metadata"]
    assert pv["metadata"]["labels"][naming.NAMESPACE] == "ml"
    assert pv["spec"]["nfs"] == {"server": "10.0.0.1", "path": "/exports/mpnn"}
    assert pv["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    assert pv["spec"]["capacity"] == {"storage": "5Gi"}
    assert pvc["metadata"] == {"name": "digits-model", "namespace": "ml", "labels": pvc["metadata"]["labels"]}
    assert pvc["spec"]["volumeName"] == "mpnn.ml.digits" and pvc["spec"]["storageClassName"] == ""
    assert all(pv["metadata"]["labels"][k] == v for k, v in pvc["spec"]["selector"]["matchLabels"].items())
    sts = objs[-1]
    model = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "model")
    assert model == {"name": "model", "persistentVolumeClaim": {"claimName": "digits-model"}}


def test_existing_claim_is_used_as_is(tmp_path):
    objs = render(str(_with_storage(tmp_path, {"existingClaim": "shared-models"})))
    assert not {"PersistentVolume", "PersistentVolumeClaim"} & {o["kind"] for o in objs}
    model = next(v for v in objs[-1]["spec"]["template"]["spec"]["volumes"] if v["name"] == "model")
    assert model["persistentVolumeClaim"]["claimName"] == "shared-models"


def test_volume_names_cannot_collide_across_namespaces():
    a = load_manifest(DIGITS)
    x = dataclasses.replace(a, name="b-c", namespace="a")
    y = dataclasses.replace(a, name="c", namespace="a-b")
    assert naming.volume_name(x.namespace, x.name) != naming.volume_name(y.namespace, y.name)


def test_model_change_rolls_pods_but_a_new_placement_does_not():
    net = load_manifest(DIGITS)
    bigger = dataclasses.replace(net, model=ModelSpec(64, (LayerSpec(256), LayerSpec(10, "softmax"))))
    more = net.with_partitions(5)
    key = "mpnn.dev/network-config"
    config = lambda n: builders.statefulset(n)["spec"]["template"]["metadata"]["annotations"][key]  # noqa: E731
    assert config(net) == config(more) != config(bigger)


def test_parameters_count_weights_and_biases():
    net = load_manifest(DIGITS)
    # layer 0: 64 inputs + bias; layer 2: 64 inputs + bias
    assert builders.partition_parameters(net, [(0, 0, 2), (2, 0, 1)]) == 2 * 65 + 65


def test_cli_render_prints_the_same_objects_as_yaml(capsys):
    assert cli.main(["render", str(DIGITS), "--namespace", "ml", "--cluster-domain", "example.org"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert docs == render(str(DIGITS), cluster_domain="example.org", namespace="ml")
    table = LookupTable.from_dict(json.loads(_by_kind(docs)["ConfigMap"][0]["data"]["lookup.json"]))
    assert table.addresses[0] == "digits-0.digits.ml.svc.example.org:50052"


def test_cli_render_rejects_a_bad_namespace_naming_the_option(capsys):
    assert cli.main(["render", str(DIGITS), "--namespace", "Bad_NS"]) == 2
    assert "--namespace" in capsys.readouterr().err


def test_cli_render_rejects_an_invalid_manifest(tmp_path, capsys):
    doc = yaml.safe_load(DIGITS.read_text())
    doc["spec"]["distribution"] = {"strategy": "percentage", "percentages": [30, 30, 30]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert cli.main(["render", str(path)]) == 2
    err = capsys.readouterr().err
    assert "spec.distribution.percentages" in err


def test_render_prints_what_the_operator_applies(tmp_path):
    """For one manifest (NFS storage and training, so every kind of child), the objects the
    reconciler sends to the API server, in the order it sends them, are those ``mpnn render``
    prints, but for the owner reference to the NeuralNetwork that only the operator can add."""
    path = _trained(tmp_path, runId="run-7")
    doc = yaml.safe_load(path.read_text())
    kube = FakeKube()
    kube.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "mpnn-trainer", "namespace": "ns"}})
    kube.create_network(doc)
    kube.sent.clear()
    events = []
    reconciler = Reconciler(kube, "example.org", emit=lambda *event: events.append(event), adopt=_adopt,
                            server_image="registry.example.com/mpnn:7")
    reconciler.reconcile("ns", "digits")
    assert not [e for e in events if e[1] == "Warning"], events
    applied, owners = [], []
    # The peer-key Secret is the one child render leaves out: its key is random, made once.
    (secret,) = [o for o in kube.sent if o["kind"] == "Secret"]
    assert secret["metadata"]["name"] == "digits-peer-key"
    assert len(base64.b64decode(secret["data"]["key"])) == 32
    assert secret["metadata"]["ownerReferences"] == [_owner_ref(kube.get(naming.API_VERSION, "NeuralNetwork",
                                                                         name="digits", namespace="ns"))]
    for obj in kube.sent:
        if obj["kind"] == "Secret":
            continue
        obj = copy.deepcopy(obj)
        owners.append((obj["kind"], obj["metadata"].pop("ownerReferences", None)))
        if not applied or (obj["kind"], obj["metadata"]["name"]) != (applied[-1]["kind"],
                                                                     applied[-1]["metadata"]["name"]):
            applied.append(obj)  # the volume is created, then applied without its claimRef: keep the first
    rendered = render(str(path), cluster_domain="example.org", namespace="ns",
                      server_image="registry.example.com/mpnn:7")
    assert [(o["kind"], o["metadata"]["name"]) for o in applied] == \
        [(o["kind"], o["metadata"]["name"]) for o in rendered]
    assert applied == rendered
    nn = kube.get(naming.API_VERSION, "NeuralNetwork", name="digits", namespace="ns")
    for kind, refs in owners:
        if kind == "PersistentVolume":  # cluster-scoped: no owner in a namespace can own it
            assert refs is None
        else:
            assert refs == [_owner_ref(nn)], kind


def _owner_ref(owner: dict) -> dict:
    return {"apiVersion": naming.API_VERSION, "kind": "NeuralNetwork", "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def _adopt(child: dict, owner: dict) -> None:
    child["metadata"]["ownerReferences"] = [_owner_ref(owner)]


def test_inference_service_exposes_both_protocols_of_the_servers(tmp_path):
    doc = yaml.safe_load(DIGITS.read_text())
    doc["spec"]["server"] = {"port": 50052, "httpPort": 8080, "peerPort": 9000}
    path = tmp_path / "ports.yaml"
    path.write_text(yaml.safe_dump(doc))
    by_kind = _by_kind(render(str(path)))
    svc = {s["metadata"]["name"]: s for s in by_kind["Service"]}["digits-inference"]
    sts = by_kind["StatefulSet"][0]
    assert svc["spec"]["type"] == "ClusterIP" and "clusterIP" not in svc["spec"]
    assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [{"name": "grpc", "port": 50052, "targetPort": "grpc", "protocol": "TCP"},
                                    {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": 50052, "http": 8080,
                                                                             "peer": 9000}
    assert {"name": "MPNN_HTTP_PORT", "value": "8080"} in container["env"]
    assert svc["metadata"]["labels"][naming.COMPONENT] == naming.INFERENCE


def test_no_job_without_training_or_without_storage(tmp_path):
    assert builders.training_job(load_manifest(DIGITS)) is None  # training, no storage
    doc = yaml.safe_load(_with_storage(tmp_path, {"existingClaim": "models"}).read_text())
    del doc["spec"]["training"]
    path = tmp_path / "untrained.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert "Job" not in {o["kind"] for o in render(str(path))}


def _trained(tmp_path: Path, storage: dict | None = None, **training) -> Path:
    path = _with_storage(tmp_path, storage or {"nfs": {"server": "10.0.0.1", "path": "/exports/mpnn"}})
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["training"].update(training)
    path.write_text(yaml.safe_dump(doc))
    return path


def test_training_job_runs_the_driver_against_the_servers(tmp_path):
    objs = render(str(_trained(tmp_path, runId="run-2", serviceAccountName="trainers")))
    assert objs[-1]["kind"] == "Job"
    job, sts = objs[-1], _by_kind(objs)["StatefulSet"][0]
    net = load_manifest(_trained(tmp_path, runId="run-2", serviceAccountName="trainers"))
    assert job["apiVersion"] == "batch/v1" and job["metadata"]["name"] == "digits-train-run-2"
    assert job["metadata"]["namespace"] == "ml" and "ownerReferences" not in job["metadata"]
    labels = job["metadata"]["labels"]
    assert labels[naming.NETWORK] == "digits" and labels[naming.MANAGED_BY] == "mpnn-operator"
    assert labels[naming.RUN] == "run-2" and labels[naming.COMPONENT] == naming.TRAINING
    spec = job["spec"]
    assert spec["backoffLimit"] == 3
    pod = spec["template"]["spec"]
    assert spec["template"]["metadata"]["labels"] == labels
    # The trainer's pod is no server: neither Service may route to it.
    assert not all(labels.get(k) == v for k, v in naming.selector("digits").items())
    assert pod["restartPolicy"] == "Never" and pod["serviceAccountName"] == "trainers"
    assert pod["automountServiceAccountToken"] is True  # its token patches status.training
    (c,) = pod["containers"]
    assert c["image"] == sts["spec"]["template"]["spec"]["containers"][0]["image"]
    assert c["command"] == ["mpnn", "train"]
    flag, document, *rest = c["args"]
    assert flag == "--training" and rest == ["--report", "--namespace", "ml"]
    assert parse_training(json.loads(document)) == net.training
    assert json.loads(document)["runId"] == "run-2"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env == {"MPNN_LOOKUP": "/etc/mpnn/lookup.json", "MPNN_NETWORK": "/etc/mpnn/network.json",
                   "MPNN_MODEL_DIR": "/var/lib/mpnn/digits", "MPNN_PEER_KEY_FILE": "/var/run/mpnn/peer-key/key"}
    server = sts["spec"]["template"]["spec"]
    # What the servers mount, the trainer mounts: the lookup as a directory, the shared model volume.
    assert pod["volumes"] == server["volumes"]
    assert c["volumeMounts"] == server["containers"][0]["volumeMounts"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "digits-model"}} in pod["volumes"]
    assert pod["securityContext"] == server["securityContext"]
    assert c["securityContext"] == {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                                    "seccompProfile": {"type": "RuntimeDefault"}}
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                 "values": [cli.EXIT_USAGE]}} in rules
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}


def _images(objs):
    return {o["kind"]: o["spec"]["template"]["spec"]["containers"][0]["image"] for o in objs
            if o["kind"] in ("StatefulSet", "Job")}


def test_server_image_is_the_spec_s_else_the_operator_s(tmp_path):
    path = _trained(tmp_path)
    assert _images(render(str(path))) == {"StatefulSet": DEFAULT_IMAGE, "Job": DEFAULT_IMAGE}
    assert _images(render(str(path), server_image="registry.example.com/mpnn:dev")) == \
        {"StatefulSet": "registry.example.com/mpnn:dev", "Job": "registry.example.com/mpnn:dev"}
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["server"] = {"image": "example.org/custom:1"}
    path.write_text(yaml.safe_dump(doc))
    assert _images(render(str(path), server_image="registry.example.com/mpnn:dev")) == \
        {"StatefulSet": "example.org/custom:1", "Job": "example.org/custom:1"}


def test_server_image_flags(monkeypatch, capsys):
    assert cli._parser().parse_args(["operator"]).server_image == DEFAULT_IMAGE
    monkeypatch.setenv("MPNN_SERVER_IMAGE", "registry.example.com/mpnn:0.1.0")
    assert cli._parser().parse_args(["operator"]).server_image == "registry.example.com/mpnn:0.1.0"
    assert cli._parser().parse_args(["operator", "--server-image", "a/b:c"]).server_image == "a/b:c"
    assert cli.main(["render", str(DIGITS), "--server-image", "a/b:c"]) == 0
    (sts,) = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d["kind"] == "StatefulSet"]
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"] == "a/b:c"


def test_training_job_mounts_an_existing_claim(tmp_path):
    job = builders.training_job(load_manifest(_trained(tmp_path, {"existingClaim": "shared-models"})))
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "shared-models"}} in \
        job["spec"]["template"]["spec"]["volumes"]


def test_job_names_fit_a_label_and_stay_distinct_per_run():
    assert naming.job_name("digits", "run-2") == "digits-train-run-2"
    network, runs = "n" * 52, ["r" * 39 + "a", "r" * 39 + "b"]
    names = [naming.job_name(network, r) for r in runs]
    assert all(len(n) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", n) for n in names), names
    assert names[0] != names[1] and names == [naming.job_name(network, r) for r in runs]
    # Cut right after a '-': that '-' is dropped, not doubled before the hash.
    assert naming.job_name("a" * 47, "b" * 20).startswith("a" * 47 + "-train-")
    assert "--" not in naming.job_name("a" * 47, "b" * 20)


def _with_server(tmp_path, server: dict, storage: dict | None = None):
    doc = yaml.safe_load(DIGITS.read_text())
    doc["spec"]["server"] = server
    if storage:
        doc["spec"]["storage"] = storage
    path = tmp_path / "net.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_peer_port_is_in_the_headless_service_only():
    by_kind = _by_kind(render(str(DIGITS)))
    headless, inference = by_kind["Service"]
    assert headless["metadata"]["name"] == "digits" and inference["metadata"]["name"] == "digits-inference"
    assert [(p["name"], p["port"]) for p in headless["spec"]["ports"]] == [("peer", 50052)]
    assert [(p["name"], p["port"]) for p in inference["spec"]["ports"]] == [("grpc", 50051), ("http", 8000)]


def test_the_network_policy_admits_the_peer_port_from_the_network_only_and_public_ports_from_anywhere():
    (policy,) = _by_kind(render(str(DIGITS)))["NetworkPolicy"]
    assert policy["metadata"]["name"] == "digits-peers"
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == naming.selector("digits")
    assert spec["policyTypes"] == ["Ingress"]
    peers, public = spec["ingress"]
    assert peers == {"from": [{"podSelector": {"matchLabels": {"mpnn.dev/network": "digits"}}}],
                     "ports": [{"protocol": "TCP", "port": 50052}]}
    assert "from" not in public and {p["port"] for p in public["ports"]} == {50051, 8000}


def test_network_policy_false_renders_none(tmp_path):
    objs = render(str(_with_server(tmp_path, {"networkPolicy": False})))
    assert "NetworkPolicy" not in {o["kind"] for o in objs}


def test_servers_and_trainer_mount_the_peer_key_secret_and_the_job_pods_are_admitted(tmp_path):
    objs = render(str(_with_server(tmp_path, {"peerPort": 6000}, {"existingClaim": "models"})))
    by_kind = _by_kind(objs)
    assert "Secret" not in by_kind  # its random key is made by the operator, never rendered
    sts, job = by_kind["StatefulSet"][0], by_kind["Job"][0]
    for pod in (sts["spec"]["template"], job["spec"]["template"]):
        (container,) = pod["spec"]["containers"]
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["peer-key"]["secret"] == {"secretName": "digits-peer-key", "defaultMode": 0o440}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["peer-key"] == {"name": "peer-key", "mountPath": builders.PEER_KEY_DIR, "readOnly": True}
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MPNN_PEER_KEY_FILE"] == f"{builders.PEER_KEY_DIR}/key"
        assert "MPNN_TLS_DIR" not in env
        # The policy admits the trainer's pods to the peer port by this label.
        assert pod["metadata"]["labels"]["mpnn.dev/network"] == "digits"
    (policy,) = by_kind["NetworkPolicy"]
    assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 6000}]


def test_peer_key_secret_holds_the_key_base64():
    net = load_manifest(DIGITS)
    secret = builders.peer_key_secret(net, b"k" * 32)
    assert secret["metadata"]["name"] == "digits-peer-key" and secret["type"] == "Opaque"
    assert secret["data"] == {"key": "a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2s="}


def test_tls_secret_is_mounted_for_servers_and_trainer(tmp_path):
    objs = render(str(_with_server(tmp_path, {"tls": {"secretName": "digits-tls"}}, {"existingClaim": "m"})))
    by_kind = _by_kind(objs)
    for pod in (by_kind["StatefulSet"][0]["spec"]["template"], by_kind["Job"][0]["spec"]["template"]):
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "digits-tls"
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["MPNN_TLS_DIR"] == builders.TLS_DIR
    # The kubelet's gRPC probe cannot speak TLS: the servers are probed over HTTPS instead.
    (server,) = by_kind["StatefulSet"][0]["spec"]["template"]["spec"]["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert "grpc" not in server[probe]
        assert server[probe]["httpGet"] == {"path": "/v2/health/live", "port": "http", "scheme": "HTTPS"}


def test_servers_get_default_resources_unless_the_network_sets_its_own(tmp_path):
    default = {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    resources = lambda objs: _by_kind(objs)["StatefulSet"][0]["spec"]["template"]["spec"]["containers"][0].get(  # noqa: E731
        "resources")
    assert resources(render(str(DIGITS), server_resources=default)) == default
    own = {"requests": {"cpu": "2"}}
    assert resources(render(str(_with_server(tmp_path, {"resources": own})), server_resources=default)) == own
    assert resources(render(str(DIGITS))) is None


def test_cli_render_takes_server_resources_and_names_the_flag_when_bad(capsys):
    assert cli.main(["render", str(DIGITS), "--server-resources", '{"limits": {"memory": "1Gi"}}']) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert _by_kind(docs)["StatefulSet"][0]["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "limits": {"memory": "1Gi"}}
    assert cli.main(["render", str(DIGITS), "--server-resources", '{"limit": {}}']) == 2
    assert "--server-resources" in capsys.readouterr().err


@pytest.mark.parametrize("server,field", [({"peerPort": 50051}, "spec.server.peerPort"),
                                          ({"peerPort": 8000}, "spec.server.peerPort"),
                                          ({"networkPolicy": "yes"}, "spec.server.networkPolicy"),
                                          ({"tls": {"secretName": "Bad_Name"}}, "spec.server.tls.secretName"),
                                          ({"tls": {}}, "spec.server.tls.secretName")])
def test_bad_server_network_fields_name_the_field(tmp_path, server, field):
    with pytest.raises(ManifestError, match=field.replace(".", r"\.")):
        load_manifest(_with_server(tmp_path, server))
