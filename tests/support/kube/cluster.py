"""A real, local Kubernetes control plane built from Go modules.

Starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok
(fake nodes whose pods turn Running and Ready) as plain processes bound to
127.0.0.1, using the binaries built by ``hack/k8s/build.sh`` (by default
``.cache/k8s/current``). Used by ``make cluster`` / ``make cluster-down`` and
by the pytest fixtures in ``tests/conftest.py``.

Only the standard library and the ``openssl`` command are needed.

    cluster = Cluster.start(state_dir, bin_dir)   # waits until usable
    cluster.kubeconfig                             # admin kubeconfig path
    cluster.stop()                                 # kills by pid, removes state

CLI::

    python -m tests.support.kube.cluster up   [--state-dir DIR] [--bin-dir DIR] [--nodes N]
    python -m tests.support.kube.cluster down [--state-dir DIR]
    python -m tests.support.kube.cluster status [--state-dir DIR]

State directory layout (default ``.cache/cluster``): ``kubeconfig`` (admin;
written last, once everything is ready), ``cluster.json``, ``pki/``,
``pids/<component>.pid``, ``logs/<component>.log``, ``etcd/``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, TypeVar

from partition_server.client.ports import free_ports  # noqa: F401 - node.py imports it from here

ROOT = Path(__file__).resolve().parents[3]
KWOK_STAGES = Path(__file__).resolve().parent / "kwok-stages.yaml"

BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "kubectl",
)
# Start order; stop runs in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"  # first address of SERVICE_CIDR: the `kubernetes` Service
POD_CIDR = "10.244.0.0/16"
NODE_IP = "10.240.0.1"
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
CLUSTER_NAME = "mpnn-local"
REAL_NODE_IP = "10.244.0.1"  # tests/support/kube/node.py: the bridge's address

T = TypeVar("T")


class ClusterError(RuntimeError):
    """The control plane could not be started (message carries log tails)."""


def default_bin_dir() -> Path:
    """``$K8S_BIN``, else ``$K8S_CACHE/current`` (K8S_CACHE defaults to
    ``<repo>/.cache/k8s``; relative values are relative to the repo root)."""
    if os.environ.get("K8S_BIN"):
        return _abspath(os.environ["K8S_BIN"])
    return _abspath(os.environ.get("K8S_CACHE") or ".cache/k8s") / "current"


def default_state_dir() -> Path:
    return _abspath(os.environ.get("CLUSTER_DIR") or ".cache/cluster")


def _abspath(p: str | os.PathLike) -> Path:
    p = Path(p).expanduser()
    return p if p.is_absolute() else ROOT / p


def missing_binaries(bin_dir: str | os.PathLike) -> list[str]:
    """Names of the required binaries that are not executable in bin_dir."""
    d = Path(bin_dir)
    return [b for b in BINARIES if not os.access(d / b, os.X_OK)]


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 60.0,
    interval: float = 0.5,
    message: str | None = None,
) -> T:
    """Call ``predicate`` until it returns something truthy and return that.

    Exceptions raised by the predicate count as "not yet"; on timeout a
    ``TimeoutError`` names ``message`` and the last value or exception.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            last = predicate()
            if last:
                return last  # type: ignore[return-value]
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", "condition")
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(data.splitlines()[-lines:])


# --------------------------------------------------------------------------
# PKI (openssl CLI)

