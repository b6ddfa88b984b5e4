"""Rescaling during a training run: the operator's side of the checkpoint handshake.

A new lookup table makes every partition server reload the **latest committed checkpoint**
under it. Published in the middle of a run, that would lose every step since the trainer's last
checkpoint and strand the trainer's driver on the old table. So while a run is Running, a new
table waits for the trainer, through ``status.training.rescale`` of the NeuralNetwork (both
sides already read or patch that status; docs/training.md, "Rescaling during a run"):

1. The operator wants to publish table V while the table in force is another: it writes
   ``{phase: CheckpointRequested, lookupVersion: V, partitions, requestTime}``, posts
   ``RescaleRequested`` and keeps the table in force, the Partitions and the StatefulSet's size
   (``Progressing`` with reason ``WaitingForCheckpoint``).
2. The trainer sees it at its next step boundary, commits a checkpoint of that step, ends its
   training session and answers ``{phase: Checkpointed, checkpoint, step}``; then it stops stepping.
3. The operator publishes the table it wants now (V, or a later one: a trainer parked at a
   committed checkpoint takes any table) in the usual order, and writes
   ``{phase: Published, lookupVersion}`` (event ``RescalePublished``).
4. The servers reload that checkpoint under the new table; the trainer waits until its mounted
   lookup file holds ``lookupVersion`` and every partition serves it, reopens its session on a new
   driver, goes on from that step and writes ``{phase: Completed}``.

The wait is bounded: with no answer ``timeout`` seconds after ``requestTime`` the operator
publishes anyway (``{phase: TimedOut}``, Warning event ``RescaleTimedOut``): a trainer that is
dead or stuck must not hold scaling forever; such a run loses the steps since its last checkpoint,
as before. A request whose run is no longer Running, or whose table is the one in force again
(scaled back), is answered ``Published`` at once, so a trainer never waits on it.

:func:`decide` is the pure decision; :class:`~mpnn_operator.reconcile.Reconciler` acts on it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Mapping

from partition_server.api.rescale import CHECKPOINTED, COMPLETED, PUBLISHED, REQUESTED, TIMED_OUT

__all__ = ["CHECKPOINTED", "COMPLETED", "DEFAULT_TIMEOUT", "PUBLISHED", "REQUESTED", "TIMED_OUT", "WAITING",
           "Decision", "answered", "decide", "parse_time", "waiting_message"]

# The phases in which the trainer is (or may soon be) waiting for the operator.
PENDING = (REQUESTED, CHECKPOINTED)
# Progressing's reason while a new table waits for the trainer's checkpoint.
WAITING = "WaitingForCheckpoint"
# Seconds the operator waits for the trainer's answer (``mpnn operator --rescale-timeout``).
DEFAULT_TIMEOUT = 120.0


def parse_time(text: Any) -> dt.datetime | None:
    """An RFC 3339 ``...Z`` time as written by :func:`mpnn_operator.conditions.now`; None if unreadable."""
    try:
        return dt.datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None


def _stamp(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Decision:
    """What to do with a new lookup table, given the run.

    Attributes:
        hold: keep the table in force, the Partitions and the StatefulSet; reconcile again after
            ``retry_in`` seconds (the deadline of the wait) or when the trainer answers.
        before: ``status.training.rescale`` to merge-patch now (the request), or None.
        after: ``status.training.rescale`` to merge-patch once the children are applied (the
            table published), or None.
        event: ``(type, reason, message)`` to post, or None.
        retry_in: seconds until the wait's deadline (with ``hold``).
    """

    hold: bool = False
    before: Mapping[str, Any] | None = None
    after: Mapping[str, Any] | None = None
    event: tuple[str, str, str] | None = None
    retry_in: float | None = None


PROCEED = Decision()


def decide(training: Mapping[str, Any] | None, run: str | None, *, desired: str | None, in_force: str | None,
           partitions: int | None, now: dt.datetime, timeout: float = DEFAULT_TIMEOUT) -> Decision:
    """Whether lookup table ``desired`` may be published now, and what to tell the trainer.

    Args:
        training: ``status.training`` as it is.
        run: ``spec.training.runId``, None without spec.training.
        desired: the version of the table the spec and Partitions call for; None when there is
            none to publish (inconsistent Partitions).
        in_force: the version of the published table (the lookup ConfigMap), None before the first.
        partitions: the partition count of ``desired`` (for the request and messages).
        now: the current time (UTC).
        timeout: seconds to wait for the trainer's answer after ``requestTime``.
    """
    training = training or {}
    rescale = training.get("rescale") or {}
    phase = rescale.get("phase")
    change = desired is not None and in_force is not None and desired != in_force
    active = run is not None and training.get("run") == run and training.get("phase") == "Running"
    if not change:
        if phase in PENDING and in_force is not None:  # scaled back, or the run ended: nothing to wait for
            return Decision(after={"phase": PUBLISHED, "lookupVersion": in_force, "message": (
                f"the lookup table in force ({in_force[:19]}) stays: no new table to wait for")})
        return PROCEED
    short = f"{desired[:19]} ({partitions} partitions)"
    if not active:
        if phase in PENDING:
            return Decision(after={"phase": PUBLISHED, "lookupVersion": desired,
                                   "message": f"published lookup {short}; the run is no longer Running"})
        return PROCEED
    if phase == CHECKPOINTED:
        where = f"checkpoint {rescale.get('checkpoint')} of step {rescale.get('step')}"
        return Decision(after={"phase": PUBLISHED, "lookupVersion": desired, "message": (
            f"published lookup {short} after the trainer's {where}; the servers reload it under the new table")},
            event=("Normal", "RescalePublished",
                   f"run {run}: lookup {short} published after the trainer's {where}"))
    requested = parse_time(rescale.get("requestTime")) if phase == REQUESTED else None
    if requested is None:
        return Decision(hold=True, retry_in=timeout, before={
            "phase": REQUESTED, "lookupVersion": desired, "partitions": partitions, "requestTime": _stamp(now),
            "checkpoint": None, "step": None,
            "message": (f"waiting up to {timeout:.0f} s for the trainer to checkpoint at its next step boundary "
                        f"before publishing lookup {short}")},
            event=("Normal", "RescaleRequested",
                   f"run {run} is training: lookup {short} waits for the trainer's checkpoint (at most "
                   f"{timeout:.0f} s)"))
    waited = (now - requested).total_seconds()
    if waited >= timeout:
        message = (f"the trainer did not checkpoint within {timeout:.0f} s: lookup {short} published anyway; the "
                   "run resumes from its last committed checkpoint")
        return Decision(after={"phase": TIMED_OUT, "lookupVersion": desired, "message": message},
                        event=("Warning", "RescaleTimedOut", f"run {run}: {message}"))
    before = None
    if rescale.get("lookupVersion") != desired or rescale.get("partitions") != partitions:  # rescaled again
        before = {"lookupVersion": desired, "partitions": partitions}
    return Decision(hold=True, before=before, retry_in=max(timeout - waited, 1.0))


def answered(training: Mapping[str, Any] | None) -> bool:
    """Whether a request waits on the operator now: the trainer has checkpointed, or the run the
    request was for is no longer Running (for the watch of NeuralNetwork events)."""
    training = training or {}
    phase = (training.get("rescale") or {}).get("phase")
    return phase == CHECKPOINTED or (phase == REQUESTED and training.get("phase") != "Running")


def waiting_message(training: Mapping[str, Any] | None) -> str | None:
    """Progressing's message while ``status.training.rescale`` waits for the trainer, else None."""
    rescale = (training or {}).get("rescale") or {}
    if rescale.get("phase") != REQUESTED:
        return None
    return (f"lookup {str(rescale.get('lookupVersion'))[:19]} ({rescale.get('partitions')} partitions) waits for "
            f"the trainer of run {(training or {}).get('run')} to checkpoint (requested {rescale.get('requestTime')})")
