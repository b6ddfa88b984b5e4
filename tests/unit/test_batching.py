"""The dynamic batcher (``serving.batching``): shared passes, row bounds, errors and deadlines."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from partition_server.serving.batching import DynamicBatcher


class Recorder:
    """A pass that doubles its rows after ``delay`` seconds, recording each batch and deadline."""

    def __init__(self, delay: float = 0.0, error: Exception | None = None):
        self.delay, self.error = delay, error
        self.batches: list[np.ndarray] = []
        self.deadlines: list[float] = []
        self._lock = threading.Lock()

    def __call__(self, x: np.ndarray, deadline: float) -> np.ndarray:
        assert deadline > time.monotonic(), "a pass was started with no time left"
        with self._lock:
            self.batches.append(x.copy())
            self.deadlines.append(deadline)
        time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return x * 2


def submit_together(batcher: DynamicBatcher, xs: list[np.ndarray], deadline: float) -> list:
    """Submit every ``xs[i]`` from its own thread at once; each thread's result or exception."""
    results: list = [None] * len(xs)
    start = threading.Barrier(len(xs))

    def one(i: int) -> None:
        start.wait()
        try:
            results[i] = batcher.submit(xs[i], deadline)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    return results


def rows(n: int, width: int = 3) -> list[np.ndarray]:
    return [np.full((1, width), i, dtype=np.float32) for i in range(n)]


def test_requests_that_arrive_together_share_a_pass_and_get_their_own_rows():
    run = Recorder()
    batcher = DynamicBatcher(run, max_delay=0.5, max_rows=64)
    xs = rows(8)
    results = submit_together(batcher, xs, time.monotonic() + 30)
    for x, got in zip(xs, results):
        np.testing.assert_array_equal(got, x * 2)
    assert len(run.batches) < len(xs), [len(b) for b in run.batches]
    assert sum(len(b) for b in run.batches) == len(xs) == batcher.rows
    assert batcher.passes == len(run.batches)


def test_a_pass_carries_at_most_max_rows():
    run = Recorder(delay=0.01)
    batcher = DynamicBatcher(run, max_delay=0.3, max_rows=3)
    xs = rows(10)
    results = submit_together(batcher, xs, time.monotonic() + 30)
    for x, got in zip(xs, results):
        np.testing.assert_array_equal(got, x * 2)
    assert max(len(b) for b in run.batches) <= 3
    assert sorted(float(r[0]) for b in run.batches for r in b) == list(range(10))


def test_a_request_of_max_rows_or_more_runs_alone_without_waiting():
    run = Recorder()
    batcher = DynamicBatcher(run, max_delay=30.0, max_rows=4)
    x = np.ones((4, 2), dtype=np.float32)
    np.testing.assert_array_equal(batcher.submit(x, time.monotonic() + 60), x * 2)
    assert [len(b) for b in run.batches] == [4]


def test_the_error_of_a_shared_pass_is_every_members_error():
    run = Recorder(error=RuntimeError("partition 1 is down"))
    batcher = DynamicBatcher(run, max_delay=0.3, max_rows=64)
    results = submit_together(batcher, rows(5), time.monotonic() + 30)
    assert all(isinstance(r, RuntimeError) and "partition 1 is down" in str(r) for r in results), results
    # The batcher is not stuck: a later request is served.
    run.error = None
    np.testing.assert_array_equal(batcher.submit(rows(1)[0], time.monotonic() + 30), rows(1)[0] * 2)


def test_a_short_deadline_cuts_the_wait_but_leaves_the_pass_time():
    run = Recorder()
    batcher = DynamicBatcher(run, max_delay=20.0, max_rows=64)
    deadline = time.monotonic() + 0.4
    began = time.monotonic()
    np.testing.assert_array_equal(batcher.submit(rows(1)[0], deadline), rows(1)[0] * 2)
    assert time.monotonic() - began < 10  # not the 20 s delay
    assert run.deadlines == [deadline]  # and the pass started before it (Recorder checks)


def test_a_hasty_request_does_not_cut_the_pass_of_the_others():
    """A request with a short deadline joins one with a long one: the pass starts while the short
    one still has time, and runs until the long one's deadline."""
    run = Recorder()
    batcher = DynamicBatcher(run, max_delay=5.0, max_rows=64)
    long_deadline = time.monotonic() + 60
    results: list = []
    first = threading.Thread(target=lambda: results.append(batcher.submit(rows(1)[0], long_deadline)))
    first.start()
    while not batcher._queue:  # the long one waits for company
        time.sleep(0.001)
    short = np.full((1, 3), 7, dtype=np.float32)
    np.testing.assert_array_equal(batcher.submit(short, time.monotonic() + 0.3), short * 2)
    first.join(10)
    np.testing.assert_array_equal(results[0], rows(1)[0] * 2)
    assert [len(b) for b in run.batches] == [2] and run.deadlines == [long_deadline]


def test_a_request_whose_deadline_passed_while_waiting_fails_alone():
    run = Recorder()
    batcher = DynamicBatcher(run, max_delay=0.3, max_rows=64)
    results: list = []
    first = threading.Thread(target=lambda: results.append(batcher.submit(rows(1)[0], time.monotonic() + 30)))
    first.start()
    while not batcher._queue:
        time.sleep(0.001)
    with pytest.raises(TimeoutError, match="deadline passed"):
        batcher.submit(rows(2)[1], time.monotonic() - 1)
    first.join(10)
    np.testing.assert_array_equal(results[0], rows(1)[0] * 2)
    assert [len(b) for b in run.batches] == [1]


def test_a_batch_that_cannot_be_built_fails_every_member_and_hangs_none():
    """Rows of different widths cannot be concatenated: every member gets the error."""
    run = Recorder()
    batcher = DynamicBatcher(run, max_delay=0.3, max_rows=64)
    xs = [np.zeros((1, 3), np.float32), np.zeros((1, 4), np.float32), np.zeros((1, 3), np.float32)]
    results = submit_together(batcher, xs, time.monotonic() + 30)
    assert all(isinstance(r, ValueError) for r in results), results
    assert not run.batches


@pytest.mark.parametrize("delay, rows_", [(0, 4), (-1.0, 4), (0.1, 0)])
def test_bad_settings_are_refused(delay, rows_):
    with pytest.raises(ValueError, match="max_delay"):
        DynamicBatcher(Recorder(), max_delay=delay, max_rows=rows_)
