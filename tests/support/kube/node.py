"""A real node for the local control plane: containerd + runc + CNI bridge, kubelet,
kube-proxy (iptables) and CoreDNS, all as plain processes started and stopped by pid.

Used by ``Cluster(real_node=True)`` (``make cluster NODE=real``) and the e2e tests. The node
is the host itself, so it needs root, writable cgroups (v1 or v2) and overlayfs; see
``unavailable()``. Everything it changes on the host is recorded in ``<state>/host.json``
before it is changed and undone by ``RealNode.teardown()``; ``leftovers()`` lists whatever
is still there afterwards (a test asserts it is empty).

Host changes (all undone): a bridge ``cni0`` (10.244.0.1/24, also the API server's,
the kubelet's and CoreDNS's address), the sysctls in ``SYSCTLS`` (kubelet, bridge plugin,
kube-proxy), iptables chains ``KUBE-*``/``CNI-*`` (kube-proxy, bridge/portmap plugins),
cgroups under ``/<CGROUP_ROOT>`` in every hierarchy, mounts under the state directory,
``/run/containerd/s`` (containerd-shim sockets), ``/var/lib/cni`` (CNI result cache) and
``/var/log/containers`` (kubelet symlinks). Ports: 53 on 10.244.0.1 (CoreDNS), 10250 on
10.244.0.1 (kubelet); the rest are free loopback ports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .cluster import Cluster

NODE_NAME = "mpnn-node"
BRIDGE = "cni0"
NODE_IP = "10.244.0.1"  # the bridge's gateway address
POD_SUBNET = "10.244.0.0/24"
CLUSTER_CIDR = "10.244.0.0/16"
CGROUP_ROOT = "mpnn-node"
CNI_NETWORK = "mpnn-node"
CNI_BIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
PAUSE_IMAGE = "mpnn.local/pause:1"
SYSCTLS = (
    "kernel.panic", "kernel.panic_on_oops", "vm.overcommit_memory",  # kubelet
    "net.ipv4.ip_forward",  # bridge plugin (isGateway)
    "net.ipv4.conf.all.route_localnet",  # kube-proxy
    "net.bridge.bridge-nf-call-iptables",
)
# Host paths some component creates whatever we configure; removed again if they did not exist.
HOST_DIRS = ("/run/containerd", "/var/lib/cni", "/var/log/containers", "/var/log/pods")
NODE_COMPONENTS = ("containerd", "coredns", "kubelet", "kube-proxy")
NODE_BINARIES = ("kubelet", "kube-proxy", "coredns", "pause")
APT_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", "conntrack")
LOCK = "/run/mpnn-real-node.lock"


def _sh(*cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


def cni_bin_dir() -> str | None:
    for d in CNI_BIN_DIRS:
        if os.access(f"{d}/bridge", os.X_OK):
            return d
    return None


def unavailable() -> str | None:
    """Why a real node cannot run here, or None."""
    if os.geteuid() != 0:
        return "a real node needs root (kubelet, containerd, iptables, cgroups)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "a real node needs overlayfs (no 'overlay' in /proc/filesystems)"
    if not _cgroups_writable():
        return "a real node needs writable cgroups (/sys/fs/cgroup is read-only)"
    missing = [t for t in ("containerd", "runc", "ctr", "iptables", "ip") if shutil.which(t) is None]
    if cni_bin_dir() is None:
        missing.append("CNI plugins")
    if missing:
        return (f"missing {', '.join(missing)}: `make node-packages` installs "
                f"{' '.join(APT_PACKAGES)} (Debian packages)")
    return None


def _cgroups_writable() -> bool:
    base = Path("/sys/fs/cgroup")
    probe = (base / "memory" if (base / "memory").is_dir() else base) / f"{CGROUP_ROOT}-probe"
    try:
        probe.mkdir()
        probe.rmdir()
        return True
    except FileExistsError:
        try:
            probe.rmdir()
        except OSError:
            pass
        return True
    except OSError:
        return False


def _cgroup_hierarchies() -> list[Path]:
    """Mount points of every cgroup hierarchy (v1 controllers, named, and v2)."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype = right.split()[0] if right else ""
        if fstype in ("cgroup", "cgroup2"):
            out.append(Path(left.split()[4]))
    return out


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def _read_sysctl(name: str) -> str | None:
    try:
        return _sysctl_path(name).read_text().strip()
    except OSError:
        return None


