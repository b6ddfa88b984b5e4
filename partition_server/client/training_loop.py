"""The training loop on top of the driver: :func:`train`, its resumable run over a dataset.

:class:`Recovery` (surviving a partition that fails mid-run) and :class:`Rescale` (a lossless
repartitioning at a step boundary) are the ways a run reacts to its partitions; both act through a
:class:`~partition_server.client.driver.Driver`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import grpc
import numpy as np

from partition_server.api.manifest import ModelSpec, TrainingSpec
from partition_server.client.driver import KEEP_CHECKPOINTS, Driver, DriverError, TrainingDiverged
from partition_server.data.datasets import Dataset
from partition_server.engine import OptimizerConfig
from partition_server.storage.store import ModelStore

__all__ = ["RECOVERABLE_CODES", "Recovery", "Rescale", "TrainResult", "optimizer_of", "train"]

log = logging.getLogger("mpnn.driver")

@dataclass
class TrainResult:
    """What a training run did.

    ``steps``: optimizer steps taken by this call; ``seconds``: wall time of the training
    loop; ``resumed_from``: the run's step it resumed at (None for a fresh start);
    ``checkpoint``: sequence of the latest committed checkpoint (None if there is none).
    """

    steps: int
    epochs: int
    last_loss: float
    seconds: float
    resumed_from: int | None
    checkpoint: int | None
    restarts: int = 0  # partition failures recovered from (Recovery)


@dataclass
class Rescale:
    """A repartitioning during a run, at the boundary after step ``at_step``, without loss.

    The driver first commits a checkpoint of that step (unless one was just committed), then calls
    ``apply(driver)``, which publishes the new lookup table, brings up the servers it names, makes
    every one of them reload the checkpoint (each reads the rows it now owns from whichever shards
    hold them) and returns a driver for the new table; the run continues on it. The math does not
    depend on the split, only the summation order does.

    ``due``, when given, replaces ``at_step``: it is asked at every step boundary with the steps
    done so far, and the rescale happens whenever it answers True (any number of times). On
    Kubernetes that is the operator's request (``trainer.RescaleHandshake``); ``mpnn run
    --repartition`` knows its steps in advance.
    """

    at_step: int | None
    apply: Callable[[Driver], Driver]
    done: bool = False
    due: Callable[[int], bool] | None = None

    def wanted(self, step: int) -> bool:
        """Whether to rescale at the boundary after ``step`` steps."""
        if self.due is not None:
            return self.due(step)
        return not self.done and self.at_step == step


# What a partition that died or stalls looks like to the driver: its own call fails UNAVAILABLE
# (connection refused) or outlives its deadline; a peer's Exchange to it fails the peer's RunPass
# ABORTED; the driver cancelling the others' calls surfaces as CANCELLED.
RECOVERABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                               grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED})


@dataclass
class Recovery:
    """How a training run survives a partition that fails mid-run.

    On a failed step (a :data:`RECOVERABLE_CODES` status) the driver calls ``restart`` (local mode
    restarts crashed server processes there; on Kubernetes the StatefulSet does, and ``restart``
    is None), waits up to ``wait_seconds`` for every partition to answer SERVING, makes **every**
    partition reload the latest committed checkpoint (so none keeps rows newer than the others),
    and resumes the run at that checkpoint's step: the steps since it are lost and redone with the
    same batches.

    Args:
        wait_seconds: longest wait for the partitions to come back, seconds, per failure.
        max_recoveries: failures recovered from in one run; the next one is raised.
        restart: ``(error) -> None``, called first; raise from it to give up (e.g. too many restarts).
        report: ``(event) -> None``, called when a failure is noticed (``{"event": "unavailable",
            "error", "step", "restarts", "wait_seconds"}``) and once training resumes
            (``{"event": "resumed", "step", "lost_steps", "seconds", "restarts", "checkpoint"}``;
            ``seconds``: from noticing the failure to resuming).
    """

    wait_seconds: float = 300.0
    max_recoveries: int = 10
    restart: Callable[[DriverError], None] | None = None
    report: Callable[[dict], None] | None = None

    @staticmethod
    def recoverable(exc: DriverError) -> bool:
        return exc.code in RECOVERABLE_CODES and not isinstance(exc, TrainingDiverged)

    def recover(self, driver: Driver, store: ModelStore, exc: DriverError, *, run: str, step: int, start: int,
                restarts: int) -> tuple[int, int | None]:
        """Bring every partition back to the latest committed checkpoint after ``exc`` at ``step``.

        Returns:
            ``(step to resume at, that checkpoint's sequence or None)``; the step is the checkpoint's
            ``run_step`` when it belongs to ``run``, else ``start`` (where this attempt began).
        Raises:
            DriverError: the partitions did not all come back within ``wait_seconds``, or a reload failed.
        """
        noticed = time.monotonic()
        log.warning("partition failure at step %d (%s); waiting up to %.0f s for every partition to serve, "
                    "then reloading the last committed checkpoint", step + 1, exc, self.wait_seconds)
        if self.report:
            self.report({"event": "unavailable", "error": str(exc), "step": step, "restarts": restarts,
                         "wait_seconds": self.wait_seconds})
        if self.restart:
            self.restart(exc)
        try:
            driver.wait_ready(timeout=self.wait_seconds)
        except DriverError as waited:
            raise DriverError(f"{waited} (after: {exc})", grpc.StatusCode.UNAVAILABLE) from exc
        driver.reload()
        # A restarted server holds no training session: end ours everywhere, so the next step
        # opens a fresh one on every partition.
        driver.close_training()
        latest = store.latest()
        resume = start
        if latest is not None and latest.meta.get("run_id") == run:
            resume = int(latest.meta.get("run_step", start))
        seconds = time.monotonic() - noticed
        log.warning("resumed at step %d from checkpoint %s after %.2f s; %d steps to redo",
                    resume, latest.sequence if latest else None, seconds, step - resume)
        if self.report:
            self.report({"event": "resumed", "step": resume, "lost_steps": step - resume, "seconds": seconds,
                         "restarts": restarts, "checkpoint": latest.sequence if latest else None})
        return resume, latest.sequence if latest else None


def optimizer_of(training: TrainingSpec) -> OptimizerConfig:
    if training.optimizer == "adam":
        return OptimizerConfig("adam", training.learning_rate)
    return OptimizerConfig("sgd", training.learning_rate, momentum=training.momentum)


def train(driver: Driver, data: Dataset, training: TrainingSpec, store: ModelStore, model: ModelSpec,
          progress: Callable[[dict], None] | None = None, show_bar: bool = True, *,
          recovery: Recovery | None = None, rescales: Sequence[Rescale] = ()) -> TrainResult:
    """Train on ``data`` per ``training``, checkpointing into ``store``; resume if possible.

    A checkpoint of the same ``runId`` resumes the run at its optimizer step (the servers
    are told to reload it first, so every partition starts from the same committed
    state). Another run's checkpoint is the starting model of a new run. Batches
    are a permutation per epoch drawn from ``[training.seed, epoch]``, so a resumed
    run sees the same batches an uninterrupted one would.

    Args:
        progress: called after each checkpoint with ``{"run", "epoch", "step", "loss", "checkpoint"}``
            (``step``: optimizer steps of the run so far; ``checkpoint``: the committed sequence).
        recovery: how to survive a partition that fails mid-run (see :class:`Recovery`); None: the
            first failure ends the run (raised).
        rescales: repartitionings at step boundaries (see :class:`Rescale`); the steps after one
            run on the driver it returns.
    """
    from tqdm import tqdm

    optimizer = optimizer_of(training)
    n = len(data.x_train)
    per_epoch = math.ceil(n / training.batch_size)
    total = per_epoch * training.epochs
    # Every attempt starts from committed state, even without a checkpoint: an earlier attempt
    # that died before its first one may have left the servers partly (and unevenly) trained.
    driver.reload()
    latest = store.latest()
    start = 0
    if latest is not None and latest.meta.get("run_id") == training.run_id:
        start = min(int(latest.meta.get("run_step", 0)), total)
    resumed = start if start else None
    ckpt_sequence: int | None = latest.sequence if latest else None
    loss = float("nan")
    began = time.monotonic()
    bar = tqdm(total=total, initial=start, unit="step", disable=not show_bar, dynamic_ncols=True,
               desc=f"training {training.run_id}")
    order: np.ndarray | None = None
    first, step, restarts = start, start, 0
    try:
        while True:  # one attempt of the remaining steps per pass; a recovered failure starts another
            try:
                for step in range(first, total):
                    epoch, i = divmod(step, per_epoch)
                    if i == 0 or order is None:
                        order = np.random.default_rng([training.seed, epoch]).permutation(n)
                    idx = order[i * training.batch_size:(i + 1) * training.batch_size]
                    _, loss, _ = driver.step(data.x_train[idx], data.y_train[idx], optimizer)
                    if not math.isfinite(loss):
                        raise TrainingDiverged(f"training diverged: loss is {loss} at step {step + 1} (epoch {epoch + 1}); "
                                               f"the last committed checkpoint ({ckpt_sequence}) is intact — "
                                               "lower spec.training.learningRate")
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}", refresh=False)
                    bar.update(1)
                    done = step + 1
                    if (training.checkpoint_every and done % training.checkpoint_every == 0) or done % per_epoch == 0:
                        meta = {"run_id": training.run_id, "run_step": done, "epoch": done / per_epoch,
                                "loss": loss, "optimizer": asdict(optimizer)}
                        ckpt_sequence = driver.checkpoint(store, model, meta, run_id=training.run_id).sequence
                        store.prune(keep=KEEP_CHECKPOINTS)
                        store.prune_stale()
                        if progress:
                            progress({"run": training.run_id, "epoch": done // per_epoch, "step": done,
                                      "loss": loss, "checkpoint": ckpt_sequence})
                    for rescale in rescales:
                        if rescale.wanted(done):
                            latest = store.latest()
                            if latest is None or latest.meta.get("run_step") != done or \
                                    latest.meta.get("run_id") != training.run_id:
                                meta = {"run_id": training.run_id, "run_step": done, "epoch": done / per_epoch,
                                        "loss": loss, "optimizer": asdict(optimizer)}
                                ckpt_sequence = driver.checkpoint(store, model, meta, run_id=training.run_id).sequence
                            driver = rescale.apply(driver)
                            rescale.done = True
                break
            except DriverError as exc:
                if recovery is None or not recovery.recoverable(exc) or restarts >= recovery.max_recoveries:
                    raise
                restarts += 1
                first, ckpt_sequence = recovery.recover(driver, store, exc, run=training.run_id, step=step,
                                                        start=start, restarts=restarts)
                order = None
                bar.reset(total=total)
                bar.update(first)
    finally:
        bar.close()
    return TrainResult(total - start, training.epochs, float(loss), time.monotonic() - began, resumed, ckpt_sequence,
                       restarts)