_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = @alt
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
[alt]
DNS.1 = localhost
DNS.2 = kubernetes
DNS.3 = kubernetes.default
DNS.4 = kubernetes.default.svc
DNS.5 = kubernetes.default.svc.cluster.local
IP.1 = 127.0.0.1
IP.2 = {service_ip}
IP.3 = {node_ip}
"""


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise ClusterError("the `openssl` command is needed to create the cluster certificates")
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ClusterError(f"openssl {' '.join(args)} failed:\n{r.stderr}")


def _new_key(pki: Path, name: str) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", f"{name}.key", cwd=pki)
    os.chmod(pki / f"{name}.key", 0o600)


def _new_cert(pki: Path, name: str, subject: str, ext: str, ca: str = "ca") -> None:
    _new_key(pki, name)
    _openssl("req", "-new", "-config", "openssl.cnf", "-key", f"{name}.key",
             "-subj", subject, "-out", f"{name}.csr", cwd=pki)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-set_serial", "0x" + os.urandom(8).hex(), "-days", "365", "-sha256",
             "-extfile", "openssl.cnf", "-extensions", ext, "-out", f"{name}.crt", cwd=pki)
    (pki / f"{name}.csr").unlink()


def make_pki(pki: Path) -> None:
    """CA, apiserver serving cert, client certs, service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    (pki / "openssl.cnf").write_text(_OPENSSL_CNF.format(service_ip=SERVICE_IP, node_ip=REAL_NODE_IP))
    _new_key(pki, "ca")
    _openssl("req", "-x509", "-new", "-config", "openssl.cnf", "-key", "ca.key",
             "-subj", f"/CN={CLUSTER_NAME}-ca", "-days", "3650", "-sha256",
             "-extensions", "ca", "-out", "ca.crt", cwd=pki)
    _new_cert(pki, "apiserver", "/CN=kube-apiserver", "server")
    _new_cert(pki, "admin", "/O=system:masters/CN=kubernetes-admin", "client")
    _new_cert(pki, "controller-manager", "/CN=system:kube-controller-manager", "client")
    _new_cert(pki, "scheduler", "/CN=system:kube-scheduler", "client")
    _new_cert(pki, "kwok", "/O=system:masters/CN=kwok-controller", "client")
    # The API server's client certificate towards kubelets (logs, exec, port-forward).
    _new_cert(pki, "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client", "client")
    # Front proxy (request-header authentication for the aggregation layer;
    # also read by the controller manager's and scheduler's delegated authn).
    _new_key(pki, "front-proxy-ca")
    _openssl("req", "-x509", "-new", "-config", "openssl.cnf", "-key", "front-proxy-ca.key",
             "-subj", f"/CN={CLUSTER_NAME}-front-proxy-ca", "-days", "3650", "-sha256",
             "-extensions", "ca", "-out", "front-proxy-ca.crt", cwd=pki)
    _new_cert(pki, "front-proxy-client", "/CN=front-proxy-client", "client", ca="front-proxy-ca")
    # Service-account token signing key pair (TokenRequest, `kubectl create token`).
    _new_key(pki, "sa")
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def kubeconfig_text(server: str, pki: Path, user: str, cert: str) -> str:
    """A self-contained kubeconfig (certificates embedded)."""
    return f"""\
apiVersion: v1
kind: Config
clusters:
- name: {CLUSTER_NAME}
  cluster:
    server: {server}
    certificate-authority-data: {_b64(pki / "ca.crt")}
users:
- name: {user}
  user:
    client-certificate-data: {_b64(pki / f"{cert}.crt")}
    client-key-data: {_b64(pki / f"{cert}.key")}
contexts:
- name: {CLUSTER_NAME}
  context:
    cluster: {CLUSTER_NAME}
    user: {user}
    namespace: default
current-context: {CLUSTER_NAME}
"""


# --------------------------------------------------------------------------
# processes


