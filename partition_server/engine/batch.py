"""Batch validation: a batch is checked before any work or traffic.

Every partition of a pass validates the same batch the same way, so a bad batch fails on all
of them with the same message, before a single message is sent.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["validate_batch"]

F32 = np.float32


def validate_batch(inputs: int, classes: int, x: Any, y: Any = None) -> int:
    """Check a batch before any work or traffic.

    Args:
        inputs: features per example.
        classes: units of the last layer; labels must be in ``[0, classes)``.
        x: ``[batch, inputs]`` float32 ndarray.
        y: ``[batch]`` int64 ndarray of class indices, or None (inference).

    Returns:
        the batch size.
    Raises:
        ValueError: naming the field (``x`` or ``y``), the expected and the actual shape/dtype.
    """
    if not isinstance(x, np.ndarray):
        raise ValueError(f"x: expected a float32 ndarray of shape [batch, {inputs}], got {type(x).__name__}")
    if x.dtype != F32 or x.ndim != 2 or x.shape[1] != inputs or x.shape[0] < 1:
        raise ValueError(f"x: expected float32 of shape [batch>=1, {inputs}], "
                         f"got {x.dtype} of shape {list(x.shape)}")
    batch = x.shape[0]
    if y is None:
        return batch
    if not isinstance(y, np.ndarray):
        raise ValueError(f"y: expected an int64 ndarray of shape [{batch}], got {type(y).__name__}")
    if y.dtype != np.int64 or y.shape != (batch,):
        raise ValueError(f"y: expected int64 of shape [{batch}], got {y.dtype} of shape {list(y.shape)}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"y: labels must be in [0, {classes}), got {bad}")
    return batch