def _mounts_under(prefix: Path) -> list[str]:
    pre = str(prefix).rstrip("/") + "/"
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].encode().decode("unicode_escape")
        if mp.startswith(pre) or mp == pre.rstrip("/"):
            out.append(mp)
    return out


def _iptables_chains() -> dict[str, list[str]]:
    """Our chains (KUBE-*, CNI-*) per table, in iptables and ip6tables."""
    out: dict[str, list[str]] = {}
    for tool in ("iptables", "ip6tables"):
        if shutil.which(f"{tool}-save") is None:
            continue
        r = _sh(f"{tool}-save", check=False)
        table = ""
        for line in r.stdout.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":") and re.match(r":(KUBE-|CNI-)", line):
                out.setdefault(f"{tool}/{table}", []).append(line[1:].split()[0])
    return out


def _pids_with(needle: str) -> list[int]:
    """Live processes whose command line contains ``needle``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmd and state != "Z":
            out.append(int(d.name))
    return out


class RealNode:
    """The real node of one ``Cluster`` (same state directory)."""

    def __init__(self, cluster: "Cluster"):
        self.c = cluster
        self.dir = cluster.state_dir / "node"
        self.host_file = cluster.state_dir / "host.json"

    # -- paths
    @property
    def sock(self) -> Path:
        return self.dir / "containerd" / "containerd.sock"

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _sh("ctr", "--address", str(self.sock), "-n", "k8s.io", *args, check=check)

    # -- host preparation (before the API server, which binds the bridge address)
    def prepare_host(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.host_file.exists():
            raise RuntimeError(f"{self.host_file} exists: run `make cluster-down` first")
        fd = os.open(LOCK, os.O_CREAT | os.O_RDWR, 0o644)
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"another real node runs on this host ({LOCK} is locked)")
        os.write(fd, f"{self.c.state_dir}\n".encode())
        self._lock_fd = fd
        if Path(f"/sys/class/net/{BRIDGE}").exists():
            raise RuntimeError(f"a link {BRIDGE} exists already; not touching it")
        host = {
            "sysctls": {k: _read_sysctl(k) for k in SYSCTLS},
            "dirs": {d: os.path.exists(d) for d in HOST_DIRS},
            "iptables": _iptables_chains(),
            "cgroup_root": CGROUP_ROOT,
        }
        self.host_file.write_text(json.dumps(host, indent=2) + "\n")
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
        _sh("ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
        _sh("ip", "link", "set", BRIDGE, "up")
        # The kubelet needs its cgroup root to exist in every hierarchy.
        for h in _cgroup_hierarchies():
            d = h / CGROUP_ROOT
            d.mkdir(exist_ok=True)
            for f in ("cpuset.cpus", "cpuset.mems"):
                if (h / f).exists() and not (d / f).read_text().strip():
                    (d / f).write_text((h / f).read_text())

    # -- start (after the control plane is up)
    def start(self, deadline: float, die_with_parent: bool) -> None:
        from .cluster import _new_cert, free_ports, kubeconfig_text

        c = self.c
        ports = dict(zip(("kubelet-healthz", "proxy-healthz", "proxy-metrics", "dns-health", "dns-ready"),
                         free_ports(5)))
        c.ports.update(ports)
        c._write_info()
        pki = c.pki

        _new_cert(pki, "kubelet", f"/O=system:nodes/CN=system:node:{NODE_NAME}", "client")
        _new_cert(pki, "kube-proxy", "/CN=system:kube-proxy", "client")
        for name, user, cert in (("kubelet", f"system:node:{NODE_NAME}", "kubelet"),
                                 ("kube-proxy", "system:kube-proxy", "kube-proxy"),
                                 ("coredns", "kubernetes-admin", "admin")):
            (self.dir / f"{name}.kubeconfig").write_text(kubeconfig_text(c.server, pki, user, cert))
        for sub in ("containerd", "cni/net.d", "cni/ipam", "kubelet", "pod-logs", "runc"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "containerd.toml").write_text(self._containerd_config())
        (self.dir / "cni/net.d/10-mpnn.conflist").write_text(json.dumps(self._cni_config(), indent=2))
        (self.dir / "kubelet.yaml").write_text(json.dumps(self._kubelet_config(), indent=2))
        (self.dir / "kube-proxy.yaml").write_text(json.dumps(self._proxy_config(), indent=2))
        (self.dir / "Corefile").write_text(self._corefile())
        (self.dir / "resolv.conf").write_text("")

        c._spawn("containerd", ["--config", str(self.dir / "containerd.toml")], die_with_parent,
                 binary=shutil.which("containerd"))
        c._wait("containerd", lambda: self.ctr("version").returncode == 0, deadline, 30)
        t = time.monotonic()
        for archive in self.image_archives():
            self.ctr("images", "import", str(archive))
        c._log(f"images imported in {time.monotonic() - t:.1f}s")
        c._spawn("coredns", ["-conf", str(self.dir / "Corefile")], die_with_parent)
        c._spawn("kube-proxy", [f"--config={self.dir / 'kube-proxy.yaml'}"], die_with_parent)
        c._spawn("kubelet", [
            f"--config={self.dir / 'kubelet.yaml'}",
            f"--kubeconfig={self.dir / 'kubelet.kubeconfig'}",
            f"--root-dir={self.dir / 'kubelet'}",
            f"--cert-dir={self.dir / 'kubelet' / 'pki'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}",
            "--v=1",
        ], die_with_parent)
        c._wait("kubelet", self._node_ready, deadline, 120, what=f"node {NODE_NAME} Ready")
        c._wait("coredns", self._dns_ready, deadline, 60, what="CoreDNS ready")

    def image_archives(self) -> list[Path]:
        return [Path(p) for p in json.loads((self.c.state_dir / "cluster.json").read_text())
                .get("images", [])]

    def _node_ready(self) -> bool:
        status, body = self.c._get(f"/api/v1/nodes/{NODE_NAME}")
        if status != 200 or not isinstance(body, dict):
            return False
        return any(cd.get("type") == "Ready" and cd.get("status") == "True"
                   for cd in (body.get("status") or {}).get("conditions") or [])

    def _dns_ready(self) -> bool:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.c.ports['dns-ready']}/ready", timeout=3) as r:
            return r.status == 200

    # -- configuration
    def _containerd_config(self) -> str:
        d = self.dir / "containerd"
        return f"""\
