"""kopf handlers: thin adapters from watch events to :class:`~mpnn_operator.reconcile.Reconciler`.

Registered on :data:`registry` (not kopf's global one), so importing this
module has no effect until :func:`mpnn_operator.main.main` runs it. The
reconciler travels in kopf's ``memo`` as ``memo.reconciler``.
"""

from __future__ import annotations

from typing import Any

import kopf

from . import naming

registry = kopf.OperatorRegistry()

NETWORKS = dict(group=naming.GROUP, version=naming.VERSION, plural=naming.NETWORKS)
OURS = {naming.MANAGED_BY: naming.FIELD_MANAGER}
# Catches children changed or deleted behind the operator's back (it watches
# only NeuralNetworks, Partitions, StatefulSets and Jobs).
RESYNC_SECONDS = 300
# Retry delay after a failed reconcile (an API error; the Degraded condition says which).
RETRY_SECONDS = 10


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Credentials as the kubernetes client finds them (in-cluster, else KUBECONFIG);
    kopf's built-in login applies to its global registry only."""
    return kopf.login_via_client(**kwargs)


@kopf.on.resume(**NETWORKS, backoff=RETRY_SECONDS, registry=registry)
@kopf.on.create(**NETWORKS, backoff=RETRY_SECONDS, registry=registry)
@kopf.on.update(**NETWORKS, backoff=RETRY_SECONDS, registry=registry)
def reconcile_network(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.reconcile(namespace, name)


@kopf.timer(**NETWORKS, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS, registry=registry)
def resync_network(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.reconcile(namespace, name)


@kopf.on.delete(**NETWORKS, registry=registry)
def delete_network(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.cleanup(dict(body))


@kopf.on.event(naming.GROUP, naming.VERSION, naming.PARTITIONS, labels=OURS, registry=registry)
def partition_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.partition_changed(dict(body), deleted=event.get("type") == "DELETED")


@kopf.on.event("apps", "v1", "statefulsets", labels=OURS, registry=registry)
def statefulset_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    network = body.metadata.labels.get(naming.NETWORK)
    if not network:
        return
    if event.get("type") == "DELETED":  # recreate it, unless its network is going away too
        memo.reconciler.reconcile(body.metadata.namespace, network)
    else:
        memo.reconciler.refresh_status(body.metadata.namespace, network)


@kopf.on.event("batch", "v1", "jobs", labels=OURS, registry=registry)
def job_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    network = body.metadata.labels.get(naming.NETWORK)
    if network:
        memo.reconciler.refresh_training(body.metadata.namespace, network)
