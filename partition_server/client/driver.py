"""The training and inference driver: a client of every partition server.

The driver sends each batch to all partitions at once (one ``RunPass`` call each);
the partitions do the all-gather and reduce-scatter among themselves. It also
coordinates checkpoints: it reserves the next sequence on the shared volume,
every partition writes its shard for that reservation, then the driver writes
the commit record (``commit.json``), last. ``mpnn run`` uses it against local servers and a
training Job uses it against a cluster's servers, with the same code.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from partition_server.api.channels import CHANNEL_OPTIONS
from partition_server.api.errors import ERROR_KEY, PEER_LOST, TRAINING_SESSION
from partition_server.engine import OptimizerConfig
from partition_server.api.lookup import LookupTable
from partition_server.api.peer_auth import PeerCredentials
from partition_server.api.manifest import ModelSpec
from partition_server.api.protos import mpnn_pb2 as pb
from partition_server.api.protos import mpnn_pb2_grpc as pb_grpc
from partition_server.storage.store import Checkpoint, ModelStore
from partition_server.api.wire import from_tensor, to_tensor

log = logging.getLogger("mpnn.driver")

PEER_LOST_GRACE = 1.0  # seconds a knock-on "peer-lost" failure waits for the other partitions' own
ANSWER_GRACE = 5.0  # seconds past a call's deadline after which its silent channel counts as failed
KEEP_CHECKPOINTS = 3  # committed checkpoints kept on the volume; older ones are pruned


class DriverError(RuntimeError):
    """A partition failed a call; the message names the partition, its address and the status.

    ``code`` is that call's ``grpc.StatusCode`` (None when no call failed, e.g. a wait timed out);
    ``reason`` its ``mpnn-error`` trailing metadata (``api.errors``), or None.
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None, reason: str | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason


class TrainingDiverged(DriverError):
    """The loss became NaN or infinite; nothing of it was checkpointed."""


@dataclass
class Evaluation:
    """Held-out metrics: ``accuracy`` in [0, 1], mean cross-entropy ``loss`` (nats)."""

    accuracy: float
    loss: float
    samples: int


