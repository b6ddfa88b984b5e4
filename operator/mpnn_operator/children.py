"""Applying a NeuralNetwork's children: the name checks before any write, then the writes.

:class:`ChildrenSync` holds the reconciler's child sync: ``_apply_children`` (Services, peer-key
Secret and NetworkPolicy, lookup ConfigMap, Partitions, PodDisruptionBudget, StatefulSet, in that
order, after ``_check_names`` found every name free or already this network's) and
``_sync_peer_security``; :class:`~mpnn_operator.reconcile.Reconciler` inherits it, and it uses the
reconciler's clients and state.
"""

from __future__ import annotations

import secrets
from typing import Any, Mapping

from partition_server.api.environment import PEER_KEY_BYTES
from partition_server.api.lookup import LookupTable
from partition_server.api.manifest import NeuralNetwork

from . import builders, naming
from .conditions import Finding
from .placement import Placement
from .volumes import PVC_KIND

__all__ = ["PARTITION_KIND", "ChildrenSync", "controlled_by"]

PARTITION_KIND = "Partition"


class _Refused(Exception):
    """Nothing was written: ``finding`` says why."""

    def __init__(self, finding: Finding, retry: bool = False):
        super().__init__(finding.message)
        self.finding, self.retry = finding, retry


def controlled_by(obj: Mapping[str, Any] | None, uid: str) -> bool:
    """Whether ``obj`` has a controlling ownerReference to the object with ``uid``."""
    refs = ((obj or {}).get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("controller") and ref.get("uid") == uid for ref in refs)


def _held_by(obj: Mapping[str, Any]) -> str:
    """Who controls ``obj``, for a NameConflict message."""
    ref = next((r for r in obj["metadata"].get("ownerReferences") or [] if r.get("controller")), None)
    if ref is None:
        return "has no controlling owner"
    return f"is controlled by {ref.get('kind')} {ref.get('name')} (uid {ref.get('uid')})"


class ChildrenSync:
    """Applying a NeuralNetwork's children, mixed into :class:`~mpnn_operator.reconcile.Reconciler`."""

    def _apply_children(self, owner: Mapping[str, Any], net: NeuralNetwork, placement: Placement,
                        partitions: list[dict[str, Any]], table: LookupTable | None = None
                        ) -> tuple[LookupTable | None, str | None]:
        """Apply what the placement allows; returns the lookup table in force afterwards, and
        what is wrong with the NFS claim (None if it is bound, or still new). ``table``: the
        placement's lookup table when the caller built it already.

        Everything is built and checked before the first write. The lookup ConfigMap is
        written before the Partitions: if it is refused no Partition has changed, and the
        events of the Partitions written next find them agreeing with the table in force.

        Raises:
            _Refused: before any write: the lookup ConfigMap would exceed the API server's
                limit, or a child's name is held by an object this NeuralNetwork does not control.
            RetryLater: the model volume, released by a deleted claim, is still being deleted
                (before any write but its deletion).
        """
        wanted = builders.partitions(net, placement.assignment) if placement.redistribute else []
        configmap = None
        if placement.assignment is not None:
            if table is None:
                table = builders.lookup_table(net, placement.assignment, self.cluster_domain)
            configmap = builders.lookup_configmap(net, table)
            self._check_size(net, configmap)
        claim = self._check_names(owner, net, self.volumes.claims(net), wanted)
        claim_problem = self.volumes.sync(owner, net, claim)
        self.kube.apply(self._owned(builders.headless_service(net), owner))
        self.kube.apply(self._owned(builders.inference_service(net), owner))
        self._sync_peer_security(owner, net)
        if configmap is not None:
            self.kube.apply(self._owned(configmap, owner))
        else:
            table = self._lookup_in_force(net.namespace, net.name)
        if placement.redistribute:
            for obj in wanted:
                self.kube.apply(self._owned(obj, owner))
            keep = {o["metadata"]["name"] for o in wanted}
            for stale in partitions:
                if stale["metadata"]["name"] not in keep:
                    self.kube.delete(naming.API_VERSION, PARTITION_KIND, name=stale["metadata"]["name"],
                                     namespace=net.namespace)
            partitions = self._partitions(net.namespace, net.name)
        self._apply_budget(owner, net)
        self.kube.apply(self._owned(builders.statefulset(net, self.server_image, self.server_resources), owner))
        self._partition_statuses(net.namespace, net.name, net, partitions)
        return table, claim_problem

    def _sync_peer_security(self, owner: Mapping[str, Any], net: NeuralNetwork) -> None:
        """Create the peer-key Secret once (256 random bits; an existing one, checked by
        :meth:`_check_names` to be this network's, is kept: rotating it would cut running pods
        off each other), and apply or delete the NetworkPolicy."""
        key = secrets.token_bytes(PEER_KEY_BYTES)
        self.kube.create(self._owned(builders.peer_key_secret(net, key), owner))
        policy = builders.network_policy(net)
        if policy is not None:
            self.kube.apply(self._owned(policy, owner))
        else:
            name = naming.network_policy_name(net.name)
            existing = self.kube.get("networking.k8s.io/v1", "NetworkPolicy", name=name, namespace=net.namespace)
            if existing is not None and controlled_by(existing, owner["metadata"]["uid"]):
                self.kube.delete("networking.k8s.io/v1", "NetworkPolicy", name=name, namespace=net.namespace)

    def _check_names(self, owner: Mapping[str, Any], net: NeuralNetwork, claims: list[dict[str, Any]],
                     partitions: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Refuse to apply anything while a namespaced child's name is taken by an object this
        NeuralNetwork does not control (someone's own ConfigMap ``<name>-lookup``, another
        network's Service, ...): server-side apply with force would take it over. Returns the
        claim of ``claims`` as it exists now (None if it does not).

        Raises:
            _Refused: ``NameConflict``, naming each object and who controls it; retried, since
                an object of a deleted NeuralNetwork of the same name goes with the garbage collector.
        """
        ns, uid = net.namespace, owner["metadata"]["uid"]
        singles = [("v1", "Service", net.name), ("v1", "Service", naming.inference_service_name(net.name)),
                   ("v1", "ConfigMap", naming.lookup_name(net.name)), ("apps/v1", "StatefulSet", net.name),
                   ("v1", "Secret", naming.peer_key_name(net.name)),
                   ("networking.k8s.io/v1", "NetworkPolicy", naming.network_policy_name(net.name)),
                   *(("v1", PVC_KIND, c["metadata"]["name"]) for c in claims)]
        existing = [(kind, self.kube.get(api, kind, name=name, namespace=ns)) for api, kind, name in singles]
        if partitions:  # one list rather than a get per Partition
            names = {p["metadata"]["name"] for p in partitions}
            existing += [(PARTITION_KIND, p)
                         for p in self.kube.list(naming.API_VERSION, PARTITION_KIND, namespace=ns, label_selector="")
                         if p["metadata"]["name"] in names]
        taken = [f"{kind} {obj['metadata']['name']} {_held_by(obj)}" for kind, obj in existing
                 if obj is not None and not controlled_by(obj, uid)]
        if taken:
            raise _Refused(Finding(True, "NameConflict", (
                f"objects with the names of this network's children exist and are not controlled by it: "
                f"{'; '.join(taken)}. Nothing was applied (the running deployment is left unchanged); delete "
                "or rename them, and the operator retries")), retry=True)
        return next((obj for kind, obj in existing if kind == PVC_KIND), None)

    def _owned(self, obj: dict[str, Any], owner: Mapping[str, Any]) -> dict[str, Any]:
        self.adopt(obj, owner)
        return obj
