"""NeuralNetwork status conditions (Ready, Progressing, Degraded) and phase.

Pure functions of the previous status, the StatefulSet and what the reconciler
found; ``lastTransitionTime`` moves only when a condition's status flips, so
recomputing an unchanged status yields an identical dict (and no API write).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

__all__ = ["DEGRADED", "HEALTHY", "PROGRESSING", "READY", "Finding", "get_condition", "network_status", "now",
           "rollout", "set_condition"]

READY, PROGRESSING, DEGRADED = "Ready", "Progressing", "Degraded"


@dataclass(frozen=True)
class Finding:
    """The Degraded verdict of a reconcile: ``degraded`` with a CamelCase ``reason`` and a message."""

    degraded: bool
    reason: str
    message: str


HEALTHY = Finding(False, "Reconciled", "spec and Partitions are consistent")


def now() -> str:
    """The current time as RFC 3339 UTC with second precision, as Kubernetes writes it."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(conditions: Sequence[Mapping[str, Any]], type_: str, *, status: bool, reason: str,
                  message: str, generation: int | None, timestamp: str) -> list[dict[str, Any]]:
    """A copy of ``conditions`` with ``type_`` set; keeps the order and the transition time
    unless the status changes."""
    value = "True" if status else "False"
    out, found = [], False
    for cond in conditions:
        cond = dict(cond)
        if cond.get("type") == type_:
            found = True
            if cond.get("status") != value or "lastTransitionTime" not in cond:
                cond["lastTransitionTime"] = timestamp
            cond.update(status=value, reason=reason, message=message)
            _set_generation(cond, generation)
        out.append(cond)
    if not found:
        cond = {"type": type_, "status": value, "reason": reason, "message": message,
                "lastTransitionTime": timestamp}
        _set_generation(cond, generation)
        out.append(cond)
    return out


def _set_generation(cond: dict[str, Any], generation: int | None) -> None:
    if generation is None:
        cond.pop("observedGeneration", None)
    else:
        cond["observedGeneration"] = generation


def get_condition(status: Mapping[str, Any] | None, type_: str) -> Mapping[str, Any] | None:
    """The condition of type ``type_`` in ``status.conditions``, or None."""
    for cond in (status or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


def rollout(statefulset: Mapping[str, Any] | None, desired: int | None) -> tuple[int, bool, str, str]:
    """``(ready pods, rolled out?, reason, message)`` of the partition servers.

    Rolled out: the StatefulSet controller saw the latest spec, and ``desired``
    pods exist, run the latest revision and are ready.
    """
    if statefulset is None or desired is None:
        return 0, False, "NotDeployed", "the partition servers are not deployed yet"
    spec, st = statefulset.get("spec") or {}, statefulset.get("status") or {}
    ready = st.get("readyReplicas") or 0
    current = st.get("replicas") or 0
    updated = st.get("updatedReplicas") or 0
    observed = (st.get("observedGeneration") or 0) >= (statefulset.get("metadata") or {}).get("generation", 0)
    done = observed and spec.get("replicas") == desired and current == desired == ready == updated
    if done:
        return ready, True, "AllPartitionsReady", f"{ready}/{desired} partition servers ready"
    reason = "Scaling" if current != desired or spec.get("replicas") != desired else "RollingOut"
    return ready, False, reason, f"{ready}/{desired} partition servers ready, {updated} updated"


def network_status(status: Mapping[str, Any] | None, *, statefulset: Mapping[str, Any] | None,
                   desired: int | None, finding: Finding | None, generation: int | None,
                   timestamp: str | None = None, waiting: tuple[str, str] | None = None) -> dict[str, Any]:
    """``conditions``, ``phase`` and ``readyPartitions`` for a NeuralNetwork.

    Args:
        status: the current ``.status`` (conditions are carried over).
        statefulset: the partition servers' StatefulSet, or None.
        desired: partitions in the lookup table in force, None before the first one.
        finding: the reconcile's verdict; None keeps the current Degraded condition.
        generation: the ``metadata.generation`` these conditions describe.
        waiting: ``(reason, message)`` while a change of the spec waits for something other than the
            servers (a new lookup table for the trainer's checkpoint, :mod:`mpnn_operator.rescale`):
            Progressing is True with it, and the phase is Progressing unless Degraded.
    """
    timestamp = timestamp or now()
    conditions = list((status or {}).get("conditions") or [])
    if finding is not None:
        conditions = set_condition(conditions, DEGRADED, status=finding.degraded, reason=finding.reason,
                                   message=finding.message, generation=generation, timestamp=timestamp)
    ready, done, reason, message = rollout(statefulset, desired)
    conditions = set_condition(conditions, READY, status=done, reason=reason, message=message, generation=generation,
                               timestamp=timestamp)
    progressing = not done and statefulset is not None
    progress_reason, progress_message = ("Complete" if done else reason), message
    if waiting is not None:
        progressing, (progress_reason, progress_message) = True, waiting
    conditions = set_condition(conditions, PROGRESSING, status=progressing, reason=progress_reason,
                               message=progress_message, generation=generation, timestamp=timestamp)
    conditions.sort(key=lambda c: (READY, PROGRESSING, DEGRADED).index(c["type"])
                    if c.get("type") in (READY, PROGRESSING, DEGRADED) else 3)
    degraded = get_condition({"conditions": conditions}, DEGRADED)
    if degraded is not None and degraded.get("status") == "True":
        phase = "Degraded"
    elif done and waiting is None:
        phase = "Ready"
    else:
        phase = "Progressing"
    return {"conditions": conditions, "phase": phase, "readyPartitions": ready}