class Driver:
    """Talks to the P partition servers named by a lookup table.

    Args:
        table: the lookup table the servers serve (its version is sent with every call).
        timeout: deadline of each call, seconds.
        credentials: the network's peer key (and TLS files): every call is signed for the
            partition it goes to. None: unsigned plaintext calls, which servers refuse
            (UNAUTHENTICATED); for tests that prove it.
        channels: where to get the channel to an address, at every call, instead of opening
            the driver's own (a partition server's entry point passes its ``Peers.channel``: those
            channels carry long-lived peer streams, so gRPC keeps their polling thread and a
            ``.future()`` call on them starts no thread). Not closed by :meth:`close`.
    """

    def __init__(self, table: LookupTable, timeout: float = 60.0, *, credentials: PeerCredentials | None = None,
                 channels: Callable[[str], grpc.Channel] | None = None):
        self.table = table
        self.timeout = timeout
        self._shared = channels
        if channels is None:
            self._channels = [credentials.channel(a) if credentials is not None
                              else grpc.insecure_channel(a, options=CHANNEL_OPTIONS) for a in table.addresses]
            self._stubs = [pb_grpc.PartitionStub(c) for c in self._channels]
        # key -> (the channel it was built on, stub or multi-callable): rebuilt when the channel changes
        self._per_channel: dict[Any, tuple[grpc.Channel, Any]] = {}
        self._session: tuple[str, OptimizerConfig] | None = None

    def close(self) -> None:
        """End this driver's training session (if any) and close its channels (not shared ones)."""
        self.close_training()
        if self._shared is None:
            for channel in self._channels:
                channel.close()

    def _channel(self, i: int) -> grpc.Channel:
        return self._channels[i] if self._shared is None else self._shared(self.table.addresses[i])

    def _on_channel(self, key: Any, i: int, make: Callable[[grpc.Channel], Any]) -> Any:
        """``make(channel)`` on partition ``i``'s current channel, built once per channel (a
        shared channel's owner may replace it)."""
        channel = self._channel(i)
        cached = self._per_channel.get(key)
        if cached is None or cached[0] is not channel:
            cached = self._per_channel[key] = (channel, make(channel))
        return cached[1]

    def _stub(self, i: int) -> pb_grpc.PartitionStub:
        """Partition ``i``'s stub: on a shared channel, the current one (its owner may replace it)."""
        if self._shared is None:
            return self._stubs[i]
        return self._on_channel(i, i, pb_grpc.PartitionStub)

    def _multicallable(self, i: int, method: str, request):
        """Partition ``i``'s ``method``; for a request already serialized (``bytes``), one that
        sends those bytes as they are (a pass's request, the same for every partition, is
        serialized once, not P times)."""
        if not isinstance(request, bytes):
            return getattr(self._stub(i), method)
        return self._on_channel((i, method), i, lambda channel: channel.unary_unary(
            f"/mpnn.v1.Partition/{method}", request_serializer=None, response_deserializer=_REPLIES[method].FromString))

    def _start(self, i: int, method: str, request, timeout: float):
        """Start ``method`` on partition ``i`` (a future). A shared channel closed by its owner
        meanwhile (a lookup reload) is replaced once."""
        try:
            return self._multicallable(i, method, request).future(request, timeout=timeout)
        except ValueError:  # "Cannot invoke RPC on closed channel!"
            if self._shared is None:
                raise
            return self._multicallable(i, method, request).future(request, timeout=timeout)

    def __enter__(self) -> "Driver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing

    def _all(self, method: str, requests: Iterable, timeout: float | None = None) -> list:
        """Call ``method`` on every partition concurrently; replies in partition order.

        The first failure other than a deadline cancels the other calls (their partitions stop
        waiting for messages that will not come) and is raised as DriverError. A partition that
        failed because a peer's stream to it broke (``mpnn-error: peer-lost``) is a knock-on
        failure: the others get :data:`PEER_LOST_GRACE` seconds to report the cause (a dead peer
        is UNAVAILABLE), which is raised instead. A call that has not even failed
        :data:`ANSWER_GRACE` seconds after its deadline (its channel stopped delivering: gRPC's
        thread for it was lost, e.g. to a signal's exception while it started) fails as
        DEADLINE_EXCEEDED instead of blocking forever.
        """
        timeout = timeout or self.timeout
        calls = [self._start(i, method, req, timeout) for i, req in enumerate(requests)]
        finished: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i, call in enumerate(calls):
            call.add_done_callback(lambda _, i=i: finished.put(i))
        errors = []
        silent_after = time.monotonic() + timeout + ANSWER_GRACE
        knock_on_until = None  # a partition that lost a peer's messages: wait briefly for the peer's own failure
        for _ in calls:
            try:
                until = silent_after if knock_on_until is None else min(knock_on_until, silent_after)
                i = finished.get(timeout=max(0.0, until - time.monotonic()))
            except queue.Empty:
                if not errors:
                    silent = [i for i, call in enumerate(calls) if not call.done()]
                    for call in calls:
                        call.cancel()
                    raise DriverError(f"partition(s) {silent} {method}: no answer {timeout + ANSWER_GRACE:g} s after "
                                      f"the call started, not even a failure", grpc.StatusCode.DEADLINE_EXCEEDED)
                break
            exc = calls[i].exception()
            if exc is not None:
                errors.append((i, exc))
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue
                if _reason(exc) != PEER_LOST:
                    break
                if knock_on_until is None:
                    knock_on_until = time.monotonic() + PEER_LOST_GRACE
        if errors:
            for call in calls:
                call.cancel()
            # The root cause is usually the one that is not a knock-on deadline, and a partition that
            # cannot be reached at all (UNAVAILABLE) before its peers' failed exchanges with it.
            errors.sort(key=lambda e: (e[1].code() == grpc.StatusCode.DEADLINE_EXCEEDED,
                                       _reason(e[1]) == PEER_LOST,
                                       e[1].code() != grpc.StatusCode.UNAVAILABLE))
            i, exc = errors[0]
            raise DriverError(f"partition {i} ({self.table.addresses[i]}) {method}: "
                              f"{exc.code().name}: {exc.details()}", exc.code(), _reason(exc)) from exc
        return [call.result() for call in calls]

    def wait_ready(self, timeout: float = 60.0, alive: Callable[[], None] | None = None) -> None:
        """Block until every partition's health service answers SERVING.

        Args:
            alive: called between polls; raise from it to stop waiting (a crashed process).
        Raises:
            DriverError: not all SERVING within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        pending = set(range(self.table.num_partitions))
        while pending:
            if alive:
                alive()
            for i in sorted(pending):
                try:
                    reply = health_pb2_grpc.HealthStub(self._channel(i)).Check(
                        health_pb2.HealthCheckRequest(service="mpnn.v1.Partition"), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        pending.discard(i)
                except grpc.RpcError:
                    pass
            if pending and time.monotonic() > deadline:
                raise DriverError(f"partitions {sorted(pending)} not serving after {timeout:.0f} s")
            if pending:
                time.sleep(0.1)

    # ------------------------------------------------------------ training sessions

    def open_training(self, optimizer: OptimizerConfig, *, wait: float = 90.0) -> str:
        """Open a training session with ``optimizer`` on every partition (see
        ``serving.training``); training steps send its token. Returns the token.

        A session this driver already holds with the same optimizer is kept; one with another
        optimizer is closed first (the optimizer is fixed per session). While another session
        holds a partition (FAILED_PRECONDITION: e.g. that of a trainer that died, until it has
        been idle for the partition's lease, 30 s by default), tries again every second for up
        to ``wait`` seconds.

        Raises:
            DriverError: a partition refused; the partitions that had accepted are closed again.
        """
        if self._session is not None:
            if self._session[1] == optimizer:
                return self._session[0]
            self.close_training()
        token = secrets.token_hex(16)
        request = pb.OpenTrainingRequest(session=token, optimizer=optimizer_message(optimizer))
        deadline = time.monotonic() + wait
        while True:
            try:
                self._all("OpenTraining", [request] * self.table.num_partitions)
                break
            except DriverError as exc:
                self._close_session(token)
                if exc.reason != TRAINING_SESSION or time.monotonic() + 1.0 > deadline:
                    raise
                log.info("waiting for another training session to end: %s", exc)
                time.sleep(1.0)
        self._session = (token, optimizer)
        return token

    def close_training(self) -> None:
        """End this driver's training session on every partition (best effort)."""
        if self._session is not None:
            token, self._session = self._session[0], None
            self._close_session(token)

    def _close_session(self, token: str) -> None:
        try:
            self._all("CloseTraining", [pb.CloseTrainingRequest(session=token)] * self.table.num_partitions,
                      timeout=min(self.timeout, 5.0))
        except DriverError as exc:
            log.warning("closing the training session failed: %s", exc)

    # ------------------------------------------------------------ steps

    def step(self, x: np.ndarray, y: np.ndarray | None = None, optimizer: OptimizerConfig | None = None,
             timeout: float | None = None,
             weights_version: int | None = None) -> tuple[np.ndarray, float | None, int | None]:
        """One pass on every partition: training when ``y`` is given, else inference.

        Args:
            x: ``[batch, inputs]``; cast to float32.
            y: ``[batch]`` class indices (int64), or None.
            optimizer: the training session's optimizer (:meth:`open_training`, opened on the first
                training step, and again when the optimizer changes); default SGD.
            timeout: deadline of the calls, seconds (default: the driver's).
            weights_version: inference only: every partition computes with the parameters of
                this optimizer step (see ``engine.PartitionEngine.forward``), or fails ABORTED.

        Returns:
            ``(outputs [batch, units_last] float32, loss or None, correct or None)``.

        Raises:
            DriverError: a partition refused or failed the step.
        """
        request = pb.PassRequest(lookup_version=self.table.version, pass_id=uuid.uuid4().hex,
                                 train=y is not None, inputs=to_tensor(np.asarray(x, dtype=np.float32)))
        if weights_version is not None:
            request.weights_version = weights_version
        if y is not None:
            request.labels.CopyFrom(to_tensor(np.asarray(y, dtype=np.int64)))
            request.session = self.open_training(optimizer or OptimizerConfig())
        replies = self._all("RunPass", [request.SerializeToString()] * self.table.num_partitions, timeout)
        first = next(r for r in replies if r.has_outputs)
        outputs = from_tensor(first.outputs, "outputs", "float32")
        if y is None:
            return outputs, None, None
        return outputs, first.loss, first.correct

    def predict(self, x: np.ndarray, batch_size: int = 256, timeout: float | None = None) -> np.ndarray:
        """Outputs ``[n, units_last]`` float32 for ``x`` ``[n, inputs]``, in chunks of ``batch_size``.

        ``timeout`` bounds each chunk's calls (default: the driver's). Raises DriverError.
        """
        x = np.asarray(x, dtype=np.float32)
        parts = [self.step(x[i:i + batch_size], timeout=timeout)[0] for i in range(0, len(x), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, self.table.layer_units[-1]), np.float32)

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> Evaluation:
        probs = self.predict(x, batch_size)
        picked = probs[np.arange(len(y)), y]
        loss = float(-np.mean(np.log(np.clip(picked, 1e-12, None)))) if len(y) else float("nan")
        accuracy = float(np.mean(probs.argmax(axis=1) == y)) if len(y) else float("nan")
        return Evaluation(accuracy, loss, len(y))

    def status(self, timeout: float | None = None) -> list[pb.StatusReply]:
        """Every partition's ``Status``, in partition order. Raises DriverError."""
        return self._all("Status", [pb.StatusRequest()] * self.table.num_partitions, timeout)

    def reload(self) -> list[pb.StatusReply]:
        """Make every partition reload its rows from the latest committed checkpoint."""
        return self._all("Reload", [pb.ReloadRequest()] * self.table.num_partitions)

    def traffic(self) -> tuple[int, int]:
        """``(messages, bytes)`` the partitions sent each other so far."""
        replies = self.status()
        return sum(r.messages_sent for r in replies), sum(r.bytes_sent for r in replies)

    def checkpoint(self, store: ModelStore, model: ModelSpec, meta: dict, *, run_id: str | None = None) -> Checkpoint:
        """Reserve the next sequence, have every partition write its shard of it, then commit, last.

        ``meta`` is recorded with ``lookup_version`` and ``optimizer_step`` (the
        highest optimizer step of the partitions) added.

        Args:
            store: the network's checkpoints on the shared volume.
            model: the network's shape, recorded in the commit record.
            meta: JSON-serializable metadata for the commit record.
            run_id: the run the sequence is reserved for (default: ``meta["run_id"]``,
                else ``"unnamed"``); the servers write only with its reservation token.

        Returns:
            The committed checkpoint; its ``sequence`` is the one reserved here
            (``store.next_sequence()`` at the call unless another trainer took it).

        Raises:
            DriverError: a partition refused or failed to write its shard (e.g.
                FAILED_PRECONDITION when another trainer reserved a newer sequence).
            StoreError: the reservation failed, or the shards do not make a consistent checkpoint.

        A failure before the commit leaves the previous checkpoint as the latest;
        the reserved directory is removed later by ``store.prune_stale``.
        """
        run = run_id or str(meta.get("run_id") or "unnamed")
        reservation = store.reserve(run_id=run)
        request = pb.CheckpointRequest(lookup_version=self.table.version, sequence=reservation.sequence,
                                       run_id=reservation.run_id, reservation_token=reservation.token)
        replies = self._all("Checkpoint", [request] * self.table.num_partitions)
        shards = [json.loads(r.shard_json) for r in replies]
        meta = {**meta, "lookup_version": self.table.version,
                "optimizer_step": max(r.optimizer_step for r in replies)}
        return store.commit(reservation, shards, network=model.shape_dict(), meta=meta)


_REPLIES = {"RunPass": pb.PassReply}  # methods whose requests the driver may send pre-serialized


def _reason(call: grpc.Call) -> str | None:
    """The ``mpnn-error`` trailing metadata of a failed call, or None."""
    try:
        metadata = call.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - a failed call without metadata has no reason
        return None
    for key, value in metadata:
        if key == ERROR_KEY:
            return value.decode() if isinstance(value, bytes) else value
    return None


def optimizer_message(cfg: OptimizerConfig) -> pb.OptimizerConfig:
    return pb.OptimizerConfig(**asdict(cfg))
