"""Versioned parameters: one partition's rows and optimizer state, by optimizer step.

The parameters after ``n`` optimizer updates are version ``n``. Every partition counts every
training step, including steps where it owns nothing to update, and a checkpoint restores the
counter, so one number names the same update on every partition. A forward pass names the
version its entry point saw, and every partition computes with that version: the last few
versions are kept (old arrays are referenced, not copied), so a pass that overlaps a training
step never mixes rows from before and after an update.

Arrays held here are read-only and replaced, never modified in place: a snapshot stays valid
after later updates.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Mapping

import numpy as np

__all__ = [
    "Params",
    "VersionedParameters",
    "WEIGHTS_CHANGED",
    "WeightsChanged",
    "check_params",
    "check_state",
    "frozen",
]

F32 = np.float32

Params = dict[int, tuple[np.ndarray, np.ndarray]]
"""``{layer: (W_rows [n_local, in_k], b_rows [n_local])}``, float32, rows in range order."""

WEIGHTS_CHANGED = "weights changed during the pass; retry"

# Every optimizer buffer name a checkpoint may hold, whichever optimizer wrote it.
_KNOWN_BUFFERS = frozenset(f"{n}.{s}" for n in ("weight", "bias") for s in ("momentum", "adam_m", "adam_v"))


class WeightsChanged(RuntimeError):
    """A forward pass asked for a parameter version this partition cannot provide: it is no
    longer kept, or it is ahead of this partition and no training step is running that would
    reach it. The message contains ``WEIGHTS_CHANGED``; a new pass (with a newer version) may
    succeed."""


def frozen(arr: np.ndarray) -> np.ndarray:
    """Mark ``arr`` read-only and return it (the same array)."""
    arr.flags.writeable = False
    return arr


def _owned(arr: Any, adopt: bool) -> np.ndarray:
    """A read-only float32 C-contiguous array of ``arr``: a copy, or with ``adopt`` the array
    itself when it already is float32 and C-contiguous (then frozen in place)."""
    if adopt:
        return frozen(np.ascontiguousarray(arr, dtype=F32))
    return frozen(np.array(arr, dtype=F32, copy=True, order="C"))


def check_params(params: Mapping[int, tuple[Any, Any]], *, index: int,
                 shapes: Mapping[int, tuple[int, int]], adopt: bool = False) -> Params:
    """Validate and copy (or, with ``adopt``, take over) one partition's parameters.

    Args:
        params: ``{k: (W_rows, b_rows)}``; either may be None (reported as missing).
        index: the partition, for messages.
        shapes: ``{k: (n_local_k, in_k)}`` for exactly the layers the partition owns.
        adopt: take float32 C-contiguous arrays as they are (marked read-only in place; the
            caller must hold no other writeable reference) instead of copying them.

    Returns:
        ``{k: (W_rows [n_local_k, in_k], b_rows [n_local_k])}``: read-only float32 copies (or
        the adopted arrays), layers ascending.
    Raises:
        ValueError: extra or missing layers, a missing tensor, a wrong shape or a non-floating
            dtype; the message names the layer and tensor.
    """
    owned = set(shapes)
    extra = sorted(set(params) - owned)
    if extra:
        raise ValueError(f"params: partition {index} owns no neurons of layer(s) {extra}")
    missing = sorted(owned - set(params))
    if missing:
        raise ValueError(f"params: missing layer(s) {missing} owned by partition {index}")
    out = {}
    for k in sorted(params):
        n_local, fan_in = shapes[k]
        w, b = params[k]
        for name, arr, shape in (("weight", w, (n_local, fan_in)), ("bias", b, (n_local,))):
            if arr is None:
                raise ValueError(f"params[{k}].{name}: missing")
            arr = np.asarray(arr)
            if arr.shape != shape or not np.issubdtype(arr.dtype, np.floating):
                raise ValueError(f"params[{k}].{name}: expected float32 of shape {list(shape)}, "
                                 f"got {arr.dtype} of shape {list(arr.shape)}")
        out[k] = (_owned(w, adopt), _owned(b, adopt))
    return out


def check_state(tensors: Mapping[int, Mapping[str, np.ndarray]], params: Params, *,
                wanted: tuple[str, ...], adopt: bool = False) -> dict[int, dict[str, np.ndarray]]:
    """The optimizer buffers of a checkpoint's tensors, validated against ``params``.

    Args:
        tensors: ``{k: {"weight": ..., "bias": ..., "weight.momentum": ..., ...}}``.
        params: the checked parameters of the same layers (:func:`check_params`).
        wanted: the buffer suffixes the optimizer uses (``OptimizerConfig.buffer_names``);
            known buffers of another optimizer are ignored.
        adopt: take float32 C-contiguous arrays as they are instead of copying them.

    Returns:
        ``{k: {"weight.momentum": [n_local, in_k], ...}}``: read-only float32 copies.
    Raises:
        ValueError: an unknown tensor name or a wrong shape; the message names layer and tensor.
    """
    state: dict[int, dict[str, np.ndarray]] = {}
    for k, named in tensors.items():
        state[k] = {}
        for name, arr in named.items():
            if name in ("weight", "bias"):
                continue
            if name not in _KNOWN_BUFFERS:
                raise ValueError(f"state[{k}].{name}: unknown tensor")
            if name.split(".", 1)[1] not in wanted:
                continue
            ref = params[k][0] if name.startswith("weight") else params[k][1]
            arr = np.asarray(arr)
            if arr.shape != ref.shape:
                raise ValueError(f"state[{k}].{name}: expected shape {list(ref.shape)}, got {list(arr.shape)}")
            state[k][name] = _owned(arr, adopt)
    return state


class VersionedParameters:
    """The current parameters, optimizer state and step of one partition, and recent versions.

    Args:
        params: the checked parameters of version 0 (:func:`check_params`).
        index: the partition, for messages.
        keep: how many versions :meth:`at` can choose from (the latest and the ones before
            it), ``>= 1``.

    Attributes:
        params: the latest parameters (:data:`Params`); read without the lock, it is always a
            complete version (the attribute is replaced, not modified).
        opt_state: ``{k: {"weight.momentum": ..., ...}}`` of the latest version.
        step: the latest version: optimizer updates applied so far.
        changed: condition (over a re-entrant lock) notified whenever the state changes or a
            training step ends; hold it to read ``params``, ``opt_state`` and ``step`` together.
    """

    def __init__(self, params: Params, *, index: int, keep: int):
        self.index = index
        self.params = params
        self.opt_state: dict[int, dict[str, np.ndarray]] = {k: {} for k in params}
        self.step = 0
        self._keep = keep
        self._history: OrderedDict[int, Params] = OrderedDict({0: params})
        self.changed = threading.Condition(threading.RLock())

    def at(self, version: int | None, deadline: float, *, owns_rows: bool,
           training: Callable[[], bool]) -> Params:
        """The parameters of ``version`` (None: the latest).

        Args:
            version: optimizer step, or None.
            deadline: ``time.monotonic()`` value until which a version ahead may be waited for.
            owns_rows: False when the partition owns no rows: any version is the latest.
            training: whether a training step is running now (one that may reach ``version``).

        Raises:
            WeightsChanged: ``version`` is no longer kept, or is ahead and ``training()`` is false.
            TimeoutError: ``version`` is ahead and was not reached by ``deadline``.
        """
        with self.changed:
            if version is None or not owns_rows:  # owning nothing, no version matters
                return self.params
            while True:
                params = self._history.get(version)
                if params is not None:
                    return params
                if version <= self.step:
                    raise WeightsChanged(f"partition {self.index}: {WEIGHTS_CHANGED} (the pass computes with "
                                         f"optimizer step {version}; this partition is at step {self.step} "
                                         f"and keeps steps {min(self._history)}..{self.step})")
                if not training():
                    raise WeightsChanged(f"partition {self.index}: {WEIGHTS_CHANGED} (the pass computes with "
                                         f"optimizer step {version}; this partition is at step {self.step} "
                                         f"and no training step is running)")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"partition {self.index}: optimizer step {version} was not applied "
                                       f"in time (this partition is at step {self.step})")
                self.changed.wait(min(remaining, 60.0))

    def commit(self, params: Params, opt_state: dict[int, dict[str, np.ndarray]], step: int) -> None:
        """Make ``(params, opt_state)`` version ``step`` (one more than the latest) and the latest;
        forget versions beyond ``keep``; wake waiters."""
        with self.changed:
            self.params, self.opt_state, self.step = params, opt_state, step
            self._history[step] = params
            while len(self._history) > self._keep:
                self._history.popitem(last=False)
            self.changed.notify_all()

    def replace(self, params: Params, opt_state: dict[int, dict[str, np.ndarray]], step: int) -> None:
        """Replace everything (e.g. from a checkpoint): ``step`` becomes the only version kept."""
        with self.changed:
            self.params, self.opt_state, self.step = params, opt_state, step
            self._history = OrderedDict({step: params})
            self.changed.notify_all()

    def snapshot(self) -> tuple[Params, dict[int, dict[str, np.ndarray]], int]:
        """``(params, opt_state, step)`` of one version, read together."""
        with self.changed:
            return self.params, self.opt_state, self.step

    def wake(self) -> None:
        """Wake passes waiting in :meth:`at` (a training step ended, perhaps without an update)."""
        with self.changed:
            self.changed.notify_all()
