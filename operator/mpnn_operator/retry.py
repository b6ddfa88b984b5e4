"""When a reconcile cannot finish now: :class:`RetryLater`, the backoff, and :class:`Later`.

A reconcile never waits under its network's lock for the cluster to catch up
(a volume still being deleted, a name still held by an object the garbage
collector is removing). It records what it can, raises :class:`RetryLater` and
returns the lock. The kopf handlers of the NeuralNetwork turn that into kopf's
own retry (``kopf.TemporaryError`` with a delay); a watch event, which kopf never
retries, hands the reconcile to :class:`Later`, which runs it again on a timer.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from typing import Callable, Hashable

from kubernetes.dynamic.exceptions import DynamicApiError

__all__ = ["RESYNC_SECONDS", "RETRY_SECONDS", "Later", "RetryLater", "backoff"]

log = logging.getLogger(__name__)

# Catches children changed or deleted behind the operator's back (it watches
# only NeuralNetworks, Partitions, StatefulSets, claims and Jobs); also the longest retry delay.
RESYNC_SECONDS = 300
# First retry delay after a failed reconcile (the Degraded condition says why); it doubles with
# every further failure, up to RESYNC_SECONDS.
RETRY_SECONDS = 10


class RetryLater(Exception):
    """The reconcile stopped at something that may clear without any change to the NeuralNetwork
    (a name held by an object being garbage-collected, a volume still being deleted): run it again.

    Args:
        message: what it waits for.
        delay: seconds before the first retry when it is expected to clear soon; None for
            :data:`RETRY_SECONDS`. Later retries double it (see :func:`backoff`).
    """

    def __init__(self, message: str, delay: float | None = None):
        super().__init__(message)
        self.delay = delay


def backoff(retry: int, first: float | None = None) -> float:
    """Seconds before retry number ``retry`` (0-based): ``first`` (default :data:`RETRY_SECONDS`),
    doubling with every retry, at most :data:`RESYNC_SECONDS`."""
    base = RETRY_SECONDS if first is None else first
    return float(min(base * 2 ** min(retry, 16), RESYNC_SECONDS))


class Later:
    """Runs deferred reconciles again on timer threads, one pending timer per key (a network).

    While a key keeps deferring, its delays grow as :func:`backoff` says; a run that does
    not defer resets them. A run that fails with an API error is logged and not repeated:
    the NeuralNetwork's status says what failed, and its handlers and resync retry it.
    Each run sees the context variables of the call that deferred it: ``kopf.event``, which
    the reconciler posts Events through, finds kopf's event queue only there.

    Args:
        timer: makes a started-later callable, ``timer(delay, function)``, with ``start()``
            and ``cancel()`` (:class:`threading.Timer`; tests pass their own).
    """

    def __init__(self, timer: Callable[[float, Callable[[], None]], threading.Timer] | None = None):
        self._timer = timer or _daemon_timer
        self._pending: dict[Hashable, threading.Timer] = {}
        self._attempts: dict[Hashable, int] = {}
        self._guard = threading.Lock()

    def defer(self, key: Hashable, call: Callable[[], None], exc: RetryLater) -> float | None:
        """Run ``call`` again after the delay ``exc`` asks for; returns that delay, or None when a
        run of ``key`` is pending already (that run reconciles the latest state anyway)."""
        with self._guard:
            if key in self._pending:
                return None
            attempt = self._attempts.get(key, 0)
            self._attempts[key] = attempt + 1
            delay = backoff(attempt, exc.delay)
            context = contextvars.copy_context()
            timer = self._timer(delay, lambda: context.run(self._run, key, call))
            self._pending[key] = timer
        timer.start()
        return delay

    def pending(self) -> list[Hashable]:
        """The keys with a run to come."""
        with self._guard:
            return list(self._pending)

    def cancel(self) -> None:
        """Drop every pending run (the operator stops)."""
        with self._guard:
            timers, self._pending = list(self._pending.values()), {}
            self._attempts.clear()
        for timer in timers:
            timer.cancel()

    def _run(self, key: Hashable, call: Callable[[], None]) -> None:
        with self._guard:
            self._pending.pop(key, None)
        try:
            call()
        except RetryLater as exc:
            log.info("reconcile deferred again: %s", exc)
            self.defer(key, call, exc)
            return
        except DynamicApiError as exc:
            log.warning("deferred reconcile failed (HTTP %s): %s", exc.status, exc.summary())
        except Exception:  # a timer thread has no caller to report to
            log.exception("deferred reconcile failed")
        with self._guard:
            self._attempts.pop(key, None)


def _daemon_timer(delay: float, function: Callable[[], None]) -> threading.Timer:
    timer = threading.Timer(delay, function)
    timer.daemon = True
    return timer
