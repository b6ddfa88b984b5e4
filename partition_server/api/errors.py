"""Errors that name the offending field, shared by the manifest, distributor and lookup."""

from __future__ import annotations

from typing import Any

__all__ = ["ERROR_KEY", "PEER_LOST", "PEER_STREAMS", "TRAINING_SESSION", "WEIGHTS_CHANGED", "FieldError"]

# Machine-readable reasons of a failed mpnn.v1.Partition call: the trailing metadata entry
# ERROR_KEY: <reason> (see partition_server.serving.reasons, which sends them).
ERROR_KEY = "mpnn-error"
WEIGHTS_CHANGED = "weights-changed"
TRAINING_SESSION = "training-session"
PEER_STREAMS = "peer-streams"
PEER_LOST = "peer-lost"


class FieldError(ValueError):
    """Bad input. ``field`` is its path (``spec.distribution.counts``), ``value`` what was given."""

    def __init__(self, field: str, value: Any, message: str):
        self.field = field
        self.value = value
        self.message = message
        super().__init__(f"{field}: {message} (got {value!r})")
