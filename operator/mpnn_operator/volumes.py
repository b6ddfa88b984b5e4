"""The model volume of ``spec.storage.nfs``: the NFS PersistentVolume and its claim.

Applied, recovered after a claim deleted by hand, reported when the claim does
not bind, pruned when storage is removed, and deleted with the network (a
PersistentVolume is cluster-scoped: no ownerReference reaches it). An
``existingClaim`` is never touched.

Nothing here waits for the cluster. A volume that must be made again but is
still being deleted stops the reconcile with :class:`~mpnn_operator.retry.RetryLater`
(after :data:`VOLUME_DELETE_RETRY_SECONDS`, doubling), so the network's lock is
never held while the PersistentVolume controller catches up.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any, Callable, Mapping

from partition_server.api.manifest import NeuralNetwork

from . import builders, naming
from .kube import Kube
from .retry import RetryLater

__all__ = ["CLAIM_BIND_GRACE_SECONDS", "PVC_KIND", "PV_KIND", "VOLUME_DELETE_RETRY_SECONDS", "Volumes",
           "age_seconds"]

log = logging.getLogger(__name__)

PV_KIND, PVC_KIND = "PersistentVolume", "PersistentVolumeClaim"
# A new claim gets this long to bind before the NeuralNetwork reports it as Degraded.
CLAIM_BIND_GRACE_SECONDS = 30
# First delay before a reconcile looks again at a released PersistentVolume it deleted to make it
# again (the deletion completes once the PersistentVolume controller no longer sees it Bound).
VOLUME_DELETE_RETRY_SECONDS = 2.0


def age_seconds(obj: Mapping[str, Any]) -> float:
    """Seconds since ``metadata.creationTimestamp`` (0 if unknown)."""
    stamp = (obj.get("metadata") or {}).get("creationTimestamp")
    if not stamp:
        return 0.0
    created = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    return (dt.datetime.now(dt.timezone.utc) - created).total_seconds()


def _terminating(obj: Mapping[str, Any] | None) -> bool:
    return bool(((obj or {}).get("metadata") or {}).get("deletionTimestamp"))


class Volumes:
    """Keeps the NFS volume and claim of each NeuralNetwork in line with ``spec.storage``.

    Args:
        kube: API access.
        emit: posts an Event, ``(object, type, reason, message)``.
        adopt: makes the NeuralNetwork the controlling owner of a namespaced child, in place.
    """

    def __init__(self, kube: Kube, *, emit: Callable[[Mapping[str, Any], str, str, str], None],
                 adopt: Callable[[dict[str, Any], Mapping[str, Any]], None]):
        self.kube, self.emit, self.adopt = kube, emit, adopt

    def claims(self, net: NeuralNetwork) -> list[dict[str, Any]]:
        """The claims the network's storage needs (to check their names before any write)."""
        pvc = builders.volume_claim(net)
        return [pvc] if pvc is not None else []

    def sync(self, owner: Mapping[str, Any], net: NeuralNetwork, claim: Mapping[str, Any] | None) -> str | None:
        """Apply the volume and claim of ``spec.storage.nfs``, or prune ours if it has none.

        Args:
            owner: the NeuralNetwork.
            net: its validated spec.
            claim: the claim ``<name>-model`` as it exists now (None if it does not).

        Returns:
            What keeps the claim from being bound, 30 s after its creation; None while it is
            bound, still new, or there is no NFS storage.

        Raises:
            RetryLater: the volume released by a deleted claim is still being deleted.
        """
        pv, pvc = builders.persistent_volume(net), builders.volume_claim(net)
        if pv is None or pvc is None:
            self.prune(net)
            return None
        return self._apply(owner, pv, pvc, claim)

    def _apply(self, owner: Mapping[str, Any], pv: dict[str, Any], pvc: dict[str, Any],
               claim: Mapping[str, Any] | None) -> str | None:
        """A claim deleted by hand leaves the volume ``Released`` (reclaim policy Retain), its
        ``claimRef`` naming the old claim's uid, where no new claim can bind it: such a volume
        is deleted and made again (the data on the export stays; the deletion completes once
        the volume is no longer Bound). A new volume is created bound in advance to
        ``<name>-model`` (``claimRef`` without uid), so no other claim can take it; created
        rather than applied, so that later applies (which leave the ``claimRef`` out) never
        own, and so never change, the binding.
        """
        name, claim_name, namespace = pv["metadata"]["name"], pvc["metadata"]["name"], pvc["metadata"]["namespace"]
        current = self._volume(owner, namespace, name)
        if _terminating(current):
            raise RetryLater(f"PersistentVolume {name} is still being deleted; it is made again once it is gone",
                             delay=VOLUME_DELETE_RETRY_SECONDS)
        bound_to = ((current or {}).get("spec") or {}).get("claimRef") or {}
        # Bound (or released) to a claim of our claim's name that no longer exists: the
        # volume shows Released once the PersistentVolume controller has noticed.
        if ((bound_to.get("namespace"), bound_to.get("name")) == (namespace, claim_name)
                and bound_to.get("uid") not in (None, ((claim or {}).get("metadata") or {}).get("uid"))):
            self.kube.delete("v1", PV_KIND, name=name)
            self.emit(owner, "Normal", "VolumeRecreated", (
                f"PersistentVolume {name} was released by the deleted claim {claim_name} (uid {bound_to.get('uid')}), "
                "so no new claim could bind it: it is made again, bound in advance to the new claim (the data on "
                "the NFS export is kept)"))
            if self._volume(owner, namespace, name) is not None:  # its deletion completes later: look again then
                raise RetryLater(f"PersistentVolume {name} (released by a deleted claim) is still being deleted",
                                 delay=VOLUME_DELETE_RETRY_SECONDS)
            current = None
        if current is None:
            self.kube.create(pv)  # None if made meanwhile: applied like any existing volume
        # Also right after creating it, so that the next apply is a no-op, like every later one.
        current = self.kube.apply(builders.without_claim_ref(pv))
        self.adopt(pvc, owner)
        claim = self.kube.apply(pvc)
        phase = (claim.get("status") or {}).get("phase") or "Pending"
        if phase == "Bound" or age_seconds(claim) < CLAIM_BIND_GRACE_SECONDS:
            return None
        volume = (current.get("status") or {}).get("phase") or "not yet available"
        return (f"PersistentVolumeClaim {claim_name} is {phase}, not Bound, {CLAIM_BIND_GRACE_SECONDS} s or more "
                f"after its creation ({claim['metadata'].get('creationTimestamp')}); its PersistentVolume {name} is "
                f"{volume}")

    def _volume(self, owner: Mapping[str, Any], namespace: str, name: str) -> dict[str, Any] | None:
        """The volume ``name`` of this network, found by label (the operator may list volumes, not get them)."""
        selector = f"{naming.children_selector(owner['metadata']['name'])},{naming.NAMESPACE}={namespace}"
        volumes = self.kube.list("v1", PV_KIND, namespace=None, label_selector=selector)
        return next((v for v in volumes if v["metadata"]["name"] == name), None)

    def prune(self, net: NeuralNetwork) -> None:
        """Without ``spec.storage.nfs`` no claim or volume of ours may remain (storage removed)."""
        selector = f"{naming.children_selector(net.name)},{naming.COMPONENT}={naming.STORAGE}"
        for pvc in self.kube.list("v1", PVC_KIND, namespace=net.namespace, label_selector=selector):
            self.kube.delete("v1", PVC_KIND, name=pvc["metadata"]["name"], namespace=net.namespace)
        volume_selector = f"{selector},{naming.NAMESPACE}={net.namespace}"
        for pv in self.kube.list("v1", PV_KIND, namespace=None, label_selector=volume_selector):
            self.kube.delete("v1", PV_KIND, name=pv["metadata"]["name"])

    def cleanup(self, body: Mapping[str, Any]) -> None:
        """On NeuralNetwork deletion: delete its PersistentVolume, which no ownerReference can
        reach (cluster-scoped). Reclaim policy Retain keeps the data on the NFS export."""
        meta = body["metadata"]
        selector = f"{naming.children_selector(meta['name'])},{naming.NAMESPACE}={meta['namespace']}"
        for pv in self.kube.list("v1", PV_KIND, namespace=None, label_selector=selector):
            if self.kube.delete("v1", PV_KIND, name=pv["metadata"]["name"]):
                log.info("deleted PersistentVolume %s (the NFS data is kept)", pv["metadata"]["name"])
