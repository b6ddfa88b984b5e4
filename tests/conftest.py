"""Shared pytest configuration and the local Kubernetes control-plane fixtures.

Kubernetes fixtures (any test using one is marked ``k8s`` automatically):

``kubeconfig`` (session)
    Path (str) of an admin kubeconfig. Starts etcd, kube-apiserver,
    kube-controller-manager, kube-scheduler and kwok (2 fake nodes) from
    ``tests/support/kube/cluster.py`` on first use and stops them at session end,
    or reuses the cluster named by ``$KUBECONFIG_MPNN`` (a kubeconfig path;
    e.g. ``KUBECONFIG_MPNN=$PWD/.cache/cluster/kubeconfig`` after
    ``make cluster``).
``kubectl`` (session)
    ``tests.support.kube.kubectl.Kubectl`` bound to the pinned kubectl and that
    kubeconfig: ``kubectl("get", "pods", namespace=ns)`` returns a
    CompletedProcess (raises ``KubectlError`` on failure unless
    ``check=False``); ``kubectl.json(...)``; ``kubectl.apply(manifest)``.
``kubectl_bin`` (session)
    Path (str) of the pinned kubectl binary.
``k8s_bin_dir`` (session)
    ``Path`` of the directory holding all pinned binaries.
``namespace`` (function)
    Name of a fresh namespace (its ``default`` ServiceAccount exists),
    deleted after the test.
``wait_for``
    ``wait_for(predicate, timeout=60, interval=0.5, message=None)``: polls
    until the predicate returns something truthy and returns it (also
    importable from ``tests.support.kube.cluster``).

Binaries come from ``$K8S_BIN`` or ``$K8S_CACHE/current`` (default
``.cache/k8s/current``). When ``go`` is available, ``hack/k8s/build.sh``
is run once before the first k8s test (a no-op when they are up to date;
``MPNN_K8S_BUILD=0`` disables this). If the binaries cannot be built or
found, k8s tests are skipped with the reason; with ``CI=true`` they fail.
Nothing is started, built or checked unless a selected test needs it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.kube import cluster as kube_cluster  # noqa: E402  (stdlib only; cheap)
from tests.support.kube.kubectl import Kubectl  # noqa: E402

K8S_FIXTURES = frozenset({"kubeconfig", "kubectl", "kubectl_bin", "k8s_bin_dir", "namespace"})
BUILD_SCRIPT = ROOT / "hack" / "k8s" / "build.sh"

# (bin_dir, reason it is unusable or None); computed once per session.
_binaries: tuple[Path, str | None] | None = None


def pytest_configure(config: pytest.Config) -> None:
    # A shell starts a background command (``bash .ci/run &``) with SIGINT ignored, and the servers
    # and `mpnn run` processes the tests start would inherit that: the Ctrl-C tests would then wait
    # for an exit that never comes. A handler installed here is reset to the default on exec.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line(
        "markers",
        "k8s: needs the local Kubernetes control plane (tests/support/kube); skipped when its "
        "binaries are unavailable (failed instead when CI=true)",
    )
    config.addinivalue_line(
        "markers",
        "e2e: the user story on a real node (tests/e2e; root, cgroups, overlayfs); skipped with the "
        "reason where those are missing (failed instead when CI=true)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Before `-m` deselection runs, so `-m "not k8s"` sees these marks.
    for item in items:
        if K8S_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.k8s)


def pytest_collection_finish(session: pytest.Session) -> None:
    # Build (or verify) the binaries here, outside any per-test timeout, but
    # only when a selected test needs them.
    if any(K8S_FIXTURES & set(getattr(i, "fixturenames", ())) for i in session.items):
        _ensure_binaries(session.config)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"k8s control plane unavailable (CI=true, so this is a failure): {reason}",
                    pytrace=False)
    pytest.skip(f"k8s control plane unavailable: {reason}")


def _ensure_binaries(config: pytest.Config | None) -> tuple[Path, str | None]:
    global _binaries
    if _binaries is not None:
        return _binaries
    bin_dir = kube_cluster.default_bin_dir()
    reporter = config.pluginmanager.get_plugin("terminalreporter") if config else None

    def say(msg: str) -> None:
        if reporter is not None:
            reporter.write_line(f"[k8s] {msg}")

    build_log = None
    may_build = (not os.environ.get("K8S_BIN") and os.environ.get("MPNN_K8S_BUILD", "1") != "0"
                 and shutil.which("go") is not None and BUILD_SCRIPT.exists())
    if may_build:
        cache = bin_dir.parent
        cache.mkdir(parents=True, exist_ok=True)
        build_log = cache / "build.log"
        missing = kube_cluster.missing_binaries(bin_dir)
        if missing:
            say(f"building pinned k8s binaries ({', '.join(missing)} missing) with "
                f"{BUILD_SCRIPT.relative_to(ROOT)}; a cold build takes tens of minutes; log: {build_log}")
        t0 = time.monotonic()
        with open(build_log, "w") as log:
            rc = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, K8S_CACHE=str(cache)), cwd=ROOT).returncode
        if rc != 0:
            reason = (f"{BUILD_SCRIPT.relative_to(ROOT)} failed (exit {rc}); last lines of "
                      f"{build_log}:\n{kube_cluster.log_tail(build_log, 15)}")
            _binaries = (bin_dir, reason)
            return _binaries
        if missing:
            say(f"built in {time.monotonic() - t0:.0f}s")
    missing = kube_cluster.missing_binaries(bin_dir)
    if missing:
        if os.environ.get("K8S_BIN"):
            hint = "K8S_BIN is set, so nothing is built"
        elif may_build:
            hint = f"see {build_log}"
        else:
            hint = "install Go >= 1.24 or run `make k8s-binaries`"
        _binaries = (bin_dir, f"missing {', '.join(missing)} in {bin_dir} ({hint})")
    else:
        _binaries = (bin_dir.resolve(), None)
    return _binaries


@pytest.fixture(scope="session")
def k8s_bin_dir(request: pytest.FixtureRequest) -> Path:
    bin_dir, reason = _ensure_binaries(request.config)
    if reason:
        _unavailable(reason)
    return bin_dir


@pytest.fixture(scope="session")
def kubectl_bin(k8s_bin_dir: Path) -> str:
    return str(k8s_bin_dir / "kubectl")


TMP_PREFIX = "mpnn-k8s-"


def _remove_stale_clusters() -> None:
    """Remove state left by killed test sessions (their components died with
    them; see ``die_with_parent``), i.e. dirs whose owner process is gone."""
    for d in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"):
        try:
            owner = int((d / "owner.pid").read_text())
            os.kill(owner, 0)
            continue  # owner alive
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            continue  # not ours to judge (no/unreadable owner file, other user)
        c = kube_cluster.Cluster(d / "cluster")
        if not any(c.alive().values()):
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def kubeconfig(k8s_bin_dir: Path) -> Iterator[str]:
    external = os.environ.get("KUBECONFIG_MPNN")
    if external:
        path = Path(external).expanduser().resolve()
        if not path.is_file():
            _unavailable(f"KUBECONFIG_MPNN={external} is not a file")
        probe = Kubectl(k8s_bin_dir / "kubectl", path)("get", "--raw=/readyz", check=False, timeout=20)
        if probe.returncode != 0:
            pytest.fail(f"cluster in KUBECONFIG_MPNN={external} is not ready: {probe.stderr.strip()}",
                        pytrace=False)
        yield str(path)
        return

    _remove_stale_clusters()
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    (tmp / "owner.pid").write_text(f"{os.getpid()}\n")
    try:
        cluster = kube_cluster.Cluster.start(tmp / "cluster", k8s_bin_dir, nodes=2,
                                             die_with_parent=True)
    except kube_cluster.ClusterError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.fail(f"local control plane failed to start: {e}", pytrace=False)
    try:
        yield str(cluster.kubeconfig)
    finally:
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def kubectl(kubectl_bin: str, kubeconfig: str) -> Kubectl:
    return Kubectl(kubectl_bin, kubeconfig)


@pytest.fixture(scope="session")
def wait_for():
    return kube_cluster.wait_for


def _namespace_name(test_name: str) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-")[:40].strip("-") or "test"
    return f"t-{base}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def namespace(kubectl: Kubectl, request: pytest.FixtureRequest) -> Iterator[str]:
    name = _namespace_name(request.node.name)
    kubectl.apply({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {"mpnn.test/ephemeral": "true"}},
    })
    # Pods are rejected until the serviceaccount controller made "default".
    kube_cluster.wait_for(
        lambda: kubectl("get", "serviceaccount", "default", namespace=name, check=False).returncode == 0,
        timeout=60, message=f"ServiceAccount default in namespace {name}")
    yield name
    kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)
