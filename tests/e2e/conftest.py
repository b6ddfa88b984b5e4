"""The local control plane with a real node (tests/support/kube/node.py), for the e2e tests.

``real_cluster`` (session): builds or verifies the node binaries and both image archives, starts
the cluster in a temporary state directory, and at the end stops it and checks that nothing is
left on the host (processes, mounts, cni0, iptables chains, sysctls, cgroups); a leftover fails
the session's teardown. Without root, writable cgroups or overlayfs the e2e tests skip with the
reason, except with CI=true, where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.support.kube import cluster as kube_cluster
from tests.support.kube import node as kube_node

ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.k8s)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"real node unavailable (CI=true, so this is a failure): {reason}", pytrace=False)
    pytest.skip(f"real node unavailable: {reason}")


def _run(cmd: list[str], what: str, env: dict | None = None) -> str:
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        _unavailable(f"{what} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def real_cluster(k8s_bin_dir: Path) -> Iterator[kube_cluster.Cluster]:
    external = os.environ.get("MPNN_E2E_CLUSTER")  # the state dir of `make cluster NODE=real`
    if external:
        yield kube_cluster.Cluster.load(external)
        return
    reason = kube_node.unavailable()
    if reason:
        _unavailable(reason)
    cache = k8s_bin_dir.parent
    if shutil.which("go"):
        _run(["nice", "-n", "19", "bash", "hack/k8s/build.sh", "--node"], "hack/k8s/build.sh --node",
             {"K8S_CACHE": str(cache)})
    missing = [b for b in kube_node.NODE_BINARIES if not os.access(k8s_bin_dir / b, os.X_OK)]
    if missing:
        _unavailable(f"missing {', '.join(missing)} in {k8s_bin_dir} (`make node-binaries`)")
    image = _run(["bash", "hack/image/build.sh"], "hack/image/build.sh (make image)")
    pause = _run(["bash", "hack/image/pause.sh", str(k8s_bin_dir / "pause")], "hack/image/pause.sh")
    before = kube_node.host_snapshot()
    tmp = Path(tempfile.mkdtemp(prefix="mpnn-e2e-"))
    t0 = time.monotonic()
    try:
        cluster = kube_cluster.Cluster.start(tmp / "cluster", k8s_bin_dir, nodes=0, die_with_parent=True,
                                             real_node=True, images=[image, pause], timeout=300)
    except (kube_cluster.ClusterError, RuntimeError) as e:
        left = kube_cluster.Cluster(tmp / "cluster", k8s_bin_dir, nodes=0, real_node=True).stop()
        pytest.fail(f"cluster with a real node failed to start: {e}\nleft behind: {left}", pytrace=False)
    print(f"\n[e2e] cluster with a real node up in {time.monotonic() - t0:.1f}s")
    try:
        yield cluster
    finally:
        t0 = time.monotonic()
        left = cluster.stop()
        left += kube_node.host_leftovers(before)
        print(f"\n[e2e] cluster stopped in {time.monotonic() - t0:.1f}s")
        if not left:
            shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"left behind on the host after teardown: {left}"
