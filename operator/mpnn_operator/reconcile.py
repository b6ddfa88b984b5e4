"""Reconciling a NeuralNetwork: desired children from the builders, applied, pruned, reported.

Every entry point takes a per-network lock and reads the NeuralNetwork afresh, so
the kopf handlers (create/update/resume/timer, Partition and StatefulSet events)
may all call in at any time and in any order: the last call wins with the latest
state, and a call with nothing to change writes nothing. No call waits under the lock
for the cluster to catch up: it raises :class:`~mpnn_operator.retry.RetryLater` and is
run again (the model volume's part is :mod:`mpnn_operator.volumes`).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import defaultdict
from typing import Any, Callable, Mapping

from kubernetes.dynamic.exceptions import DynamicApiError

from partition_server.api.lookup import CONFIGMAP_LIMIT, LookupTable, LookupTableError
from partition_server.api.manifest import DEFAULT_IMAGE, KIND, ManifestError, NeuralNetwork, parse_neural_network

from . import builders, naming, rescale
from .children import PARTITION_KIND, ChildrenSync, _Refused, controlled_by
from .conditions import HEALTHY, Finding, network_status
from .kube import Kube
from .metrics import OperatorMetrics
from .placement import Placement, STRATEGY, parse_ranges, partition_index, plan
from .retry import RetryLater
from .training import Training
from .volumes import Volumes

__all__ = ["Adopt", "Emit", "Reconciler", "RetryLater", "controlled_by", "manifest_view"]

log = logging.getLogger(__name__)

NN_KIND = KIND

# (object, type "Normal"/"Warning", reason, message)
Emit = Callable[[Mapping[str, Any], str, str, str], None]
# Adds the NeuralNetwork as controlling owner of a namespaced child, in place.
Adopt = Callable[[dict[str, Any], Mapping[str, Any]], None]


UNAVAILABLE = "PartitionUnavailable"


def _degraded_by(status: Mapping[str, Any], reason: str) -> bool:
    """Whether ``status`` holds a true Degraded condition with ``reason``."""
    return any(c.get("type") == "Degraded" and c.get("status") == "True" and c.get("reason") == reason
               for c in status.get("conditions") or [])


def _waiting(status: Mapping[str, Any]) -> tuple[str, str] | None:
    """Progressing's ``(reason, message)`` while a new lookup table waits for the trainer."""
    message = rescale.waiting_message(status.get("training"))
    return (rescale.WAITING, message) if message is not None else None


