"""``mpnn train``: a training run against a deployed network, as the operator's Job runs it.

The Job's pod mounts the same lookup ConfigMap and shared volume as the
partition servers and runs the same driver as ``mpnn run``
(:func:`partition_server.client.training_loop.train`). Progress goes into the
NeuralNetwork's ``status.training`` through :class:`TrainingReporter`, a merge
patch of the status subresource. A failed run resumes from the last committed
checkpoint when the Job retries, because the driver resumes any checkpoint of
the same ``runId``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from partition_server import logs
from partition_server.data.datasets import load_dataset
from partition_server.client.driver import Driver, DriverError, TrainingDiverged
from partition_server.client.training_loop import Recovery, train
from partition_server.api.errors import FieldError
from partition_server.api.peer_auth import PeerCredentials, TlsFiles, read_key
from partition_server.api.lookup import LookupTable
from partition_server.api.manifest import API_VERSION, KIND, parse_network_document, parse_training
from partition_server.storage.store import ModelStore

__all__ = ["TrainingReporter", "main"]


log = logging.getLogger("mpnn.trainer")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _number(value: float) -> float | None:
    """``value`` rounded for the status; None (the field is dropped) for NaN or infinity,
    which JSON cannot carry (a diverged run's loss)."""
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


class TrainingReporter:
    """Writes ``status.training`` of one NeuralNetwork: the path every progress report takes.

    Fields: ``run``, ``phase`` (Running, Succeeded, Failed), ``epoch``, ``step``,
    ``loss``, ``accuracy`` (held-out split, in [0, 1]), ``checkpoint`` (last
    committed checkpoint number), ``restarts`` (partition failures this attempt recovered
    from), ``startTime``, ``completionTime``, ``message``.
    The operator writes the rest of ``status.training`` (``job``; phases Pending, Blocked
    and Stopped, and the outcome of a Job the trainer could not report; see
    :mod:`mpnn_operator.training`).

    Args:
        patch_status: ``(status: dict) -> None``, e.g. a merge patch of the status subresource.
        run: the run id (``spec.training.runId``).
    """

    def __init__(self, patch_status: Callable[[Mapping[str, Any]], Any], run: str):
        self._patch = patch_status
        self.run = run

    @classmethod
    def for_network(cls, namespace: str, name: str, run: str) -> "TrainingReporter":
        """Report to ``neuralnetworks/<name>`` in ``namespace`` with the ambient kubeconfig or pod identity."""
        # The kubernetes client (the ``operator`` extra) is needed only for reporting, not to train.
        from kubernetes import client, config
        from kubernetes.dynamic import DynamicClient
        from kubernetes.dynamic.exceptions import NotFoundError

        config.load_config()
        dyn = DynamicClient(client.ApiClient())
        resource = dyn.resources.get(api_version=API_VERSION, kind=KIND)

        def patch(status: Mapping[str, Any]) -> None:
            try:
                dyn.patch(resource.status, body={"status": dict(status)}, name=name, namespace=namespace,
                          content_type="application/merge-patch+json")
            except NotFoundError:  # the network is gone: nothing to report to
                pass

        return cls(patch, run)

    def report(self, **fields: Any) -> None:
        self._patch({"training": {"run": self.run, **fields}})

    def started(self) -> None:
        self.report(phase="Running", startTime=_now(), completionTime=None, message=None)

    def progress(self, epoch: int, step: int, loss: float, checkpoint: int | None,
                 accuracy: float | None = None) -> None:
        fields: dict[str, Any] = {"phase": "Running", "epoch": epoch, "step": step,
                                  "loss": _number(loss), "checkpoint": checkpoint}
        if accuracy is not None:
            fields["accuracy"] = _number(accuracy)
        self.report(**fields)

    def recovery(self, event: Mapping[str, Any]) -> None:
        """A ``training_loop.Recovery`` report: a partition failed (the message says what, and how long the
        trainer waits), or training resumed (``restarts`` counts it, the message is cleared)."""
        if event["event"] == "unavailable":
            self.report(phase="Running", message=(
                f"step {event['step'] + 1} failed: {event['error']}; waiting up to {event['wait_seconds']:.0f} s "
                f"for every partition, then resuming from the last committed checkpoint")[:1024])
        else:
            self.report(phase="Running", restarts=event["restarts"], step=event["step"],
                        checkpoint=event["checkpoint"], message=None)

    def finished(self, accuracy: float, loss: float) -> None:
        self.report(phase="Succeeded", accuracy=_number(accuracy), loss=_number(loss), completionTime=_now(),
                    message=f"held-out accuracy {accuracy:.4f}")

    def failed(self, message: str) -> None:
        self.report(phase="Failed", message=message[:1024], completionTime=_now())


EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def main(args: Any) -> int:
    """Run the training of ``--training`` (JSON of ``spec.training``). Exit 0 done, 1 failed (the
    Job retries), 2 a configuration error that a retry cannot mend (the Job fails at once): a
    missing, unreadable or short peer key (``--peer-key-file``), an unreadable ``--tls-dir``, or a
    diverged run."""
    logs.configure(args.log_level)
    table = LookupTable.load(args.lookup)
    name, model = parse_network_document(json.loads(Path(args.network).read_text()))
    training = parse_training(json.loads(args.training))
    model_dir = Path(args.model_dir)
    path = training.dataset.path
    if path and not Path(path).is_absolute():
        path = str(model_dir.parent / path)  # dataset paths are relative to the shared volume
    reporter = (TrainingReporter.for_network(args.namespace, name, training.run_id) if args.report
                else TrainingReporter(lambda status: log.info("status", extra={"status": status}), training.run_id))
    reporter.started()
    try:
        # First, before the dataset: the key and TLS files are configuration (a Secret that is
        # not mounted); FieldError is a ValueError, so it must not reach the handler below,
        # whose exit 1 would have the Job retry what cannot change.
        tls = TlsFiles.from_dir(args.tls_dir) if args.tls_dir else None
        credentials = PeerCredentials(name, read_key(args.peer_key_file), tls)
    except FieldError as exc:
        log.error("training not started", extra={"run": training.run_id, "error": str(exc)})
        reporter.failed(str(exc))
        print(f"mpnn train: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        data = load_dataset(training.dataset.format, path)
        per_epoch = math.ceil(len(data.x_train) / training.batch_size)
        with Driver(table, timeout=args.timeout, credentials=credentials) as driver:
            driver.wait_ready(timeout=args.ready_timeout)

            def on_checkpoint(p: dict) -> None:
                accuracy = None
                if p["step"] % per_epoch == 0:
                    accuracy = driver.evaluate(data.x_test, data.y_test).accuracy
                reporter.progress(p["epoch"], p["step"], p["loss"], p["checkpoint"], accuracy)

            recovery = None
            if args.recovery_timeout > 0:  # the StatefulSet restarts a failed pod; wait for it, within the bound
                recovery = Recovery(wait_seconds=args.recovery_timeout, report=reporter.recovery)
            train(driver, data, training, ModelStore(model_dir), model, progress=on_checkpoint, show_bar=False,
                  recovery=recovery)
            final = driver.evaluate(data.x_test, data.y_test)
        reporter.finished(final.accuracy, final.loss)
        print(json.dumps({"run": training.run_id, "accuracy": final.accuracy, "loss": final.loss}))
        return EXIT_OK
    except (DriverError, OSError, ValueError) as exc:
        log.error("training failed", extra={"run": training.run_id, "error": str(exc)})
        reporter.failed(str(exc))
        print(f"mpnn train: error: {exc}", file=sys.stderr)
        # A diverged run diverges again from the same checkpoint: exit 2 fails the Job at once
        # (its podFailurePolicy) instead of retrying.
        return EXIT_USAGE if isinstance(exc, TrainingDiverged) else EXIT_FAILURE
