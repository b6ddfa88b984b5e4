"""kopf handlers: thin adapters from watch events to :class:`~mpnn_operator.reconcile.Reconciler`.

Registered on :data:`registry` (not kopf's global one), so importing this
module has no effect until :func:`mpnn_operator.main.main` runs it. The
reconciler travels in kopf's ``memo`` as ``memo.reconciler``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import kopf
from kubernetes.dynamic.exceptions import DynamicApiError

from . import naming, rescale
from .retry import RESYNC_SECONDS, RETRY_SECONDS, Later, RetryLater, backoff

__all__ = ["RESYNC_SECONDS", "RETRY_SECONDS", "registry", "retry_delay", "run", "run_for_event", "transient"]

log = logging.getLogger(__name__)

registry = kopf.OperatorRegistry()

NETWORKS = dict(group=naming.GROUP, version=naming.VERSION, plural=naming.NETWORKS)
OURS = {naming.MANAGED_BY: naming.FIELD_MANAGER}


def retry_delay(retry: int) -> float:
    """Seconds before retry number ``retry`` (0-based) of a failed reconcile: 10, 20, 40, ... 300."""
    return backoff(retry)


def transient(exc: DynamicApiError) -> bool:
    """Whether a refused API call may succeed when repeated unchanged: a server error, a timeout,
    throttling, or a write that lost a race (409 Conflict). Other 4xx (422 Invalid, 403
    Forbidden, 409 AlreadyExists, 400, 404) repeat until something else changes."""
    status = exc.status or 0
    if status >= 500 or status in (0, 408, 429):
        return True
    if status == 409:
        try:
            return json.loads(exc.body or "{}").get("reason") != "AlreadyExists"
        except (TypeError, ValueError, AttributeError):
            return True
    return False


def run(call: Callable[[], None], retry: int) -> None:
    """Run a reconcile for a kopf handler, turning its failures into kopf's retry decisions.

    The reconciler has recorded what failed in the NeuralNetwork's status. What may clear by
    itself is retried after :func:`retry_delay` (10 s, doubling up to 5 minutes). An API error
    that would repeat as it is (see :func:`transient`) is not retried: a change of the
    NeuralNetwork runs the handler again, and the 5-minute resync timer retries anyway, so a
    fix elsewhere (RBAC, an admission policy, a quota) is picked up.
    """
    try:
        call()
    except RetryLater as exc:  # after exc.delay when it asks for one, else retry_delay; doubling
        raise kopf.TemporaryError(str(exc), delay=backoff(retry, exc.delay)) from exc
    except DynamicApiError as exc:
        message = f"HTTP {exc.status}: {exc.summary()}"
        if transient(exc):
            raise kopf.TemporaryError(message, delay=retry_delay(retry)) from exc
        raise kopf.PermanentError(f"{message} (not retried until the NeuralNetwork changes or the resync in "
                                  f"{RESYNC_SECONDS} s)") from exc


def run_for_event(call: Callable[[], None], *, memo: Any, namespace: str | None, network: str | None) -> None:
    """Run a reconcile for a watch event, which kopf never retries.

    A deferred one (:class:`RetryLater`: a volume still being deleted, ...) runs again on
    ``memo.later`` (a :class:`~mpnn_operator.retry.Later`), as a full reconcile of
    ``namespace/network``: nothing but the event would bring it back soon. A failed API call
    is logged: what failed is in the NeuralNetwork's status, and the create/update/timer
    handlers retry it.
    """
    try:
        call()
    except RetryLater as exc:
        later: Later | None = getattr(memo, "later", None)
        if later is None or not namespace or not network:
            log.info("reconcile deferred: %s", exc)
            return
        delay = later.defer((namespace, network), lambda: memo.reconciler.reconcile(namespace, network), exc)
        log.info("reconcile of %s/%s deferred%s: %s", namespace, network,
                 f" by {delay:g} s" if delay is not None else " (a retry is pending)", exc)
    except DynamicApiError as exc:
        log.warning("reconcile failed (HTTP %s): %s", exc.status, exc.summary())


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Credentials as the kubernetes client finds them (in-cluster, else KUBECONFIG);
    kopf's built-in login applies to its global registry only."""
    return kopf.login_via_client(**kwargs)


@kopf.on.resume(**NETWORKS, backoff=RETRY_SECONDS, registry=registry)
@kopf.on.create(**NETWORKS, backoff=RETRY_SECONDS, registry=registry)
@kopf.on.update(**NETWORKS, backoff=RETRY_SECONDS, registry=registry)
def reconcile_network(name: str, namespace: str, memo: kopf.Memo, retry: int = 0, **_: Any) -> None:
    run(lambda: memo.reconciler.reconcile(namespace, name), retry)


@kopf.timer(**NETWORKS, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS, registry=registry)
def resync_network(name: str, namespace: str, memo: kopf.Memo, retry: int = 0, **_: Any) -> None:
    run(lambda: memo.reconciler.reconcile(namespace, name), retry)


@kopf.on.delete(**NETWORKS, registry=registry)
def delete_network(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.reconciler.cleanup(dict(body))


@kopf.on.event(**NETWORKS, registry=registry)
def network_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A status write of the trainer that answers a rescale request (its checkpoint, or its run's
    end): reconcile now, to publish the lookup table that waited for it (:mod:`mpnn_operator.rescale`).
    Spec changes reach :func:`reconcile_network`; every other event is ignored here."""
    if event.get("type") == "DELETED":
        return
    if rescale.answered((body.get("status") or {}).get("training")):
        meta = body.get("metadata") or {}
        namespace, name = meta.get("namespace"), meta.get("name")
        run_for_event(lambda: memo.reconciler.reconcile(namespace, name), memo=memo, namespace=namespace,
                      network=name)


@kopf.on.event(naming.GROUP, naming.VERSION, naming.PARTITIONS, labels=OURS, registry=registry)
def partition_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    meta = body.get("metadata") or {}
    network = (body.get("spec") or {}).get("network") or (meta.get("labels") or {}).get(naming.NETWORK)
    run_for_event(lambda: memo.reconciler.partition_changed(dict(body), deleted=event.get("type") == "DELETED"),
                  memo=memo, namespace=meta.get("namespace"), network=network)


@kopf.on.event("apps", "v1", "statefulsets", labels=OURS, registry=registry)
def statefulset_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    network = body.metadata.labels.get(naming.NETWORK)
    if not network:
        return
    if event.get("type") == "DELETED":  # recreate it, unless its network is going away too
        namespace = body.metadata.namespace
        run_for_event(lambda: memo.reconciler.reconcile(namespace, network), memo=memo, namespace=namespace,
                      network=network)
    else:
        memo.reconciler.refresh_status(body.metadata.namespace, network)


@kopf.on.event("", "v1", "persistentvolumeclaims", labels=OURS, registry=registry)
def claim_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """The NFS claim deleted (made again, with its volume), bound, or lost: reconcile, which
    reports a claim that does not bind."""
    network, namespace = body.metadata.labels.get(naming.NETWORK), body.metadata.namespace
    if network:
        run_for_event(lambda: memo.reconciler.reconcile(namespace, network), memo=memo, namespace=namespace,
                      network=network)


@kopf.on.event("batch", "v1", "jobs", labels=OURS, registry=registry)
def job_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    network = body.metadata.labels.get(naming.NETWORK)
    if network:
        memo.reconciler.refresh_training(body.metadata.namespace, network)
