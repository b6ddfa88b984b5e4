"""``mpnn train``: a training run against a deployed network, as the operator's Job runs it.

The Job's pod mounts the same lookup ConfigMap and shared volume as the
partition servers and runs the same driver as ``mpnn run``
(:func:`partition_server.client.training_loop.train`). Progress goes into the
NeuralNetwork's ``status.training`` through :class:`TrainingReporter`, a merge
patch of the status subresource. A failed run resumes from the last committed
checkpoint when the Job retries, because the driver resumes any checkpoint of
the same ``runId``.

A rescale during the run (``kubectl scale``, a strategy change) waits for the trainer's
checkpoint: :class:`RescaleHandshake` is the trainer's side of ``status.training.rescale``
(the protocol is documented in ``mpnn_operator.rescale`` and docs/training.md).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from partition_server import logs
from partition_server.data.datasets import load_dataset
from partition_server.client.driver import Driver, DriverError, TrainingDiverged
from partition_server.client.training_loop import Recovery, Rescale, train
from partition_server.api.errors import FieldError
from partition_server.api.peer_auth import PeerCredentials, TlsFiles, read_key
from partition_server.api import rescale as phases
from partition_server.api.lookup import LookupTable, LookupTableError
from partition_server.api.manifest import API_VERSION, KIND, parse_network_document, parse_training
from partition_server.storage.store import ModelStore

__all__ = ["RescaleHandshake", "TrainingReporter", "main"]


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

    It also carries the trainer's side of a rescale during the run (``status.training.rescale``,
    see :class:`RescaleHandshake`): :meth:`rescale_request` reads it, :meth:`rescale_checkpointed`
    and :meth:`rescale_completed` answer.

    Args:
        patch_status: ``(status: dict) -> None``, e.g. a merge patch of the status subresource.
        run: the run id (``spec.training.runId``).
        read_status: ``() -> dict | None``, the NeuralNetwork's ``status`` (a GET of the status
            subresource); None: no rescale is ever seen (``mpnn train`` without ``--report``).
    """

    def __init__(self, patch_status: Callable[[Mapping[str, Any]], Any], run: str,
                 read_status: Callable[[], Mapping[str, Any] | None] | None = None):
        self._patch = patch_status
        self._read = read_status
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

        def read() -> Mapping[str, Any] | None:
            # GET of the status subresource: the trainer's role may read that, not the NeuralNetwork.
            try:
                return (dyn.get(resource.status, name=name, namespace=namespace).to_dict() or {}).get("status")
            except NotFoundError:
                return None

        return cls(patch, run, read)

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

    def rescale_request(self) -> dict[str, Any] | None:
        """``status.training.rescale`` of this run as it is now; None without one (or no reader)."""
        if self._read is None:
            return None
        training = (self._read() or {}).get("training") or {}
        if training.get("run") != self.run:
            return None
        return dict(training.get("rescale") or {}) or None

    def rescale_checkpointed(self, checkpoint: int, step: int) -> None:
        """Answer a rescale request: checkpoint ``checkpoint`` holds step ``step``, and the trainer
        steps no more until the new table is published."""
        self.report(phase="Running", step=step, checkpoint=checkpoint,
                    rescale={"phase": phases.CHECKPOINTED, "checkpoint": checkpoint, "step": step,
                             "message": f"checkpoint {checkpoint} of step {step} committed; waiting for the new "
                                        "lookup table"})

    def rescale_completed(self, step: int, version: str, partitions: int) -> None:
        """The run goes on from ``step`` under lookup ``version``."""
        self.report(phase="Running", rescale={"phase": phases.COMPLETED, "message": (
            f"training goes on from step {step} on {partitions} partitions (lookup {version[:19]})")})

    def finished(self, accuracy: float, loss: float) -> None:
        self.report(phase="Succeeded", accuracy=_number(accuracy), loss=_number(loss), completionTime=_now(),
                    message=f"held-out accuracy {accuracy:.4f}")

    def failed(self, message: str) -> None:
        self.report(phase="Failed", message=message[:1024], completionTime=_now())


