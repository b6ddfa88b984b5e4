"""How a partition server divides its gRPC thread pool between passes and everything else.

Every RPC runs on one pool of ``workers`` threads, and a ``RunPass`` holds its thread for the
whole pass, waiting for the ``Exchange`` calls of its peers, which need threads of the same
pool. So inference passes are bounded below the pool size (:func:`pass_slots`): one beyond the
bound is refused at once (RESOURCE_EXHAUSTED) instead of waiting, and the threads left always
serve ``Exchange`` (and Status, health, Checkpoint and the inference API's own calls). Training
passes are not counted: an engine runs one at a time, and one thread is reserved for it.
"""

from __future__ import annotations

__all__ = ["default_workers", "max_infer_calls", "pass_slots"]


def max_infer_calls(workers: int) -> int:
    """``ModelInfer`` calls a partition's gRPC port handles at once (each waits for a whole pass):
    a quarter of ``workers``, at least 1."""
    return max(1, workers // 4)


def pass_slots(workers: int) -> int:
    """Inference ``RunPass`` calls a partition with ``workers`` pool threads runs at once.

    The pool also holds the inference API's ``ModelInfer`` calls (:func:`max_infer_calls`), one
    training pass, and a reserve (``max(2, workers // 8)``) for Exchange, Status and health.
    At least 1.
    """
    return max(1, workers - max_infer_calls(workers) - 1 - max(2, workers // 8))


def default_workers(partitions: int) -> int:
    """Pool size for ``partitions`` partitions: at least 32, and enough that every entry point
    plus one outside client can have a forward pass running at once (``pass_slots >= P + 1``)."""
    workers = 32
    while pass_slots(workers) < partitions + 1:
        workers += 8
    return workers
