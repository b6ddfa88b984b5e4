"""Dynamic batching of inference requests: small requests that arrive together share one pass.

The idea and its two knobs are Triton Inference Server's dynamic batcher
(``max_queue_delay_microseconds``, ``max_batch_size``): a forward pass over the partitions costs
about the same for 1 row as for 64 (its time goes to messages, not to arithmetic), so requests
that arrive within ``max_delay`` of each other are concatenated into one pass and the outputs
are split back.

No thread of its own: the first waiting request *leads*. It waits up to ``max_delay`` (less when
a member's deadline is sooner) for more rows, stops early at ``max_rows``, runs the pass for
everyone it took, and hands the next waiting request the lead. The requests waiting here are
bounded by the callers' own pools (the gRPC and REST handler threads), and so are the rows.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

import numpy as np

__all__ = ["DynamicBatcher"]


class _Request:
    __slots__ = ("x", "deadline", "outputs", "error", "done")

    def __init__(self, x: np.ndarray, deadline: float):
        self.x, self.deadline = x, deadline
        self.outputs: np.ndarray | None = None
        self.error: BaseException | None = None
        self.done = False


class DynamicBatcher:
    """Runs requests' rows in shared passes.

    Args:
        run: one pass: ``run(x [rows, inputs] float32, deadline)`` returns ``[rows, outputs]``;
            ``deadline`` is ``time.monotonic()`` seconds. What it raises, every request of the
            batch raises.
        max_delay: longest wait for more requests, seconds.
        max_rows: most rows in one pass; a request with as many rows or more runs alone.

    Attributes:
        passes: passes run so far; ``rows``: rows they carried (metrics and tests).
    """

    def __init__(self, run: Callable[[np.ndarray, float], np.ndarray], *, max_delay: float, max_rows: int):
        if max_delay <= 0 or max_rows < 1:
            raise ValueError(f"max_delay must be positive and max_rows at least 1, got {max_delay}, {max_rows}")
        self._run, self.max_delay, self.max_rows = run, max_delay, max_rows
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._queued_rows = 0
        self._leader: _Request | None = None
        self.passes = 0
        self.rows = 0

    def submit(self, x: np.ndarray, deadline: float) -> np.ndarray:
        """Outputs ``[len(x), outputs]`` for ``x`` ``[rows, inputs]`` float32, computed in a pass
        shared with the requests that arrive within ``max_delay``. Blocks.

        Args:
            deadline: ``time.monotonic()`` seconds by which this request needs its answer; the
                pass it joins ends by the earliest deadline of its requests.

        Raises:
            whatever ``run`` raised for this request's pass.
        """
        if len(x) >= self.max_rows:
            return self._pass([_Request(x, deadline)])
        request = _Request(x, deadline)
        with self._cond:
            self._queue.append(request)
            self._queued_rows += len(x)
            if self._leader is None:
                self._leader = request
            self._cond.notify_all()  # a leader waiting for rows may have enough now
            while not request.done and self._leader is not request:
                self._cond.wait()
            if request.done:
                return self._result(request)
            batch = self._collect(request)
        try:
            self._pass(batch)
        finally:
            with self._cond:
                self._cond.notify_all()  # the members of the batch are done
        return self._result(request)

    def _collect(self, leader: _Request) -> list[_Request]:
        """As the leader (holding the lock): wait for rows, take a batch, pass the lead on."""
        end = min(time.monotonic() + self.max_delay, leader.deadline)
        while self._queued_rows < self.max_rows:
            remaining = min(end, min(r.deadline for r in self._queue)) - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
        batch, rows = [], 0
        while self._queue and rows + len(self._queue[0].x) <= self.max_rows:
            taken = self._queue.popleft()
            batch.append(taken)
            rows += len(taken.x)
        self._queued_rows -= rows
        # The lead goes to the oldest request still waiting; it starts its own wait now.
        self._leader = self._queue[0] if self._queue else None
        self._cond.notify_all()
        return batch

    def _pass(self, batch: list[_Request]) -> np.ndarray:
        """Run one pass for ``batch`` and give every request its rows (or the error)."""
        x = batch[0].x if len(batch) == 1 else np.concatenate([r.x for r in batch])
        try:
            outputs = self._run(x, min(r.deadline for r in batch))
        except BaseException as exc:  # noqa: BLE001 - handed to every request of the batch
            for r in batch:
                r.error, r.done = exc, True
            raise
        at = 0
        for r in batch:
            r.outputs, r.done = outputs[at:at + len(r.x)], True
            at += len(r.x)
        with self._cond:
            self.passes += 1
            self.rows += len(x)
        return outputs

    @staticmethod
    def _result(request: _Request) -> np.ndarray:
        if request.error is not None:
            raise request.error
        assert request.outputs is not None
        return request.outputs