version = 2
root = "{d / 'root'}"
state = "{d / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d / 'opt'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # This VM lacks CAP_SYS_RESOURCE: without this every sandbox fails
  # ("can't get final child's PID from pipe: EOF").
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{self.dir / 'runc'}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin_dir()}"
    conf_dir = "{self.dir / 'cni' / 'net.d'}"
"""

    def _cni_config(self) -> dict:
        return {
            "cniVersion": "0.4.0",
            "name": CNI_NETWORK,
            "plugins": [
                {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": True,
                 "hairpinMode": True,
                 "ipam": {"type": "host-local", "subnet": POD_SUBNET, "gateway": NODE_IP,
                          "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.dir / "cni" / "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    def _kubelet_config(self) -> dict:
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": self.c.ports["kubelet-healthz"],
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": str(self.c.pki / "ca.crt")}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{CGROUP_ROOT}",
            "failCgroupV1": False,
            "failSwapOn": False,
            "clusterDNS": [NODE_IP],
            "clusterDomain": "cluster.local",
            "resolvConf": str(self.dir / "resolv.conf"),
            "containerRuntimeEndpoint": f"unix://{self.sock}",
            "imageServiceEndpoint": f"unix://{self.sock}",
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%",
                             "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
            "podLogsDir": str(self.dir / "pod-logs"),
            "rotateCertificates": False,
            "serializeImagePulls": False,
            "registerNode": True,
            "maxPods": 110,
            "shutdownGracePeriod": "0s",
            "localStorageCapacityIsolation": False,
            "nodeStatusReportFrequency": "10s",
            "syncFrequency": "5s",
        }

    def _proxy_config(self) -> dict:
        return {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.dir / "kube-proxy.kubeconfig")},
            "mode": "iptables",
            "clusterCIDR": CLUSTER_CIDR,
            "hostnameOverride": NODE_NAME,
            "bindAddress": NODE_IP,
            "healthzBindAddress": f"127.0.0.1:{self.c.ports['proxy-healthz']}",
            "metricsBindAddress": f"127.0.0.1:{self.c.ports['proxy-metrics']}",
            "nodePortAddresses": [f"{NODE_IP}/32"],
            # Leave the host's conntrack settings alone.
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                          "tcpCloseWaitTimeout": "0s"},
            "iptables": {"masqueradeAll": True, "syncPeriod": "30s", "minSyncPeriod": "0s"},
        }

    def _corefile(self) -> str:
        return f"""\
