"""The phases of ``status.training.rescale``: the checkpoint handshake of a rescale during a run
on Kubernetes, shared by the operator (``mpnn_operator.rescale``, which documents the protocol)
and the trainer (``partition_server.client.trainer.RescaleHandshake``)."""

from __future__ import annotations

__all__ = ["CHECKPOINTED", "COMPLETED", "PUBLISHED", "REQUESTED", "TIMED_OUT"]

# Operator: a new lookup table waits for the trainer's checkpoint at its next step boundary.
REQUESTED = "CheckpointRequested"
# Trainer: committed a checkpoint of its current step, ended its session; it steps no more until published.
CHECKPOINTED = "Checkpointed"
# Operator: the table named by lookupVersion is in force; the servers reload the latest checkpoint under it.
PUBLISHED = "Published"
# Operator: published without the trainer's answer, after the operator's --rescale-timeout.
TIMED_OUT = "TimedOut"
# Trainer: every partition serves the new table; training goes on from the checkpointed step.
COMPLETED = "Completed"