def _cmdline(pid: int) -> str | None:
    """The command line of a live (non-zombie) process, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return None
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return None
    except OSError:
        pass
    r = subprocess.run(["ps", "-o", "stat=,command=", "-p", str(pid)], capture_output=True, text=True)
    out = r.stdout.strip()
    if r.returncode != 0 or not out or out.startswith("Z"):
        return None
    return out.split(None, 1)[1] if " " in out else out


def tied_to_parent(cmd: list[str]) -> list[str]:
    """``cmd`` run so that it gets SIGKILL when this process dies (Linux ``PR_SET_PDEATHSIG``,
    through util-linux ``setpriv``); ``cmd`` unchanged where that is not available.

    ``setpriv`` rather than a ``preexec_fn``: a preexec_fn makes subprocess fork() instead of
    vfork(), and in a process with gRPC threads the fork handlers can abort the child.
    SIGKILL rather than SIGTERM: a throwaway cluster has nothing to save, and a gracefully
    stopping kube-apiserver can linger on open requests.
    """
    setpriv = shutil.which("setpriv") if sys.platform == "linux" else None
    return [setpriv, "--pdeathsig", "KILL", "--", *cmd] if setpriv else list(cmd)


class Cluster:
    """One local control plane rooted at ``state_dir``."""

    def __init__(self, state_dir: str | os.PathLike, bin_dir: str | os.PathLike | None = None,
                 nodes: int = 2, log: Callable[[str], None] | None = None,
                 real_node: bool = False, images: list[str] | tuple[str, ...] = ()):
        self.state_dir = Path(state_dir).resolve()
        self.real_node = real_node
        self.images = [str(Path(i).resolve()) for i in images]
        self.node = None
        if real_node:
            from .node import RealNode

            self.node = RealNode(self)
        self.bin_dir = Path(bin_dir).resolve() if bin_dir else None
        self.nodes = nodes
        self.ports: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._log = log or (lambda msg: print(f"[cluster] {msg}", file=sys.stderr, flush=True))
        self._ssl: ssl.SSLContext | None = None
        self.startup_seconds: float | None = None

    # -- paths
    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def pki(self) -> Path:
        return self.state_dir / "pki"

    @property
    def host(self) -> str:
        """The API server's address: loopback, or the real node's bridge address (pods reach it)."""
        return REAL_NODE_IP if self.real_node else "127.0.0.1"

    @property
    def server(self) -> str:
        return f"https://{self.host}:{self.ports['apiserver']}"

    @property
    def components(self) -> tuple[str, ...]:
        if self.real_node:
            from .node import NODE_COMPONENTS

            return COMPONENTS + NODE_COMPONENTS
        return COMPONENTS

    @property
    def kubectl_path(self) -> Path:
        assert self.bin_dir is not None
        return self.bin_dir / "kubectl"

    def log_path(self, component: str) -> Path:
        return self.state_dir / "logs" / f"{component}.log"

    def pid_path(self, component: str) -> Path:
        return self.state_dir / "pids" / f"{component}.pid"

    # -- lifecycle
    @classmethod
    def start(cls, state_dir: str | os.PathLike, bin_dir: str | os.PathLike | None = None,
              nodes: int = 2, timeout: float = 240.0, die_with_parent: bool = False,
              log: Callable[[str], None] | None = None, real_node: bool = False,
              images: list[str] | tuple[str, ...] = ()) -> "Cluster":
        """Start a fresh control plane and wait until it is usable.

        ``state_dir`` must not hold a running cluster (it is wiped). With
        ``die_with_parent`` (Linux) the components get SIGKILL when the
        calling process dies, so a killed test run leaves no processes.
        On failure everything started is stopped again and ClusterError
        carries the failing component's log tail.
        """
        c = cls(state_dir, bin_dir or default_bin_dir(), nodes=nodes, log=log, real_node=real_node,
                images=images)
        c._start(timeout, die_with_parent)
        return c

    @classmethod
    def load(cls, state_dir: str | os.PathLike) -> "Cluster":
        """A handle on a cluster started earlier (e.g. by ``make cluster``)."""
        info = json.loads((Path(state_dir) / "cluster.json").read_text())
        c = cls(state_dir, real_node=info.get("real_node", False), images=info.get("images", []))
        c.bin_dir = Path(info["bin_dir"])
        c.ports = info["ports"]
        c.nodes = info.get("nodes", 2)
        return c

    def pids(self) -> dict[str, int]:
        out = {}
        for comp in self.components:
            try:
                out[comp] = int(self.pid_path(comp).read_text().strip())
            except (OSError, ValueError):
                pass
        return out

    def alive(self) -> dict[str, bool]:
        """Component -> whether its recorded process is still running."""
        return {comp: self._owns(pid) for comp, pid in self.pids().items()}

    def _owns(self, pid: int) -> bool:
        # Only a live process whose command line names our state dir is ours
        # (guards against pid reuse).
        cmd = _cmdline(pid)
        return cmd is not None and f"{self.state_dir}{os.sep}" in cmd

    def healthy(self) -> bool:
        alive = self.alive()
        if not self.kubeconfig.exists() or not alive or not all(alive.values()):
            return False
        try:
            return self._get("/readyz", timeout=3)[0] == 200
        except OSError:
            return False

    def _start(self, timeout: float, die_with_parent: bool) -> None:
        t0 = time.monotonic()
        deadline = t0 + timeout
        assert self.bin_dir is not None
        missing = missing_binaries(self.bin_dir)
        if self.real_node:
            from .node import NODE_BINARIES

            missing += [b for b in NODE_BINARIES if not os.access(self.bin_dir / b, os.X_OK)]
        if missing:
            raise ClusterError(
                f"missing binaries in {self.bin_dir}: {', '.join(missing)} (run `make k8s-binaries`)")
        if self.state_dir.exists():
            if any(self.alive().values()):
                raise ClusterError(f"{self.state_dir} holds a running cluster; stop it first")
            shutil.rmtree(self.state_dir)
        for sub in ("logs", "pids", "etcd", "kwok-home"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        os.chmod(self.state_dir / "etcd", 0o700)
        try:
            if self.node is not None:
                self.node.prepare_host()
            make_pki(self.pki)
            names = ["etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok"]
            self.ports = dict(zip(names, free_ports(len(names))))
            self._write_info()
            for user, cert, name in (
                ("system:kube-controller-manager", "controller-manager", "controller-manager"),
                ("system:kube-scheduler", "scheduler", "scheduler"),
                ("kwok-controller", "kwok", "kwok"),
            ):
                (self.state_dir / f"{name}.kubeconfig").write_text(
                    kubeconfig_text(self.server, self.pki, user, cert))

            self._spawn("etcd", self._etcd_args(), die_with_parent)
            self._wait("etcd", self._etcd_healthy, deadline, 30)

            self._spawn("kube-apiserver", self._apiserver_args(), die_with_parent)
            self._wait("kube-apiserver", lambda: self._get("/readyz", timeout=3)[0] == 200, deadline, 120)

            self._spawn("kube-controller-manager", self._kcm_args(), die_with_parent)
            self._spawn("kube-scheduler", self._scheduler_args(), die_with_parent)
            self._create_nodes()
            self._spawn("kwok", self._kwok_args(), die_with_parent)
            self._wait("kube-controller-manager",
                       lambda: self._healthz(self.ports["controller-manager"]), deadline, 90)
            self._wait("kube-scheduler", lambda: self._healthz(self.ports["scheduler"]), deadline, 90)
            self._wait("kwok", self._nodes_ready, deadline, 90, what="kwok nodes Ready")
            if self.node is not None:
                self.node.start(deadline, die_with_parent)
            # The serviceaccount controller works (pods can be created in "default").
            self._wait("kube-controller-manager",
                       lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
                       deadline, 60, what="default ServiceAccount")
            tmp = self.kubeconfig.with_suffix(".tmp")
            tmp.write_text(kubeconfig_text(self.server, self.pki, "kubernetes-admin", "admin"))
            os.chmod(tmp, 0o600)
            tmp.replace(self.kubeconfig)
        except BaseException:
            self.stop(remove_state=False)
            raise
        self.startup_seconds = time.monotonic() - t0
        self._write_info()
        self._log(f"control plane ready in {self.startup_seconds:.1f}s: {self.server} "
                  f"({self.nodes} kwok nodes{', a real node' if self.real_node else ''}), "
                  f"kubeconfig {self.kubeconfig}")

    def stop(self, remove_state: bool = True, grace: float = 15.0) -> list[str]:
        """Stop every component recorded in the pid files (reverse start
        order; SIGTERM, then SIGKILL after ``grace`` seconds), undo the real
        node's host changes and, by default, remove the state directory.
        Returns what the real node could not undo (empty: nothing left)."""
        errors: list[str] = []
        if self.node is not None:
            self.node.stop_workloads()
        for comp in reversed(COMPONENTS):
            self._stop_component(comp, grace)
        self._procs.clear()
        if self.node is not None:
            errors = self.node.restore_host()
            errors += self.node.leftovers()
        if remove_state and self.state_dir.exists():
            if self.node is not None:
                left = self.node.leftovers()
                if left:  # never rm -rf through a live mount
                    return errors + left
            shutil.rmtree(self.state_dir, ignore_errors=True)
        return errors

    def _stop_component(self, comp: str, grace: float) -> None:
        pid = self.pids().get(comp)
        if pid is None:
            return
        proc = self._procs.get(comp)
        if self._owns(pid):
            self._signal(pid, signal.SIGTERM)
            end = time.monotonic() + grace
            while time.monotonic() < end and self._owns(pid):
                if proc is not None and proc.poll() is not None:
                    break
                time.sleep(0.1)
            if self._owns(pid):
                self._log(f"{comp} (pid {pid}) ignored SIGTERM; killing")
                self._signal(pid, signal.SIGKILL)
                wait_for(lambda: not self._owns(pid), timeout=10, interval=0.1,
                         message=f"{comp} (pid {pid}) to exit")
        if proc is not None:
            try:
                proc.wait(timeout=5)  # reap our child
            except subprocess.TimeoutExpired:
                pass
        self.pid_path(comp).unlink(missing_ok=True)

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        try:
            # Each component leads its own session/process group.
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def _write_info(self) -> None:
        info = {
            "bin_dir": str(self.bin_dir),
            "ports": self.ports,
            "nodes": self.nodes,
            "server": self.server if self.ports else None,
            "kubeconfig": str(self.kubeconfig),
            "startup_seconds": self.startup_seconds,
            "real_node": self.real_node,
            "images": self.images,
        }
        (self.state_dir / "cluster.json").write_text(json.dumps(info, indent=2) + "\n")

    def _spawn(self, comp: str, args: list[str], tie_to_parent: bool, binary: str | None = None) -> None:
        assert self.bin_dir is not None
        env = dict(os.environ)
        env.pop("KUBECONFIG", None)
        if comp == "kwok":
            env["HOME"] = str(self.state_dir / "kwok-home")  # ignore ~/.kwok/kwok.yaml
        with open(self.log_path(comp), "ab") as logf, open(os.devnull, "rb") as devnull:
            cmd = [binary or str(self.bin_dir / comp), *args]
            proc = subprocess.Popen(
                tied_to_parent(cmd) if tie_to_parent else cmd,
                stdin=devnull, stdout=logf, stderr=subprocess.STDOUT,
                cwd=self.state_dir, env=env, start_new_session=True,
            )
        self._procs[comp] = proc
        self.pid_path(comp).write_text(f"{proc.pid}\n")

    def _wait(self, comp: str, check: Callable[[], bool], deadline: float, limit: float,
              what: str | None = None) -> None:
        what = what or comp
        end = min(deadline, time.monotonic() + limit)
        last: object = None
        while True:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise ClusterError(
                        f"{name} exited with code {proc.returncode} while waiting for {what}; "
                        f"last lines of {self.log_path(name)}:\n{log_tail(self.log_path(name))}")
            try:
                if check():
                    return
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
            if time.monotonic() >= end:
                raise ClusterError(
                    f"timed out waiting for {what} (last error: {last!r}); last lines of "
                    f"{self.log_path(comp)}:\n{log_tail(self.log_path(comp))}")
            time.sleep(0.25)

    # -- HTTP helpers (admin client certificate)
    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
            ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
            self._ssl = ctx
        return self._ssl

    def _request(self, method: str, path: str, body: object = None,
                 timeout: float = 10) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, context=self._context(), timeout=timeout) as r:
                raw, status = r.read(), r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def _get(self, path: str, timeout: float = 10) -> tuple[int, object]:
        return self._request("GET", path, timeout=timeout)

    @staticmethod
    def _healthz(port: int) -> bool:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # self-signed serving cert; /healthz only
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=ctx, timeout=3) as r:
            return r.status == 200

    def _etcd_healthy(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['etcd']}/health", timeout=3) as r:
            return json.loads(r.read()).get("health") == "true"

    def node_names(self) -> list[str]:
        return [f"kwok-node-{i}" for i in range(self.nodes)]

    def _create_nodes(self) -> None:
        resources = {"cpu": "32", "memory": "256Gi", "pods": "110", "ephemeral-storage": "1Ti"}
        for name in self.node_names():
            node = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "node-role.kubernetes.io/agent": "",
                        "type": "kwok",
                    },
                },
                "status": {
                    "allocatable": resources,
                    "capacity": resources,
                    "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux",
                                 "kubeletVersion": "fake", "kubeProxyVersion": "fake"},
                    "phase": "Running",
                },
            }
            status, body = self._request("POST", "/api/v1/nodes", node)
            if status not in (201, 409):
                raise ClusterError(f"creating node {name} failed: {status} {body}")

    def _nodes_ready(self) -> bool:
        status, body = self._get("/api/v1/nodes")
        if status != 200 or not isinstance(body, dict):
            return False
        ready = {
            n["metadata"]["name"]
            for n in body.get("items", [])
            for c in (n.get("status") or {}).get("conditions") or []
            if c.get("type") == "Ready" and c.get("status") == "True"
        }
        return set(self.node_names()) <= ready

    # -- command lines
    def _etcd_args(self) -> list[str]:
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        return [
            "--name=default",
            f"--data-dir={self.state_dir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync",  # throwaway data: trade durability for speed
            "--log-level=warn",
        ]

    def _apiserver_args(self) -> list[str]:
        pki = self.pki
        return [
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            f"--bind-address={self.host}",
            f"--advertise-address={self.host}",
            f"--secure-port={self.ports['apiserver']}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            "--authorization-mode=Node,RBAC",
            "--anonymous-auth=false",
            f"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            "--allow-privileged=true",
            # The loopback advertise address cannot be an Endpoints address; with a real node
            # the bridge address can, and pods reach the `kubernetes` Service through it.
            f"--endpoint-reconciler-type={'lease' if self.real_node else 'none'}",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            "--profiling=false",
            f"--cert-dir={self.state_dir / 'apiserver-certs'}",
        ]

    def _kcm_args(self) -> list[str]:
        kc = self.state_dir / "controller-manager.kubeconfig"
        pki = self.pki
        return [
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.ports['controller-manager']}",
            f"--cert-dir={self.state_dir / 'controller-manager-certs'}",
            "--leader-elect=false",
            # All default controllers: statefulset, garbagecollector,
            # persistentvolume-binder, serviceaccount(-token),
            # root-ca-certificate-publisher, namespace, replicaset, ...
            "--controllers=*",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--cluster-name={CLUSTER_NAME}",
            "--profiling=false",
        ]

    def _scheduler_args(self) -> list[str]:
        kc = self.state_dir / "scheduler.kubeconfig"
        return [
            f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.ports['scheduler']}",
            f"--cert-dir={self.state_dir / 'scheduler-certs'}",
            "--leader-elect=false",
            "--profiling=false",
        ]

    def _kwok_args(self) -> list[str]:
        return [
            f"--kubeconfig={self.state_dir / 'kwok.kubeconfig'}",
            f"--config={KWOK_STAGES}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
            "--node-lease-duration-seconds=40",
            f"--cidr={POD_CIDR}",
            f"--node-ip={NODE_IP}",
            f"--server-address=127.0.0.1:{self.ports['kwok']}",
        ]


# --------------------------------------------------------------------------
# CLI


def _up(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).resolve()
    if (state / "cluster.json").exists():
        existing = Cluster.load(state)
        if existing.healthy():
            print(f"cluster already running: {existing.server}\n"
                  f"export KUBECONFIG={existing.kubeconfig}")
            return 0
        print(f"removing stale cluster state in {state}", file=sys.stderr)
        existing.stop()
    try:
        c = Cluster.start(state, Path(args.bin_dir).resolve(), nodes=args.nodes, timeout=args.timeout,
                          real_node=args.real_node, images=args.image)
    except ClusterError as e:
        print(f"cluster failed to start: {e}", file=sys.stderr)
        print(f"logs kept in {state / 'logs'}; remove them with `python -m tests.support.kube.cluster down --state-dir {state}` (or `make cluster-down`)", file=sys.stderr)
        return 1
    print(f"export KUBECONFIG={c.kubeconfig}")
    return 0


def _down(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).resolve()
    if not state.exists():
        print(f"no cluster state in {state}")
        return 0
    c = Cluster.load(state) if (state / "cluster.json").exists() else Cluster(state)
    if c.bin_dir is None:
        c.bin_dir = default_bin_dir()
    left = c.stop()
    if left:
        print("cluster stopped, but these are left behind:\n  " + "\n  ".join(left), file=sys.stderr)
        return 1
    print(f"cluster stopped, {state} removed" + (", host changes undone" if c.real_node else ""))
    return 0


def _status(args: argparse.Namespace) -> int:
    state = Path(args.state_dir).resolve()
    if not (state / "cluster.json").exists():
        print(f"no cluster in {state}")
        return 1
    c = Cluster.load(state)
    for comp, ok in c.alive().items():
        print(f"{comp:24} {'running' if ok else 'NOT running'} (pid {c.pids()[comp]})")
    healthy = c.healthy()
    print(f"apiserver {c.server}: {'ready' if healthy else 'NOT ready'}")
    return 0 if healthy else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.support.kube.cluster", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("up", "down", "status"):
        sp = sub.add_parser(name)
        sp.add_argument("--state-dir", default=str(default_state_dir()),
                        help="state directory (default: $CLUSTER_DIR or .cache/cluster)")
        if name == "up":
            sp.add_argument("--bin-dir", default=str(default_bin_dir()),
                            help="binaries (default: $K8S_BIN or $K8S_CACHE/current)")
            sp.add_argument("--nodes", type=int, default=2, help="number of kwok nodes (default 2)")
            sp.add_argument("--timeout", type=float, default=240, help="startup timeout, seconds")
            sp.add_argument("--real-node", action="store_true",
                            help="add a real node (containerd, kubelet, kube-proxy, CoreDNS; needs root)")
            sp.add_argument("--image", action="append", default=[],
                            help="OCI archive to import into the real node's containerd (repeatable)")
    args = p.parse_args(argv)
    return {"up": _up, "down": _down, "status": _status}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
