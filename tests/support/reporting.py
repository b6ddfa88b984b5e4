"""A training run's status reports, as the trainer writes them, without a cluster."""

from __future__ import annotations

from typing import Any

from partition_server.client.trainer import TrainingReporter

__all__ = ["reports_of_a_run"]


def reports_of_a_run(run: str, *, failure: str = "partition 1 unavailable") -> list[dict[str, Any]]:
    """The status patches of one run that starts, reports epoch 2 / step 40, succeeds, then fails."""
    patches: list[dict[str, Any]] = []
    reporter = TrainingReporter(patches.append, run)
    reporter.started()
    reporter.progress(epoch=2, step=40, loss=0.25, checkpoint=5, accuracy=0.9)
    reporter.finished(accuracy=0.95, loss=0.2)
    reporter.failed(failure)
    return patches
