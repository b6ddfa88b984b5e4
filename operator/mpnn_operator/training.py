"""Training runs: one Job per ``spec.training.runId``, started once; other runs' Jobs stopped.

``status.training`` has two writers, each merge-patching only the keys it sets:
the trainer (``mpnn train`` through :class:`~partition_server.client.trainer.TrainingReporter`:
phases Running, Succeeded, Failed, and the progress fields) and this module
(``job``, phases Pending and Blocked; Failed or Succeeded when the Job finished without
the trainer saying so, e.g. its pod was killed for memory; Stopped when the Job was
deleted before the run finished).

A run starts at most once. ``status.training.job`` records its Job, so an
unchanged runId never gets a second Job: not after its Job finished or was
deleted, not across operator restarts. The Job's name is a function of the run,
so a crash between creating the Job and recording it finds the Job again.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from partition_server.api.manifest import DEFAULT_IMAGE, KIND, NeuralNetwork

from . import builders, naming
from .conditions import get_condition, now
from .kube import Kube

__all__ = ["BLOCKED", "FAILED", "JOB_API", "JOB_KIND", "NO_STORAGE", "PENDING", "RUNNING", "RUN_FIELDS", "STOPPED",
           "SUCCEEDED", "Training", "UNFINISHED"]

JOB_API, JOB_KIND = "batch/v1", "Job"
PENDING, BLOCKED, RUNNING, SUCCEEDED, FAILED, STOPPED = ("Pending", "Blocked", "Running", "Succeeded", "Failed",
                                                         "Stopped")
# Phases of a run that has not finished: its Job gone, the run is Stopped.
UNFINISHED = (PENDING, BLOCKED, RUNNING)
# Every key of status.training but ``run``: cleared when a new run begins.
RUN_FIELDS = ("job", "phase", "epoch", "step", "loss", "accuracy", "checkpoint", "restarts", "startTime",
              "completionTime", "message", "rescale")
NO_STORAGE = ("spec.training needs spec.storage: the trainer and the partition servers share the model and "
              "its checkpoints on that volume (spec.storage is immutable: create the NeuralNetwork again with "
              "storage to train it)")


def _true(job: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    cond = get_condition(job.get("status"), type_)
    return cond if cond is not None and cond.get("status") == "True" else None


class Training:
    """Starts, stops and watches the training Jobs of NeuralNetworks.

    Args:
        kube: API access.
        emit: posts an Event, ``(object, type, reason, message)``.
        adopt: makes the NeuralNetwork the controlling owner of a child, in place.
        server_image: the Job's image unless ``spec.server.image`` is set.
    """

    def __init__(self, kube: Kube, *, emit: Callable[[Mapping[str, Any], str, str, str], None],
                 adopt: Callable[[dict[str, Any], Mapping[str, Any]], None], server_image: str = DEFAULT_IMAGE):
        self.kube, self.emit, self.adopt, self.server_image = kube, emit, adopt, server_image

    def sync(self, body: Mapping[str, Any], net: NeuralNetwork) -> None:
        """Bring the training Job of ``net`` in line with ``spec.training``, and ``status.training``
        with what can be seen of it.

        Raises:
            kubernetes.dynamic.exceptions.DynamicApiError: an API call failed; callers retry.
        """
        current = dict(((body.get("status") or {}).get("training")) or {})
        jobs = self.kube.list(JOB_API, JOB_KIND, namespace=net.namespace,
                              label_selector=naming.children_selector(net.name))
        if net.training is None:
            for job in jobs:
                self._stop(body, job, "spec.training was removed")
            return
        run = net.training.run_id
        wanted = naming.job_name(net.name, run)
        stale = [j for j in jobs if j["metadata"]["name"] != wanted]
        if stale:
            # Two trainers would step the same servers: the new run starts only once the
            # old Jobs and their pods are gone (their deletion is a Job event, bringing us back).
            for job in stale:
                self._stop(body, job, f"run {run} replaces it")
            return
        if net.storage is None:
            self._set(body, current, run, {"phase": BLOCKED, "message": NO_STORAGE}, warn=True)
            return
        job = jobs[0] if jobs else None
        if job is None:
            if current.get("run") == run and current.get("job") == wanted:
                # Started before, and its Job deleted since: never a second Job for a run.
                if current.get("phase") in UNFINISHED:
                    message = (f"Job {wanted} was deleted before the run finished; a run is never started twice: "
                               "set a new spec.training.runId to train again")
                    self._set(body, current, run, {"phase": STOPPED, "message": message, "completionTime": now()})
                    self.emit(body, "Normal", "TrainingStopped", f"run {run}: {message}")
                return
            if current.get("run") != run:  # written before the Job exists, so no report of the trainer is lost
                current = self._set(body, current, run, {"phase": PENDING,
                                                         "message": f"starting Job {wanted}; waiting for the trainer"})
            obj = builders.training_job(net, self.server_image)
            self.adopt(obj, body)
            job = self.kube.create(obj)
            if job is None:
                self._set(body, current, run, {"phase": BLOCKED, "message": (
                    f"a Job named {wanted} exists that the operator did not create for this network; delete it "
                    "or choose another spec.training.runId")}, warn=True)
                return
            self.emit(body, "Normal", "TrainingStarted", f"run {run}: Job {wanted} created")
        current = self._set(body, current, run, {"job": wanted})
        self._observe(body, net, current, job)

    def _observe(self, body: Mapping[str, Any], net: NeuralNetwork, current: dict[str, Any],
                 job: Mapping[str, Any]) -> None:
        """Mirror a finished Job the trainer could not report; say why its pod cannot start."""
        run, name = net.training.run_id, job["metadata"]["name"]
        complete = _true(job, "Complete")
        if complete is not None:
            if current.get("phase") != SUCCEEDED:
                self._set(body, current, run, {
                    "phase": SUCCEEDED, "message": f"Job {name} completed; the trainer did not report its result",
                    "completionTime": complete.get("lastTransitionTime") or now()})
            return
        failed = _true(job, "Failed")
        if failed is not None:
            if current.get("phase") != FAILED:
                message = f"Job {name} failed ({failed.get('reason')}): {failed.get('message') or ''}".rstrip(": ")
                self._set(body, current, run, {"phase": FAILED, "message": message[:1024],
                                               "completionTime": failed.get("lastTransitionTime") or now()})
                self.emit(body, "Warning", "TrainingFailed", message)
            return
        if current.get("phase") not in (PENDING, BLOCKED):
            return  # the trainer has reported: its pod exists
        account = net.training.service_account_name
        if self.kube.get("v1", "ServiceAccount", name=account, namespace=net.namespace) is None:
            self._set(body, current, run, {"phase": BLOCKED, "message": (
                f"ServiceAccount {account} (spec.training.serviceAccountName) does not exist in namespace "
                f"{net.namespace}, so Job {name} cannot create its pod: create it and bind the ClusterRole "
                "mpnn-trainer to it (docs/training.md)")}, warn=True)
        elif current.get("phase") == BLOCKED:
            self._set(body, current, run, {"phase": PENDING,
                                           "message": f"starting Job {name}; waiting for the trainer"})

    def _stop(self, body: Mapping[str, Any], job: Mapping[str, Any], why: str) -> None:
        meta = job["metadata"]
        if meta.get("deletionTimestamp"):
            return
        # Foreground: the Job object stays until its pods are gone, so "no Job left" means no trainer left.
        if self.kube.delete(JOB_API, JOB_KIND, name=meta["name"], namespace=meta["namespace"],
                            propagation="Foreground"):
            run = (meta.get("labels") or {}).get(naming.RUN, "?")
            self.emit(body, "Normal", "TrainingStopped", f"run {run}: Job {meta['name']} deleted ({why})")

    def _set(self, body: Mapping[str, Any], current: dict[str, Any], run: str, fields: Mapping[str, Any],
             warn: bool = False) -> dict[str, Any]:
        """Merge-patch ``fields`` of run ``run`` into ``status.training`` where they differ (a new run
        clears the previous run's fields first); returns the status as it is now. ``warn``: post a
        Warning event when the message is new."""
        if current.get("run") != run:
            patch = {**{k: None for k in RUN_FIELDS}, **fields, "run": run}
        else:
            patch = {k: v for k, v in fields.items() if current.get(k) != v}
        if not patch:
            return current
        if warn and fields.get("message") != current.get("message"):
            self.emit(body, "Warning", "TrainingBlocked", fields["message"])
        meta = body["metadata"]
        self.kube.patch_status(naming.API_VERSION, KIND, name=meta["name"], namespace=meta["namespace"],
                               status={"training": patch})
        merged = {**current, **patch}
        return {k: v for k, v in merged.items() if v is not None}
