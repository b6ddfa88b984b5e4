"""Dynamic batching of inference requests: small requests that arrive together share one pass.

The idea and its two knobs are Triton Inference Server's dynamic batcher
(``max_queue_delay_microseconds``, ``max_batch_size``): a forward pass over the partitions costs
about the same for 1 row as for 64 (its time goes to messages, not to arithmetic), so requests
that arrive within ``max_delay`` of each other are concatenated into one pass and the outputs
are split back.

No thread of its own: the oldest waiting request *leads*. It waits until ``max_delay`` after its
own arrival (sooner when a member would otherwise spend more than half of its time budget
waiting), stops early at ``max_rows``, runs the pass for everyone it took, and hands the lead to
the oldest request left. Every wakeup is aimed at one request (an event each). The requests
waiting here are bounded by the callers' own pools (the gRPC and REST handler threads), and so
are the rows.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

import numpy as np

__all__ = ["DynamicBatcher"]


class _Request:
    __slots__ = ("x", "deadline", "arrival", "outputs", "error", "done", "wake")

    def __init__(self, x: np.ndarray, deadline: float):
        self.x, self.deadline, self.arrival = x, deadline, time.monotonic()
        self.outputs: np.ndarray | None = None
        self.error: BaseException | None = None
        self.done = False
        self.wake = threading.Event()  # set (under the batcher's lock) when done or made the leader

    def latest_start(self) -> float:
        """When this request's pass must start at the latest: half its time budget spent waiting."""
        return self.arrival + (self.deadline - self.arrival) / 2


class DynamicBatcher:
    """Runs requests' rows in shared passes.

    Args:
        run: one pass: ``run(x [rows, inputs] float32, deadline)`` returns ``[rows, outputs]``;
            ``deadline`` is ``time.monotonic()`` seconds, the latest of its requests' (a pass is
            not cut short for the others by one hasty request). What it raises, every request of
            the batch raises: the same exception object in every waiting thread (callers that
            add to it wrap it in their own).
        max_delay: longest wait for more requests after a request arrives, seconds.
        max_rows: most rows in one pass; a request with as many rows or more runs alone.

    Attributes:
        passes: passes run so far; ``rows``: rows they carried (metrics and tests).
    """

    def __init__(self, run: Callable[[np.ndarray, float], np.ndarray], *, max_delay: float, max_rows: int):
        if max_delay <= 0 or max_rows < 1:
            raise ValueError(f"max_delay must be positive and max_rows at least 1, got {max_delay}, {max_rows}")
        self._run, self.max_delay, self.max_rows = run, max_delay, max_rows
        self._lock = threading.Lock()
        self._queue: deque[_Request] = deque()
        self._queued_rows = 0
        self._leader: _Request | None = None
        self.passes = 0
        self.rows = 0

    def submit(self, x: np.ndarray, deadline: float) -> np.ndarray:
        """Outputs ``[len(x), outputs]`` for ``x`` ``[rows, inputs]`` float32, computed in a pass
        shared with the requests that arrive within ``max_delay``. Blocks.

        Args:
            deadline: ``time.monotonic()`` seconds by which this request needs its answer.

        Raises:
            TimeoutError: the deadline passed before a pass could take the request.
            whatever ``run`` raised for this request's pass.
        """
        if len(x) >= self.max_rows:
            return self._pass([_Request(x, deadline)])[0]
        request = _Request(x, deadline)
        with self._lock:
            self._queue.append(request)
            self._queued_rows += len(x)
            if self._leader is None:
                self._make_leader(request)
            else:
                self._leader.wake.set()  # it decides again: enough rows now, or a sooner start
        while True:
            with self._lock:
                if request.done:
                    return self._result(request)
                request.wake.clear()
                if self._leader is request:
                    batch, wait = self._take_or_wait(request)
                    if batch is not None:
                        break
                else:
                    wait = None
            request.wake.wait(wait)
        self._pass(batch)  # raises the pass's error
        return self._result(request)

    def _make_leader(self, request: _Request) -> None:
        self._leader = request
        request.wake.set()

    def _take_or_wait(self, leader: _Request) -> tuple[list[_Request] | None, float]:
        """As the leader (holding the lock): a batch to run now, or how long to wait first.
        Requests whose deadline has passed leave the queue with TimeoutError; when a batch is
        taken, the lead passes to the oldest request left."""
        now = time.monotonic()
        for r in [r for r in self._queue if r.deadline <= now and r is not leader]:
            self._queue.remove(r)
            self._queued_rows -= len(r.x)
            self._finish(r, error=TimeoutError("the deadline passed while the request waited for a batch"))
        start = min(leader.arrival + self.max_delay, min(r.latest_start() for r in self._queue))
        if self._queued_rows < self.max_rows and now < start:
            return None, start - now
        batch, rows = [], 0
        while self._queue and rows + len(self._queue[0].x) <= self.max_rows:
            taken = self._queue.popleft()
            batch.append(taken)
            rows += len(taken.x)
        self._queued_rows -= rows
        self._leader = None
        if self._queue:
            self._make_leader(self._queue[0])
        return batch, 0.0

    def _pass(self, batch: list[_Request]) -> list[np.ndarray]:
        """Run one pass for ``batch``; every request gets its rows (returned in batch order) or the
        error, which is raised again here."""
        try:
            x = batch[0].x if len(batch) == 1 else np.concatenate([r.x for r in batch])
            outputs = self._run(x, max(r.deadline for r in batch))
            parts, at = [], 0
            for r in batch:
                parts.append(outputs[at:at + len(r.x)])
                at += len(r.x)
        except BaseException as exc:  # noqa: BLE001 - handed to every request of the batch
            with self._lock:
                for r in batch:
                    self._finish(r, error=exc)
            raise
        with self._lock:
            self.passes += 1
            self.rows += len(x)
            for r, part in zip(batch, parts):
                self._finish(r, outputs=part)
        return parts

    @staticmethod
    def _finish(request: _Request, *, outputs: np.ndarray | None = None, error: BaseException | None = None) -> None:
        """(Holding the lock.) Give ``request`` its answer and wake it."""
        request.outputs, request.error, request.done = outputs, error, True
        request.wake.set()

    @staticmethod
    def _result(request: _Request) -> np.ndarray:
        if request.error is not None:
            raise request.error
        assert request.outputs is not None
        return request.outputs