.:53 {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:{self.c.ports['dns-health']}
    ready 127.0.0.1:{self.c.ports['dns-ready']}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {self.dir / 'coredns.kubeconfig'}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
}}
"""

    # -- teardown
    def stop_workloads(self) -> None:
        """Stop the kubelet, kill every container, then stop containerd, kube-proxy and CoreDNS."""
        c = self.c
        c._stop_component("kubelet", grace=10)
        self._kill_cgroup_tree()
        for pid in _pids_with(f"-address {self.sock}"):  # containerd-shim-runc-v2
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for comp in ("containerd", "kube-proxy", "coredns"):
            c._stop_component(comp, grace=10)

    def _kill_cgroup_tree(self) -> None:
        for _ in range(20):
            pids = set()
            for h in _cgroup_hierarchies():
                root = h / CGROUP_ROOT
                if root.is_dir():
                    for procs in root.rglob("cgroup.procs"):
                        try:
                            pids.update(int(x) for x in procs.read_text().split())
                        except OSError:
                            pass
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.25)

    def restore_host(self) -> list[str]:
        """Undo every host change recorded in host.json; returns what could not be undone."""
        errors: list[str] = []
        try:
            host = json.loads(self.host_file.read_text())
        except (OSError, ValueError):
            host = {"sysctls": {}, "dirs": {}, "iptables": {}}
        self._kill_cgroup_tree()
        kp = self.c.bin_dir / "kube-proxy" if self.c.bin_dir else None
        if kp and kp.exists() and shutil.which("iptables"):
            _sh(str(kp), "--cleanup", check=False)
        # Mounts: container rootfs (overlay), shm, netns, kubelet volumes; deepest first.
        for mp in sorted(_mounts_under(self.c.state_dir), key=len, reverse=True):
            r = _sh("umount", mp, check=False)
            if r.returncode != 0:
                r = _sh("umount", "-l", mp, check=False)
                if r.returncode != 0:
                    errors.append(f"umount {mp}: {r.stderr.strip()}")
        # Pod veths die with their netns; the bridge is ours.
        if Path(f"/sys/class/net/{BRIDGE}").exists():
            r = _sh("ip", "link", "delete", BRIDGE, check=False)
            if r.returncode != 0:
                errors.append(f"ip link delete {BRIDGE}: {r.stderr.strip()}")
        errors += self._iptables_cleanup(host.get("iptables") or {})
        for name, value in (host.get("sysctls") or {}).items():
            if value is not None and _read_sysctl(name) != value:
                try:
                    _sysctl_path(name).write_text(value + "\n")
                except OSError as e:
                    errors.append(f"sysctl {name}={value}: {e}")
        for h in _cgroup_hierarchies():
            root = h / CGROUP_ROOT
            if root.is_dir():
                for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                                reverse=True) + [root]:
                    try:
                        d.rmdir()
                    except OSError as e:
                        errors.append(f"rmdir {d}: {e}")
        for d, existed in (host.get("dirs") or {}).items():
            if d == "/var/log/containers" and os.path.isdir(d):
                for link in Path(d).iterdir():  # the kubelet's symlinks into our pod logs
                    if link.is_symlink() and str(self.c.state_dir) in os.readlink(link):
                        link.unlink()
            if d == "/var/lib/cni" and os.path.isdir(d):
                for f in Path(d).rglob(f"{CNI_NETWORK}-*"):
                    f.unlink(missing_ok=True)
            if not existed and os.path.isdir(d):
                shutil.rmtree(d, ignore_errors=True)
        self.host_file.unlink(missing_ok=True)
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            os.close(fd)
            self._lock_fd = None
        return errors

    def _iptables_cleanup(self, before: dict[str, list[str]]) -> list[str]:
        errors = []
        for key, chains in _iptables_chains().items():
            tool, table = key.split("/")
            ours = [ch for ch in chains if ch not in set(before.get(key, []))]
            if not ours:
                continue
            r = _sh(f"{tool}-save", "-t", table, check=False)
            for line in r.stdout.splitlines():  # rules in built-in chains that jump to ours
                m = re.match(r"-A (\S+) (.*)", line)
                if m and m.group(1) not in ours and any(f"-j {ch}" in line or f"-g {ch}" in line for ch in ours):
                    _sh(tool, "-t", table, "-D", m.group(1), *_split(m.group(2)), check=False)
            for ch in ours:
                _sh(tool, "-t", table, "-F", ch, check=False)
            for ch in ours:
                r = _sh(tool, "-t", table, "-X", ch, check=False)
                if r.returncode != 0:
                    errors.append(f"{tool} -t {table} -X {ch}: {r.stderr.strip()}")
        return errors

    def leftovers(self) -> list[str]:
        """Everything of this node still on the host (empty after a clean teardown)."""
        out = []
        for needle in (str(self.c.state_dir) + os.sep, f"-address {self.sock}"):
            for pid in _pids_with(needle):
                out.append(f"process {pid}: {Path(f'/proc/{pid}/cmdline').read_bytes()[:120]!r}")
        out += [f"mount {m}" for m in _mounts_under(self.c.state_dir)]
        if Path(f"/sys/class/net/{BRIDGE}").exists():
            out.append(f"link {BRIDGE}")
        for h in _cgroup_hierarchies():
            if (h / CGROUP_ROOT).exists():
                out.append(f"cgroup {h / CGROUP_ROOT}")
        return out


def _split(args: str) -> list[str]:
    import shlex

    return shlex.split(args)


def host_leftovers(snapshot: dict) -> list[str]:
    """Host state that differs from ``snapshot`` (``host_snapshot()`` taken before the node)."""
    now = host_snapshot()
    out = []
    for k, v in snapshot["sysctls"].items():
        if now["sysctls"].get(k) != v:
            out.append(f"sysctl {k} = {now['sysctls'].get(k)} (was {v})")
    for key, chains in now["iptables"].items():
        extra = set(chains) - set(snapshot["iptables"].get(key, []))
        if extra:
            out.append(f"{key} chains {sorted(extra)}")
    if now["bridge"]:
        out.append(f"link {BRIDGE}")
    for d, existed in snapshot["dirs"].items():
        if not existed and os.path.exists(d):
            out.append(f"directory {d}")
    return out


def host_snapshot() -> dict:
    return {"sysctls": {k: _read_sysctl(k) for k in SYSCTLS},
            "iptables": _iptables_chains(),
            "bridge": Path(f"/sys/class/net/{BRIDGE}").exists(),
            "dirs": {d: os.path.exists(d) for d in HOST_DIRS}}
