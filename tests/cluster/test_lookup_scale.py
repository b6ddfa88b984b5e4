"""The lookup table at scale on the real local control plane (tests/support/kube): a
NeuralNetwork of 1,000 layers x 1,000 units on 256 partitions. Under lookup v1 its table was
24 MB and the operator refused it (LookupTooLarge); v2 is O(spec + partitions).

The reconcile times are printed (run with ``-s``) and recorded as test properties; nothing
here asserts a time."""

from __future__ import annotations

import time

import pytest

from partition_server.api.coverage import check_coverage
from partition_server.api.lookup import CONFIGMAP_LIMIT
from tests.support.kube.operator import (  # noqa: F401 (crds, operator: fixtures)
    assert_partitions_match, condition, crds, digits, lookup, nn, operator, partitions, wait_ready,
)

pytestmark = pytest.mark.k8s

LAYERS, UNITS, PARTITIONS = 1_000, 1_000, 256
# The session's kwok nodes hold 110 pods each; this test adds one for the rest.
EXTRA_NODE = "kwok-node-lookup-scale"


@pytest.fixture
def extra_node(kubectl):
    resources = {"cpu": "64", "memory": "512Gi", "pods": "300", "ephemeral-storage": "1Ti"}
    kubectl.apply({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": EXTRA_NODE,
                     "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                     "labels": {"kubernetes.io/hostname": EXTRA_NODE, "kubernetes.io/os": "linux",
                                "kubernetes.io/arch": "amd64", "type": "kwok"}},
        "status": {"allocatable": resources, "capacity": resources, "phase": "Running",
                   "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux",
                                "kubeletVersion": "fake", "kubeProxyVersion": "fake"}},
    })
    try:
        yield EXTRA_NODE
    finally:
        kubectl("delete", "node", EXTRA_NODE, "--wait=false", "--ignore-not-found", check=False)


def test_a_thousand_layers_on_256_partitions(kubectl, namespace, operator, extra_node, wait_for, record_property):
    ns = namespace
    doc = digits(partitions=PARTITIONS)
    doc["spec"]["model"]["layers"] = [{"units": UNITS, "activation": "relu"}] * (LAYERS - 1) + [
        {"units": UNITS, "activation": "softmax"}]
    t0 = time.monotonic()
    kubectl.apply(doc, namespace=ns)

    def published():
        obj = nn(kubectl, ns)
        return obj if (obj.get("status") or {}).get("lookupVersion") else None

    obj = wait_for(published, timeout=300, message="the lookup table published")
    first_reconcile_s = time.monotonic() - t0
    assert condition(obj, "Degraded").get("reason") != "LookupTooLarge", condition(obj, "Degraded")

    obj = wait_ready(kubectl, ns, PARTITIONS, wait_for, operator, timeout=540)
    ready_s = time.monotonic() - t0
    print(f"\n1,000 x 1,000 on 256 partitions: lookup published {first_reconcile_s:.1f} s after the apply, "
          f"Ready with 256 ready partitions after {ready_s:.1f} s")
    record_property("lookup_published_s", round(first_reconcile_s, 1))
    record_property("ready_s", round(ready_s, 1))

    cm = kubectl.json("get", "configmap", "digits-lookup", namespace=ns)
    stored = sum(len(v) for part in ("data", "binaryData") for v in (cm.get(part) or {}).values())
    assert stored < CONFIGMAP_LIMIT
    table = lookup(kubectl, ns)
    size = len(table.to_json().encode())
    print(f"lookup.json: {size} bytes; ConfigMap keys {sorted(cm.get('data') or {})} "
          f"{sorted(cm.get('binaryData') or {})}")
    record_property("lookup_bytes", size)
    assert size < 128 * 1024
    assert table.num_partitions == PARTITIONS and table.layer_units == (UNITS,) * LAYERS
    assert check_coverage(table.layer_units, table.owners_by_layer) == []
    assert obj["status"]["lookupVersion"] == table.version and obj["status"]["partitions"] == PARTITIONS

    parts = partitions(kubectl, ns)
    assert len(parts) == PARTITIONS
    assert_partitions_match(kubectl, ns, table)
    wait_for(lambda: all((p.get("status") or {}).get("neurons") for p in partitions(kubectl, ns)),
             timeout=120, message="every Partition to report its neuron count")
    assert sum(p["status"]["neurons"] for p in partitions(kubectl, ns)) == LAYERS * UNITS
