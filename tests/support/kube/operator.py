"""Running the operator against the local control plane (tests/support/kube), and reading what it
made: shared by the operator, install and training tests.

``crds`` and ``operator`` are fixtures: import them into a test module to use them.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from partition_server.api.distributor import parse_neuron_ids
from partition_server.api.lookup import LookupTable
from tests.support.kube.kubectl import Kubectl

ROOT = Path(__file__).resolve().parents[3]
DIGITS = ROOT / "examples" / "digits.yaml"
NFS = {"nfs": {"server": "10.0.0.1", "path": "/exports/mpnn"}}
CHILD_KINDS = ("partitions.mpnn.dev", "configmap", "service", "statefulset", "persistentvolumeclaim")
SELECTOR = "app.kubernetes.io/managed-by=mpnn-operator,mpnn.dev/network=digits"


# How the API server words an RBAC denial; a denial for any other reason (say, a
# namespace being deleted) is worded differently and is not a permission gap.
RBAC_DENIAL = "cannot "


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Operator:
    """`python -m partition_server.cli operator` as a child process with the given kubeconfig:
    watching ``namespaces``, or cluster-wide without them; ``args``: more flags."""

    def __init__(self, kubeconfig: str | Path, log_path: Path, namespaces: list[str] | None = None,
                 args: list[str] | None = None):
        self.kubeconfig, self.log_path, self.namespaces = str(kubeconfig), log_path, namespaces or []
        self.args = list(args or [])
        self.proc: subprocess.Popen | None = None
        self.port = self.metrics_port = 0

    def start(self) -> "Operator":
        self.port, self.metrics_port = _free_port(), _free_port()
        path = os.pathsep.join([str(ROOT), str(ROOT / "operator"), os.environ.get("PYTHONPATH", "")])
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
        env.update(KUBECONFIG=self.kubeconfig, PYTHONPATH=path)
        # Its own free ports: the defaults (8080, 8081) may be held by anything else on the machine.
        cmd = [sys.executable, "-m", "partition_server.cli", "operator", "--liveness-port", str(self.port),
               "--metrics-port", str(self.metrics_port), "--log-level", "info"]
        for ns in self.namespaces:
            cmd += ["--namespace", ns]
        cmd += self.args
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"operator /healthz not up within 60s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:]) or "(no log)"

    def rbac_denials(self) -> list[str]:
        return [line for line in self.log().splitlines() if "system:serviceaccount:" in line and RBAC_DENIAL in line]


@contextmanager
def running_operator(kubeconfig: str | Path, log_path: Path, namespaces: list[str] | None = None) -> Iterator[Operator]:
    op = Operator(kubeconfig, log_path, namespaces)
    try:
        yield op.start()
    finally:
        op.stop()
        print(f"--- operator log ({log_path}) ---\n{op.tail(200)}")


def apply_crds(kubectl, directory: Path) -> None:
    """Apply the CRDs in ``directory`` and wait until they are established and discoverable."""
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(directory))
    kubectl("wait", "--for=condition=Established", "crd/neuralnetworks.mpnn.dev", "crd/partitions.mpnn.dev",
            "--timeout=60s")
    # Discovery of a new group can lag a moment behind Established.
    deadline = time.monotonic() + 30
    while kubectl("get", "nn", "-A", check=False).returncode != 0:
        assert time.monotonic() < deadline, "NeuralNetwork resource not discoverable"
        time.sleep(0.5)


@pytest.fixture(scope="session")
def crds(kubectl) -> None:
    apply_crds(kubectl, ROOT / "crds")


@pytest.fixture
def operator(crds, kubeconfig, kubectl_bin, namespace, tmp_path) -> Iterator[Operator]:
    op = Operator(kubeconfig, tmp_path / "operator.log", [namespace])
    try:
        yield op.start()
        # While the operator still runs: its finalizer deletes the PersistentVolume.
        if op.proc is not None:
            Kubectl(kubectl_bin, kubeconfig)("delete", "neuralnetworks.mpnn.dev", "--all", "--timeout=60s",
                                             namespace=namespace, check=False)
    finally:
        op.stop()
        print(f"--- operator log ({op.log_path}) ---\n{op.tail(200)}")


def digits(**spec: Any) -> dict:
    """examples/digits.yaml with NFS storage, without its training (pass ``training=`` for a
    training Job), updated with ``spec``."""
    doc = yaml.safe_load(DIGITS.read_text())
    doc["spec"]["storage"] = copy.deepcopy(NFS)
    doc["spec"].pop("training")
    doc["spec"].update(spec)
    return doc


def nn(kubectl, ns: str) -> dict:
    return kubectl.json("get", "neuralnetwork", "digits", namespace=ns)


def condition(obj: dict, type_: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def lookup(kubectl, ns: str) -> LookupTable:
    cm = kubectl.json("get", "configmap", "digits-lookup", namespace=ns)
    return LookupTable.from_configmap(cm)  # data["lookup.json"], or binaryData["lookup.json.gz"] when large


def partitions(kubectl, ns: str) -> list[dict]:
    items = kubectl.json("get", "partitions.mpnn.dev", "-l", SELECTOR, namespace=ns)["items"]
    return sorted(items, key=lambda p: p["spec"]["index"])


def converged(kubectl, ns: str, n: int) -> dict | None:
    """The NeuralNetwork once it reports n ready partitions for its current generation."""
    obj = nn(kubectl, ns)
    st = obj.get("status") or {}
    ok = (st.get("observedGeneration") == obj["metadata"]["generation"] and st.get("phase") == "Ready"
          and st.get("partitions") == n and st.get("readyPartitions") == n
          and condition(obj, "Ready").get("status") == "True")
    return obj if ok else None


def wait_ready(kubectl, ns: str, n: int, wait_for, op: Operator, timeout: float = 150) -> dict:
    try:
        return wait_for(lambda: converged(kubectl, ns, n), timeout=timeout,
                        message=f"NeuralNetwork digits Ready with {n} partitions")
    except Exception as exc:
        raise AssertionError(f"{exc}\nstatus: {json.dumps(nn(kubectl, ns).get('status'), indent=1)}\n"
                             f"operator log:\n{op.tail()}") from exc


def resource_versions(kubectl, ns: str) -> dict[str, str]:
    out = {}
    for kind in CHILD_KINDS:
        for obj in kubectl.json("get", kind, "-l", SELECTOR, namespace=ns)["items"]:
            out[f"{obj['kind']}/{obj['metadata']['name']}"] = obj["metadata"]["resourceVersion"]
    for pv in kubectl.json("get", "pv", "-l", f"{SELECTOR},mpnn.dev/namespace={ns}")["items"]:
        out[f"PersistentVolume/{pv['metadata']['name']}"] = pv["metadata"]["resourceVersion"]
    return out


def assert_partitions_match(kubectl, ns: str, table: LookupTable) -> None:
    parts = partitions(kubectl, ns)
    assert [p["spec"]["index"] for p in parts] == list(range(table.num_partitions))
    for p in parts:
        claimed = sorted(parse_neuron_ids(t, "ranges") for t in p["spec"]["ranges"])
        owned = sorted((k, r.start, r.end) for k in range(table.num_layers)
                       for r in table.ranges(k, p["spec"]["index"]))
        assert claimed == owned, p["metadata"]["name"]


def events(kubectl, ns: str) -> list[dict]:
    return kubectl.json("get", "events", "--field-selector", "involvedObject.kind=NeuralNetwork",
                        namespace=ns)["items"]


def token_kubeconfig(kubectl, admin_kubeconfig: str, namespace: str, service_account: str, path: Path) -> Path:
    """A kubeconfig that authenticates as ``namespace/service_account`` with a bound token."""
    token = kubectl("create", "token", service_account, "--duration=1h", namespace=namespace).stdout.strip()
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())
    cluster = dict(admin["clusters"][0]["cluster"])
    if "certificate-authority" in cluster:  # inline it, so the file stands alone
        ca = Path(cluster.pop("certificate-authority"))
        if not ca.is_absolute():
            ca = Path(admin_kubeconfig).parent / ca
        cluster["certificate-authority-data"] = base64.b64encode(ca.read_bytes()).decode()
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": cluster}],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "cluster", "user": service_account}}],
        "current-context": "sa",
    }))
    return path


def as_trainer(config: Path, namespace: str, network: str = "digits", run: str = "run-1"):
    """``call(code) -> stdout``: runs ``code`` in a process of its own, with ``r`` a
    ``TrainingReporter`` of ``namespace/network`` and run ``run``, authenticated by the kubeconfig
    ``config`` (e.g. the trainer's ServiceAccount, :func:`token_kubeconfig`)."""
    def call(code: str) -> str:
        script = ("import json\nfrom partition_server.client.trainer import TrainingReporter\n"
                  f"r = TrainingReporter.for_network({namespace!r}, {network!r}, {run!r})\n{code}\n")
        path = os.pathsep.join([str(ROOT), str(ROOT / "operator"), os.environ.get("PYTHONPATH", "")])
        env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                             env={**env, "KUBECONFIG": str(config), "PYTHONPATH": path})
        assert out.returncode == 0, out.stderr
        return out.stdout
    return call