class RescaleHandshake:
    """The trainer's side of a rescale during a run on Kubernetes, as a :class:`Rescale` for
    :func:`~partition_server.client.training_loop.train`.

    At every step boundary (``due``) it looks, at most every ``poll_seconds``, whether the operator
    asks for a checkpoint (``status.training.rescale.phase: CheckpointRequested``). When it does,
    ``train`` commits a checkpoint of that step, and :meth:`apply` ends the training session,
    answers ``Checkpointed`` with that checkpoint, waits until the operator says ``Published`` (or
    ``TimedOut``) and the lookup file (the mounted ConfigMap, which the kubelet updates) holds the
    table it names, builds a driver for it, waits until every partition is SERVING and has reloaded
    the checkpoint under that table (``Reload`` until each reports the new version), answers
    ``Completed`` and returns the new driver; the run goes on from the checkpointed step.

    Args:
        reporter: reads and answers ``status.training.rescale``.
        lookup_path: the mounted lookup file (``mpnn train --lookup``).
        store: the checkpoints (the one ``train`` just committed is the latest).
        credentials: the peer key (and TLS files) for the new driver.
        wait_seconds: longest wait for the new table and its partitions (``--ready-timeout``);
            beyond it the attempt fails (the Job retries it from that checkpoint).
        poll_seconds: how often the request and the lookup file are read.

    Attributes:
        drivers: every driver :meth:`apply` made, for the caller to close.
    """

    def __init__(self, reporter: TrainingReporter, lookup_path: str | Path, store: ModelStore,
                 credentials: PeerCredentials | None, *, wait_seconds: float = 600.0, poll_seconds: float = 1.0):
        self.reporter, self.lookup_path, self.store = reporter, Path(lookup_path), store
        self.credentials, self.wait_seconds, self.poll_seconds = credentials, wait_seconds, poll_seconds
        self.drivers: list[Driver] = []
        self._next_look = 0.0

    def as_rescale(self) -> Rescale:
        return Rescale(None, self.apply, due=self.due)

    def due(self, step: int) -> bool:
        """Whether the operator asks for a checkpoint now (read at most every ``poll_seconds``)."""
        del step
        now = time.monotonic()
        if now < self._next_look:
            return False
        self._next_look = now + self.poll_seconds
        request = self._quietly(self.reporter.rescale_request)  # a hiccup: ask again later
        return (request or {}).get("phase") == phases.REQUESTED

    def _table(self) -> LookupTable | None:
        try:
            return LookupTable.load(self.lookup_path)
        except (OSError, ValueError, LookupTableError):  # mid-swap, or not there yet
            return None

    def apply(self, driver: Driver) -> Driver:
        latest = self.store.latest()
        if latest is None:  # train() committed one just before
            raise DriverError("rescale: no committed checkpoint to rescale from")
        step = int(latest.meta.get("run_step", 0))
        driver.close_training()  # the kept servers take the new driver's session at once
        log.info("rescale requested: checkpoint %d of step %d committed; waiting for the new lookup table",
                 latest.sequence, step)
        deadline = time.monotonic() + self.wait_seconds
        request: dict = {"phase": phases.REQUESTED}
        while True:
            # Answered again whenever the request is (re)new: a second scale may overwrite the
            # answer before the operator has published; this checkpoint serves any table.
            if request.get("phase") == phases.REQUESTED:
                self._quietly(self.reporter.rescale_checkpointed, latest.sequence, step)
            request = self._quietly(self.reporter.rescale_request) or {}
            table = self._table()
            if (request.get("phase") in (phases.PUBLISHED, phases.TIMED_OUT) and table is not None
                    and table.version == request.get("lookupVersion")):
                break
            if time.monotonic() > deadline:
                raise DriverError(f"rescale: lookup {str(request.get('lookupVersion'))[:19]} not published and "
                                  f"mounted within {self.wait_seconds:.0f} s (status.training.rescale: "
                                  f"{request.get('phase')}, mounted: {table.version[:19] if table else None}); "
                                  f"the run resumes from checkpoint {latest.sequence} when the Job retries")
            time.sleep(self.poll_seconds)
        new = Driver(table, timeout=driver.timeout, credentials=self.credentials)
        self.drivers.append(new)
        try:
            new.wait_ready(timeout=max(1.0, deadline - time.monotonic()))
            while True:  # a server that has not yet seen the new file reloads under the old table
                stale = [r.partition for r in new.reload() if r.lookup_version != table.version]
                if not stale:
                    break
                if time.monotonic() > deadline:
                    raise DriverError(f"rescale: partitions {stale} did not take lookup {table.version[:19]} "
                                      f"within {self.wait_seconds:.0f} s")
                time.sleep(self.poll_seconds)
        except DriverError as exc:
            # Not a partition failure to recover from on the old driver (its table is gone): the
            # attempt fails and the Job retries it from this checkpoint under the new table.
            raise DriverError(f"rescale to lookup {table.version[:19]}: {exc}; the run resumes from checkpoint "
                              f"{latest.sequence} when the Job retries") from exc
        log.info("rescaled to %d partitions (lookup %s); training goes on from step %d", table.num_partitions,
                 table.version[:19], step)
        self._quietly(self.reporter.rescale_completed, step, table.version, table.num_partitions)
        return new

    @staticmethod
    def _quietly(call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)``, or None when the API server fails it: a hiccup must not fail the run
        (the wait is bounded by its deadline, and an unanswered request by the operator's)."""
        try:
            return call(*args)
        except Exception as exc:  # noqa: BLE001
            log.warning("status.training.rescale: %s failed: %s", getattr(call, "__name__", call), exc)
            return None


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
        store = ModelStore(model_dir)
        handshake = RescaleHandshake(reporter, args.lookup, store, credentials, wait_seconds=args.ready_timeout,
                                     poll_seconds=getattr(args, "rescale_poll", 1.0))
        with Driver(table, timeout=args.timeout, credentials=credentials) as first:
            first.wait_ready(timeout=args.ready_timeout)
            current = lambda: handshake.drivers[-1] if handshake.drivers else first  # noqa: E731

            def on_checkpoint(p: dict) -> None:
                accuracy = None
                if p["step"] % per_epoch == 0:
                    accuracy = current().evaluate(data.x_test, data.y_test).accuracy
                reporter.progress(p["epoch"], p["step"], p["loss"], p["checkpoint"], accuracy)

            recovery = None
            if args.recovery_timeout > 0:  # the StatefulSet restarts a failed pod; wait for it, within the bound
                recovery = Recovery(wait_seconds=args.recovery_timeout, report=reporter.recovery)
            try:
                train(first, data, training, store, model, progress=on_checkpoint, show_bar=False,
                      recovery=recovery, rescales=[handshake.as_rescale()])
                final = current().evaluate(data.x_test, data.y_test)
            finally:
                for extra in handshake.drivers:
                    extra.close()
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
