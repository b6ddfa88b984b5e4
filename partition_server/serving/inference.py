"""The coordinated forward pass behind the Open Inference Protocol, for one partition server.

Every partition server answers the protocol (KServe "Predict Protocol - Version 2", which
Triton Inference Server implements) for one model, the whole network: any partition is an
entry point. The server that receives an inference request runs a forward pass on *all*
partitions, itself included: it calls ``RunPass(train=false)`` on each through the addresses
of the lookup table it currently serves, with a driver built once per table version
(``drivers.DriverCache``), so requests follow lookup reloads.

:class:`ModelInference` adds readiness and the pass to the protocol model
(``protocol.ModelProtocol``: metadata, input checks); ``inference_grpc`` and ``rest`` are its
gRPC and REST bindings.

Errors (:class:`~partition_server.serving.protocol.InferenceError`, gRPC status / HTTP status):
UNAVAILABLE / 503 while this server has no model loaded, the partitions do not agree on the
lookup table, a partition cannot be reached, or too many requests are in flight;
DEADLINE_EXCEEDED / 504 when the pass outlives the deadline; INVALID_ARGUMENT / 400 when a
partition rejects the batch; INTERNAL / 500 otherwise.

Load: a pass holds a thread of every partition's gRPC pool for its ``RunPass``, so an entry
point runs at most ``pass_limit // P`` passes at once (``pass_limit``: the inference passes a
partition runs at once, see ``limits.pass_slots``; at least 1, at most ``max_inflight``), and
further requests wait for a slot within their deadline. A partition refuses a pass beyond its
limit with RESOURCE_EXHAUSTED (possible when other clients also send passes); the entry point
retries such a pass a few times with a growing pause (``retry``), then answers UNAVAILABLE / 503.

Dynamic batching (``spec.server.dynamicBatching``, off by default): requests smaller than its
``maxBatchSize`` that arrive within ``maxDelayMicroseconds`` of each other run as one pass
(:mod:`.batching`); each gets its own rows of the outputs, or the pass's error.

Weights: a pass may overlap a training step. The entry point sends the version of its own
parameters (its optimizer step count) with every ``RunPass``, and every partition computes with
that version, so no output mixes rows from before and after an update. When a partition no
longer keeps that version (ABORTED with the ``weights-changed`` reason, see ``reasons``), the
entry point runs the pass again with its current version, up to twice.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import grpc
import numpy as np

from partition_server.api.lookup import LookupTable
from partition_server.api.manifest import MAX_BATCH_SIZE, DynamicBatching, ModelSpec
from partition_server.api.peer_auth import PeerCredentials
from partition_server.client.driver import Driver, DriverError
from partition_server.serving.batching import DynamicBatcher
from partition_server.serving.drivers import DriverCache, PassSlots
from partition_server.serving.protocol import InferenceError, ModelProtocol
from partition_server.serving.retry import RetryPolicy, retry_kind, run_with_retries

__all__ = ["ModelInference"]

log = logging.getLogger("mpnn.inference")

# What a partition's failed RunPass means to the client of the whole pass.
_DRIVER_CODES = {grpc.StatusCode.FAILED_PRECONDITION: grpc.StatusCode.UNAVAILABLE,  # lookup versions differ
                 grpc.StatusCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
                 grpc.StatusCode.ABORTED: grpc.StatusCode.UNAVAILABLE,               # an Exchange failed
                 grpc.StatusCode.CANCELLED: grpc.StatusCode.UNAVAILABLE,
                 grpc.StatusCode.RESOURCE_EXHAUSTED: grpc.StatusCode.UNAVAILABLE,     # a partition is busy
                 grpc.StatusCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
                 grpc.StatusCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT}


class ModelInference(ModelProtocol):
    """The protocol's model for one partition server: metadata, readiness and the coordinated pass.

    Args:
        name: the network's name, which is the model name.
        model: its shape.
        table: returns the lookup table this server serves now, or None before one is loaded.
        weights_version: returns the version of this server's parameters (its optimizer step
            count), sent with every ``RunPass`` of a pass; None sends none (each partition's latest).
        timeout: longest forward pass, seconds, when the request sets no shorter deadline.
        ready_timeout: deadline of each partition's ``Status`` call in :meth:`ready`, seconds.
        max_inflight: passes this entry point runs at once; more wait for a slot until their deadline.
            Each pass holds a thread of every partition's gRPC pool, so this keeps those pools
            from filling with passes that wait on each other.
        retry: when a failed pass is run again (busy partition, weights version dropped).
        credentials: sign the calls to the partitions' peer ports.
        channels: the channel to each partition's address (the server's ``Peers.channel``, whose
            channels carry its peer streams: a pass starts no thread there), else drivers open their own.
        batching: ``spec.server.dynamicBatching``: requests of fewer rows than its
            ``max_batch_size`` that arrive within its delay share one pass (:mod:`.batching`); None: off.

    Attributes:
        pass_limit: inference passes each partition runs at once (set by the partition server from
            its pool size), or None; with P partitions, this entry point runs at most
            ``max(1, min(max_inflight, pass_limit // P))`` passes at once, so that P entry points
            together stay within every partition's limit.
        retry: the :class:`~partition_server.serving.retry.RetryPolicy` in force.
        batcher: the :class:`~partition_server.serving.batching.DynamicBatcher` of ``batching``, or None.
        pass_observer: called with the rows of every pass started, retries and each chunk of
            ``BATCH`` rows included (the server's metrics set it), or None.
    """

    BATCH = MAX_BATCH_SIZE  # rows per pass (256); larger inputs go through in chunks

    def __init__(self, name: str, model: ModelSpec, table: Callable[[], LookupTable | None], *,
                 weights_version: Callable[[], int | None] = lambda: None,
                 timeout: float = 60.0, ready_timeout: float = 1.0, max_inflight: int = 4,
                 retry: RetryPolicy = RetryPolicy(), credentials: PeerCredentials | None = None,
                 channels: Callable[[str], grpc.Channel] | None = None, batching: DynamicBatching | None = None):
        super().__init__(name, model)
        self._table = table
        self._weights_version = weights_version
        self.timeout = timeout
        self.ready_timeout = ready_timeout
        self.max_inflight = max_inflight
        self.retry = retry
        self.pass_limit: int | None = None
        self.pass_observer: Callable[[int], None] | None = None
        self._slots = PassSlots()
        self._drivers = DriverCache(timeout, credentials, channels)
        self.batcher = None if batching is None else DynamicBatcher(
            self._run, max_delay=batching.max_delay_us / 1e6, max_rows=batching.max_batch_size)

    # ------------------------------------------------------------ readiness

    def ready(self) -> bool:
        """True when every partition has its weights loaded and serves this server's lookup version.

        Asks every partition's ``Status`` (itself included), each with ``ready_timeout``; blocks
        up to that long.
        """
        table = self._table()
        if table is None:
            return False
        try:
            replies = self._drivers.get(table).status(timeout=self.ready_timeout)
        except DriverError:
            return False
        return all(r.ready and r.lookup_version == table.version for r in replies)

    # ------------------------------------------------------------ inference

    def infer(self, x: np.ndarray, timeout: float | None = None) -> np.ndarray:
        """Forward pass of ``x`` ``[batch, inputs]`` float32 on all partitions. Blocks.

        Args:
            x: the batch, already checked by :meth:`input_array`.
            timeout: the request's remaining time, seconds; capped at ``self.timeout``.

        Returns:
            ``[batch, units_last]`` float32.

        Raises:
            InferenceError: UNAVAILABLE, DEADLINE_EXCEEDED, INVALID_ARGUMENT or INTERNAL, with
                the failing partition's message.
        """
        timeout = min(timeout, self.timeout) if timeout else self.timeout
        deadline = time.monotonic() + timeout
        if self._table() is None:
            raise InferenceError(grpc.StatusCode.UNAVAILABLE, f"model {self.name!r} is not loaded yet")
        if self.batcher is None:
            return self._run(x, deadline)
        try:
            return self.batcher.submit(x, deadline)
        except InferenceError as exc:  # one object for the whole batch: this request's own
            raise InferenceError(exc.code, exc.message) from exc
        except TimeoutError as exc:
            raise InferenceError(grpc.StatusCode.DEADLINE_EXCEEDED, f"model {self.name!r}: {exc}") from exc

    def _run(self, x: np.ndarray, deadline: float) -> np.ndarray:
        """One forward pass of ``x`` (in chunks of ``BATCH`` rows) that ends by ``deadline``
        (``time.monotonic()`` seconds), in a pass slot, with retries. Raises InferenceError."""
        timeout = deadline - time.monotonic()
        table = self._table()
        if table is None:
            raise InferenceError(grpc.StatusCode.UNAVAILABLE, f"model {self.name!r} is not loaded yet")
        if timeout <= 0:  # a batch's requests all waited past their deadlines
            raise InferenceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"model {self.name!r}: the deadline passed before the forward pass could start")
        if not self._slots.acquire(self.inflight_limit(table), timeout):
            raise InferenceError(grpc.StatusCode.UNAVAILABLE,
                                 f"model {self.name!r}: no free slot for a forward pass within {timeout:g} s")
        try:
            driver = self._drivers.get(table)
            return run_with_retries(lambda: self._pass(driver, x, deadline), policy=self.retry,
                                    deadline=deadline, retryable=DriverError,
                                    classify=lambda exc: retry_kind(exc.code, exc))
        except DriverError as exc:
            code = _DRIVER_CODES.get(exc.code, grpc.StatusCode.INTERNAL)
            raise InferenceError(code, f"model {self.name!r}: forward pass failed: {exc}") from exc
        finally:
            self._slots.release()

    def _pass(self, driver: Driver, x: np.ndarray, deadline: float) -> np.ndarray:
        """One forward pass of ``x`` on every partition, in chunks of ``BATCH`` rows, all with the
        weights version this server has now. Raises DriverError."""
        version = self._weights_version()
        outputs = []
        for start in range(0, len(x), self.BATCH):
            chunk = x[start:start + self.BATCH]
            if self.pass_observer is not None:
                self.pass_observer(len(chunk))
            outputs.append(driver.step(chunk, timeout=max(0.001, deadline - time.monotonic()),
                                       weights_version=version)[0])
        return np.concatenate(outputs) if outputs else self.empty_output()

    def inflight_limit(self, table: LookupTable) -> int:
        """Passes this entry point runs at once under ``table`` (see :attr:`pass_limit`)."""
        if self.pass_limit is None:
            return self.max_inflight
        return max(1, min(self.max_inflight, self.pass_limit // table.num_partitions))

    def close(self) -> None:
        """Close the drivers' channels; a later pass opens new ones."""
        self._drivers.close()
