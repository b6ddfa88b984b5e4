"""When an inference pass is run again, and after what pause: the serving side's one retry loop.

An entry point's forward pass can fail for three reasons worth another try:

- a partition was busy (RESOURCE_EXHAUSTED: it runs as many passes as its pool allows): retried
  up to :attr:`RetryPolicy.busy_retries` times, after an exponential pause with jitter;
- a partition no longer keeps the weights version the pass computes with (ABORTED with the
  ``weights-changed`` reason, see ``reasons``): run again with the entry point's current
  version, up to :attr:`RetryPolicy.version_retries` times, the first at once;
- a peer's stream broke while the pass ran, so messages may be lost (ABORTED with the
  ``peer-lost`` reason): run again once (:attr:`RetryPolicy.lost_retries`), at once: the
  stream is reopened for the new pass, and a peer that is down fails it UNAVAILABLE.

Nothing is retried past the pass's deadline. Everything else fails at once.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable, TypeVar

import grpc

from partition_server.serving import reasons

__all__ = ["Retry", "RetryPolicy", "backoff", "retry_kind", "run_with_retries"]

T = TypeVar("T")


class Retry(Enum):
    """Why a failed pass may be run again."""

    BUSY = "busy"
    WEIGHTS_CHANGED = "weights-changed"
    PEER_LOST = "peer-lost"


def retry_kind(code: grpc.StatusCode | None, exc: BaseException) -> Retry | None:
    """What kind of retry the failure ``exc`` with status ``code`` allows, or None.

    The weights case is recognised by the ``mpnn-error`` trailing metadata of the call behind
    ``exc`` (:func:`reasons.reason_of`), never by the message text.
    """
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Retry.BUSY
    if code == grpc.StatusCode.ABORTED and reasons.reason_of(exc) == reasons.WEIGHTS_CHANGED:
        return Retry.WEIGHTS_CHANGED
    if code == grpc.StatusCode.ABORTED and reasons.reason_of(exc) == reasons.PEER_LOST:
        return Retry.PEER_LOST
    return None


def backoff(attempt: int, *, base: float, cap: float) -> float:
    """Seconds before retry ``attempt`` (0-based): ``min(cap, base * 2**attempt)``, times a jitter
    factor drawn uniformly from [0.5, 1.5) so that callers refused together do not return together."""
    return min(cap, base * 2 ** attempt) * random.uniform(0.5, 1.5)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and after what pause a failed pass is run again.

    Attributes:
        busy_retries: retries of a pass refused by a busy partition.
        pause: seconds before the first busy retry; doubles up to ``max_pause``, with jitter.
        max_pause: longest pause between busy retries, seconds.
        version_retries: runs again of a pass whose weights version a partition dropped; the
            first at once, then after ``pause`` times the number of earlier ones (jittered).
        lost_retries: runs again, at once, of a pass whose peer stream broke (``peer-lost``).
    """

    busy_retries: int = 6
    pause: float = 0.05
    max_pause: float = 1.0
    version_retries: int = 2
    lost_retries: int = 1

    def pause_before(self, kind: Retry | None, attempt: int) -> float | None:
        """Seconds to wait before retry ``attempt`` (0-based) of ``kind``; None: do not retry."""
        if kind is Retry.BUSY and attempt < self.busy_retries:
            return backoff(attempt, base=self.pause, cap=self.max_pause)
        if kind is Retry.WEIGHTS_CHANGED and attempt < self.version_retries:
            return attempt * self.pause * random.uniform(0.5, 1.5)
        if kind is Retry.PEER_LOST and attempt < self.lost_retries:
            return 0.0
        return None


def run_with_retries(call: Callable[[], T], *, policy: RetryPolicy, deadline: float,
                     classify: Callable[[Exception], Retry | None],
                     retryable: type[Exception] = Exception) -> T:
    """``call()``, run again after a ``retryable`` failure as ``policy`` allows for its kind.

    Args:
        call: the attempt; its exceptions of type ``retryable`` are classified.
        policy: how often and after what pause.
        deadline: ``time.monotonic()`` value; no retry starts (or is waited for) past it.
        classify: the kind of retry an exception allows, or None.
        retryable: the exception type that is classified; others propagate at once.

    Returns:
        What ``call`` returned.
    Raises:
        The last failure, when it is not retried (kind None, retries used up, or the pause
        would end past ``deadline``).
    """
    attempts: dict[Retry, int] = {}
    while True:
        try:
            return call()
        except retryable as exc:
            kind = classify(exc)
            pause = policy.pause_before(kind, attempts.get(kind, 0)) if kind is not None else None
            if pause is None or time.monotonic() + pause >= deadline:
                raise
            attempts[kind] = attempts.get(kind, 0) + 1
            time.sleep(pause)