def manifest_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a NeuralNetwork object that :func:`parse_neural_network` reads."""
    meta = body.get("metadata") or {}
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
            "spec": body.get("spec")}


class Reconciler(ChildrenSync):
    """Drives one cluster's NeuralNetworks towards their specs.

    Args:
        kube: API access.
        cluster_domain: DNS suffix of the partition addresses in lookup.json.
        emit: posts a Kubernetes Event on an object.
        adopt: makes a NeuralNetwork the owner of a child (``kopf.append_owner_reference``).
        server_image: the image of partition servers and training Jobs whose NeuralNetwork
            sets no ``spec.server.image`` (``mpnn operator --server-image``).
        server_resources: container resources of partition servers whose NeuralNetwork sets no
            ``spec.server.resources`` (``mpnn operator --server-resources``).
        rescale_timeout: seconds a new lookup table waits for the trainer's checkpoint during a run
            before it is published anyway (``mpnn operator --rescale-timeout``; :mod:`mpnn_operator.rescale`).
    """

    def __init__(self, kube: Kube, cluster_domain: str, *, emit: Emit, adopt: Adopt,
                 server_image: str = DEFAULT_IMAGE, server_resources: Mapping[str, Any] | None = None,
                 rescale_timeout: float = rescale.DEFAULT_TIMEOUT):
        self.kube = kube
        self.cluster_domain = cluster_domain
        self.emit = emit
        self.adopt = adopt
        self.server_image = server_image
        self.server_resources = dict(server_resources or {})
        self.rescale_timeout = rescale_timeout
        self.training = Training(kube, emit=emit, adopt=adopt, server_image=server_image)
        self.volumes = Volumes(kube, emit=emit, adopt=adopt)
        self._locks: dict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        self.metrics = OperatorMetrics()

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[(namespace, name)]

    # -- entry points ------------------------------------------------------

    def reconcile(self, namespace: str, name: str) -> None:
        """Bring the children of NeuralNetwork ``namespace/name`` in line with its spec.

        Raises:
            kubernetes.dynamic.exceptions.DynamicApiError: an API call failed (after
                recording a Degraded condition for a rejected write); callers retry.
            RetryLater: something that clears by itself is in the way (a name held by another
                owner, recorded as Degraded; the model volume still being deleted); callers
                reconcile again after ``delay``.
        """
        with self.metrics.reconcile(RetryLater), self._lock(namespace, name):
            body = self._network(namespace, name)
            if body is not None:
                self._reconcile(body)
            else:
                self.metrics.network_deleted(namespace, name)

    def refresh_status(self, namespace: str, name: str) -> None:
        """Recompute readiness (NeuralNetwork conditions, Partition ``status.ready``) after a
        StatefulSet change, without touching any spec."""
        with self._lock(namespace, name):
            body = self._network(namespace, name)
            if body is None:
                return
            status = body.get("status") or {}
            sts = self._statefulset(body)
            finding = self._availability(body, status.get("partitions"))
            if finding is not None and finding.degraded and not _degraded_by(status, UNAVAILABLE):
                self.emit(body, "Warning", finding.reason, finding.message)
            new = network_status(status, statefulset=sts, desired=status.get("partitions"), finding=finding,
                                 generation=status.get("observedGeneration"), waiting=_waiting(status))
            self._write_status(body, new)
            try:
                net = parse_neural_network(manifest_view(body))
            except ManifestError:
                net = None
            self._partition_statuses(namespace, name, net, self._partitions(namespace, name))

    def refresh_training(self, namespace: str, name: str) -> None:
        """After a training Job changed: start the next run once the old Jobs are gone, and
        mirror the Job's state into ``status.training``."""
        with self._lock(namespace, name):
            body = self._network(namespace, name)
            if body is None:
                return
            try:
                net = parse_neural_network(manifest_view(body))
            except ManifestError:
                return  # the reconcile reports it; an invalid spec starts nothing
            self.training.sync(body, net)
            self._apply_budget(self._network(namespace, name) or body, net)

    def _apply_budget(self, owner: Mapping[str, Any], net: NeuralNetwork,
                      unless: Mapping[str, Any] | None = None) -> None:
        """Apply the servers' PodDisruptionBudget: none may be evicted while a run trains
        (:func:`builders.disruption_budget`); skipped when the NeuralNetwork ``unless`` (the budget
        was applied for it) implies the same budget."""
        active = builders.training_active(net, owner.get("status"))
        if unless is not None and builders.training_active(net, unless.get("status")) == active:
            return
        self.kube.apply(self._owned(builders.disruption_budget(net, training=active), owner))

    def partition_changed(self, partition: Mapping[str, Any], deleted: bool = False) -> None:
        """React to a Partition event: reconcile its network unless the Partition already
        says what the lookup table in force says (e.g. the operator's own write)."""
        meta = partition.get("metadata") or {}
        namespace = meta.get("namespace")
        network = (partition.get("spec") or {}).get("network") or (meta.get("labels") or {}).get(naming.NETWORK)
        if not namespace or not network:
            return
        if not deleted:
            table = self._lookup_in_force(namespace, network)
            index = partition_index(partition)
            if (table is not None and index is not None and index < table.num_partitions
                    and table.range_texts(index) == list((partition.get("spec") or {}).get("ranges") or [])):
                return
        self.reconcile(namespace, network)

    def cleanup(self, body: Mapping[str, Any]) -> None:
        """On NeuralNetwork deletion: delete its PersistentVolume, which no ownerReference can
        reach (cluster-scoped). Reclaim policy Retain keeps the data on the NFS export."""
        meta = body.get("metadata") or {}
        self.metrics.network_deleted(meta.get("namespace", ""), meta.get("name", ""))
        self.volumes.cleanup(body)

    # -- the reconcile -------------------------------------------------------

    def _network(self, namespace: str, name: str) -> dict[str, Any] | None:
        body = self.kube.get(naming.API_VERSION, NN_KIND, name=name, namespace=namespace)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        return body

    def _partitions(self, namespace: str, name: str) -> list[dict[str, Any]]:
        items = self.kube.list(naming.API_VERSION, PARTITION_KIND, namespace=namespace,
                               label_selector=naming.children_selector(name))
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    def _reconcile(self, body: dict[str, Any]) -> None:
        meta, status = body["metadata"], body.get("status") or {}
        namespace, name = meta["namespace"], meta["name"]
        try:
            net = parse_neural_network(manifest_view(body))
        except ManifestError as exc:
            self._finish(body, Finding(True, "InvalidSpec",
                                       f"{exc}; the running deployment is left unchanged"), {})
            return
        partitions = self._partitions(namespace, name)
        placement = plan(net, partitions, status.get("distributionHash"))
        desired = (builders.lookup_table(net, placement.assignment, self.cluster_domain)
                   if placement.assignment is not None else None)
        decision = self._rescale_decision(body, net, desired)
        if decision.hold:
            self._hold(body, net, decision)
        try:
            table, claim_problem = self._apply_children(body, net, placement, partitions, desired)
        except _Refused as refused:  # nothing was written; the running deployment is left as it is
            self._finish(body, refused.finding, {})
            if refused.retry:
                raise RetryLater(refused.finding.message) from None
            return
        except DynamicApiError as exc:  # recorded, then re-raised for the caller's retry
            self._finish(body, Finding(True, "ApplyFailed", f"applying the children failed: {exc.summary()}"), {})
            raise
        if placement.problems:
            kept = f"lookup table {table.version} stays in force" if table else "no lookup table is published"
            finding = Finding(True, "InconsistentPartitions",
                              f"the Partitions do not own every neuron exactly once ({kept}): "
                              + "; ".join(placement.problems))
        elif claim_problem:
            finding = Finding(True, "ClaimNotBound", claim_problem)
        else:
            # A partition server down since the network was up stays reported until it is back.
            finding = self._availability(body, table.num_partitions if table else None) or HEALTHY
            if not finding.degraded:
                finding = HEALTHY
        extra: dict[str, Any] = {"selector": naming.selector_string(name)}
        if table is not None:
            extra.update(partitions=table.num_partitions, lookupVersion=table.version)
        if placement.assignment is not None:
            extra.update(placement=placement.source, distributionHash=placement.distribution_hash)
        self._announce(body, net, placement, table)
        if decision.after is not None:
            self._patch_rescale(body, decision.after)
        try:
            self.training.sync(body, net)
            # The run's state may have changed (started, over): the budget follows in the same pass.
            self._apply_budget(self._network(namespace, name) or body, net, unless=body)
        except DynamicApiError as exc:
            self._finish(body, Finding(True, "ApplyFailed", f"starting or watching the training Job failed: "
                                                           f"{exc.summary()}"), extra)
            raise
        self._finish(body, finding, extra)

    def _rescale_decision(self, body: Mapping[str, Any], net: NeuralNetwork,
                          desired: LookupTable | None) -> rescale.Decision:
        """May ``desired`` be published now, or must it wait for the trainer's checkpoint? Writes the
        request (``status.training.rescale``) and posts the event the decision asks for."""
        status = body.get("status") or {}
        in_force = self._lookup_in_force(net.namespace, net.name)
        decision = rescale.decide(status.get("training"), net.training.run_id if net.training else None,
                                  desired=desired.version if desired is not None else None,
                                  in_force=in_force.version if in_force is not None else None,
                                  partitions=desired.num_partitions if desired is not None else None,
                                  now=dt.datetime.now(dt.timezone.utc), timeout=self.rescale_timeout)
        if decision.before is not None:
            self._patch_rescale(body, decision.before)
        if decision.event is not None:
            self.emit(body, *decision.event)
        return decision

    def _patch_rescale(self, body: Mapping[str, Any], fields: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        self.kube.patch_status(naming.API_VERSION, NN_KIND, name=meta["name"], namespace=meta["namespace"],
                               status={"training": {"rescale": dict(fields)}})

    def _hold(self, body: Mapping[str, Any], net: NeuralNetwork, decision: rescale.Decision) -> None:
        """Keep the lookup table in force, the Partitions and the StatefulSet as they are while the
        trainer checkpoints; the training Job is still watched. Raises RetryLater, to reconcile again
        at the wait's deadline (the trainer's answer, or the end of its run, comes sooner as an
        event of the NeuralNetwork: :func:`mpnn_operator.handlers.network_event`)."""
        meta = body["metadata"]
        self.training.sync(body, net)
        body = self._network(meta["namespace"], meta["name"]) or body  # with the request just written
        self._apply_budget(body, net)
        status = body.get("status") or {}
        finding = self._availability(body, status.get("partitions"))
        finding = finding if finding is not None and finding.degraded else HEALTHY
        self._finish(body, finding, {"selector": naming.selector_string(meta["name"])}, waiting=_waiting(status))
        raise RetryLater(rescale.waiting_message(status.get("training")) or "waiting for the trainer's checkpoint",
                         delay=decision.retry_in)

    def _check_size(self, net: NeuralNetwork, configmap: Mapping[str, Any]) -> None:
        """Refuse a lookup ConfigMap the API server would refuse (over 1 MiB of data): the last
        guard, since the lookup is O(spec + partitions) and gzip-compressed when large.

        Raises:
            _Refused: ``LookupTooLarge``, with the sizes and the limit; not retried, since only
                a change of the NeuralNetwork can change the table.
        """
        sizes = {key: len(value.encode()) for key, value in (configmap.get("data") or {}).items()}
        # binaryData counts decoded (the API server's rule): 3 bytes per 4 base64 characters, less padding.
        sizes.update({key: len(value) // 4 * 3 - value.count("=")
                      for key, value in (configmap.get("binaryData") or {}).items()})
        total = sum(sizes.values())
        if total <= CONFIGMAP_LIMIT:
            return
        kept = self._lookup_in_force(net.namespace, net.name)
        raise _Refused(Finding(True, "LookupTooLarge", (
            f"the lookup ConfigMap {configmap['metadata']['name']} would hold {total} bytes "
            f"({', '.join(f'{k} {v}' for k, v in sorted(sizes.items()))}), over the ConfigMap limit of "
            f"{CONFIGMAP_LIMIT} bytes even with the table gzip-compressed: the assignment of {net.partitions} "
            f"partitions over {len(net.model.layers)} layers (strategy {net.distribution.strategy}, placement "
            "from the Partitions when edited by hand) has too many distinct runs; a shorter "
            "spec.distribution.ids list or less fragmented Partition ranges make it fit. Nothing was applied: "
            + (f"lookup table {kept.version} stays in force" if kept else "no lookup table is published"))))

    def _lookup_in_force(self, namespace: str, network: str) -> LookupTable | None:
        cm = self.kube.get("v1", "ConfigMap", name=naming.lookup_name(network), namespace=namespace)
        try:
            return LookupTable.from_configmap(cm) if cm is not None else None
        except LookupTableError:
            return None

    def _partition_statuses(self, namespace: str, name: str, net: NeuralNetwork | None,
                            partitions: list[dict[str, Any]]) -> None:
        """Write each Partition's ``status`` (pod, ready, neurons, parameters) where it changed.

        ``neurons`` and ``parameters`` count only neurons of the network (none without a valid
        spec). A refused write is logged and the others go on: one Partition's status, however
        odd its hand-edited ranges, never fails the reconcile of its network.
        """
        pods = self.kube.list("v1", "Pod", namespace=namespace, label_selector=naming.selector_string(name))
        ready = {p["metadata"]["name"]: any(c.get("type") == "Ready" and c.get("status") == "True"
                                            for c in (p.get("status") or {}).get("conditions") or [])
                 for p in pods}
        for part in partitions:
            index = partition_index(part)
            if index is None:
                continue
            pod = naming.pod_name(name, index)
            status: dict[str, Any] = {"pod": pod, "ready": ready.get(pod, False)}
            if net is not None:
                owned = builders.owned_neurons(net, parse_ranges(part)[0])
                status.update(neurons=sum(end - start for _, start, end in owned),
                              parameters=builders.partition_parameters(net, owned))
            current = part.get("status") or {}
            if any(current.get(k) != v for k, v in status.items()):
                try:
                    self.kube.patch_status(naming.API_VERSION, PARTITION_KIND, name=part["metadata"]["name"],
                                           namespace=namespace, status=status)
                except DynamicApiError as exc:
                    log.warning("the status of Partition %s/%s was refused: %s", namespace,
                                part["metadata"]["name"], exc.summary())

    def _announce(self, body: Mapping[str, Any], net: NeuralNetwork, placement: Placement,
                  table: LookupTable | None) -> None:
        """Events for a new lookup table: Distributed, Scaled or Repartitioned."""
        status = body.get("status") or {}
        if table is None or table.version == status.get("lookupVersion"):
            return
        before = status.get("partitions")
        short = table.version[:19]
        if before is not None and before != table.num_partitions:
            self.emit(body, "Normal", "Scaled",
                      f"scaled from {before} to {table.num_partitions} partitions ({net.distribution.strategy}); "
                      f"lookup {short}")
        elif placement.redistribute or placement.source == STRATEGY:
            self.emit(body, "Normal", "Distributed",
                      f"{net.model.total_neurons} neurons over {table.num_partitions} partitions "
                      f"({net.distribution.strategy}); lookup {short}")
        else:
            self.emit(body, "Normal", "Repartitioned",
                      f"the Partitions edited by hand own every neuron exactly once; lookup {short}")

    def _finish(self, body: Mapping[str, Any], finding: Finding, extra: Mapping[str, Any],
                waiting: tuple[str, str] | None = None) -> None:
        """Write status: conditions for ``finding`` plus ``extra`` fields; warn on a new problem.
        ``waiting``: Progressing's reason and message while a new table waits (see :meth:`_hold`)."""
        meta, status = body["metadata"], body.get("status") or {}
        previous = next((c for c in status.get("conditions") or [] if c.get("type") == "Degraded"), None)
        if finding.degraded and (previous is None or previous.get("message") != finding.message):
            self.emit(body, "Warning", finding.reason, finding.message)
        sts = self._statefulset(body)
        desired = extra.get("partitions", status.get("partitions"))
        new = {"observedGeneration": meta["generation"], **extra,
               **network_status(status, statefulset=sts, desired=desired, finding=finding,
                                generation=meta["generation"], waiting=waiting)}
        self._write_status(body, new)

    def _availability(self, body: Mapping[str, Any], partitions: int | None) -> Finding | None:
        """``PartitionUnavailable`` naming the server pods that are not ready, once the network has
        been Ready (during a rollout unready pods are expected, and Progressing says so); HEALTHY
        when they are all back; None when there is nothing to say (conditions stay as they are).

        Every partition holds neurons no other has: one pod down stops inference (503 naming the
        partition) and training (the trainer waits for it, then resumes from the last checkpoint).
        """
        status = body.get("status") or {}
        was_down = _degraded_by(status, UNAVAILABLE)
        was_up = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        if not partitions or not (was_up or was_down):
            return None
        meta = body["metadata"]
        pods = self.kube.list("v1", "Pod", namespace=meta["namespace"],
                              label_selector=naming.selector_string(meta["name"]))
        ready = {p["metadata"]["name"] for p in pods
                 if not p["metadata"].get("deletionTimestamp")
                 and any(c.get("type") == "Ready" and c.get("status") == "True"
                         for c in (p.get("status") or {}).get("conditions") or [])}
        down = [naming.pod_name(meta["name"], i) for i in range(partitions)
                if naming.pod_name(meta["name"], i) not in ready]
        if down:
            return Finding(True, UNAVAILABLE, f"partition server pod{'s' if len(down) > 1 else ''} "
                                              f"{', '.join(down)} not ready: inference answers 503 naming "
                                              f"the partition, and a training run waits for it")
        return HEALTHY if was_down else None

    def _statefulset(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """The network's StatefulSet, if it is this NeuralNetwork's (not one of the same name)."""
        meta = body["metadata"]
        sts = self.kube.get("apps/v1", "StatefulSet", name=meta["name"], namespace=meta["namespace"])
        return sts if controlled_by(sts, meta["uid"]) else None

    def _write_status(self, body: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        status = body.get("status") or {}
        self.metrics.network_status(body["metadata"]["namespace"], body["metadata"]["name"], {**status, **new})
        if any(status.get(k) != v for k, v in new.items()):
            meta = body["metadata"]
            self.kube.patch_status(naming.API_VERSION, NN_KIND, name=meta["name"], namespace=meta["namespace"],
                                   status=new)
