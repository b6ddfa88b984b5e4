"""The partition server's control RPCs: training sessions, checkpoints, reloads and status.

:class:`ControlHandlers` holds ``OpenTraining``, ``CloseTraining``, ``Checkpoint``, ``Reload`` and
``Status`` of ``mpnn.v1.Partition``; :class:`~partition_server.serving.server.PartitionServer`
inherits them, and they work on its state (``index``, ``sessions``, ``store``, ``peers``, the
loaded partition).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Any

import grpc

from partition_server.api.protos import mpnn_pb2 as pb
from partition_server.engine import OptimizerConfig
from partition_server.serving import reasons
from partition_server.serving.loading import Loaded
from partition_server.serving.training import SessionRefused
from partition_server.storage.store import ForeignReservationError, Reservation, StoreError

__all__ = ["ControlHandlers"]

log = logging.getLogger("mpnn.server")


class ControlHandlers:
    """The control RPCs of ``mpnn.v1.Partition``, mixed into the partition server."""

    def OpenTraining(self, request: pb.OpenTrainingRequest, context: grpc.ServicerContext) -> pb.OpenTrainingReply:
        try:
            optimizer = OptimizerConfig(**_optimizer_fields(request.optimizer))
        except (TypeError, ValueError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"partition {self.index}: optimizer: {exc}")
        try:
            self.sessions.open(request.session, optimizer)
        except SessionRefused as exc:
            reasons.abort(context, exc.code, f"partition {self.index}: {exc.message}", reason=reasons.TRAINING_SESSION)
        log.info("training session opened", extra={"partition": self.index, "session": request.session[:8],
                                                   "optimizer": optimizer.name})
        return pb.OpenTrainingReply(lease_seconds=self.sessions.lease)

    def CloseTraining(self, request: pb.CloseTrainingRequest, context: grpc.ServicerContext) -> pb.CloseTrainingReply:
        return pb.CloseTrainingReply(closed=self.sessions.close(request.session))

    def Checkpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext) -> pb.CheckpointReply:
        """Write this partition's shard of a checkpoint the driver reserved on the shared volume.

        The request must carry the reserved ``sequence`` with the reserving ``run_id`` and
        ``reservation_token``; they are checked against ``reservation.json`` before anything
        is snapshotted or written. Errors (nothing is written with any of them):
        INVALID_ARGUMENT for a sequence outside 0..10**12-1 or a malformed run id or token;
        PERMISSION_DENIED for a sequence reserved by another run or with another token;
        FAILED_PRECONDITION for an unreserved, committed or superseded sequence, a shard this
        partition already wrote, or a stale lookup version; UNAVAILABLE if the write fails.
        """
        loaded = self._current(request.lookup_version, context)
        try:
            reservation = Reservation.of(sequence=request.sequence, run_id=request.run_id,
                                         token=request.reservation_token)
        except StoreError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"partition {self.index}: Checkpoint: {exc}")
        try:
            self.store.check_reservation(reservation)  # before the snapshot: a stray call costs nothing
            tensors, optimizer_step = loaded.engine.state_snapshot()
            ranges = {k: loaded.engine.local_rows(k) for k in tensors}
            info = self.store.write_shard(reservation, partition=self.index, layers=tensors, ranges=ranges)
        except ForeignReservationError as exc:
            log.warning("checkpoint refused: %s", exc, extra={"partition": self.index})
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"partition {self.index}: {exc}")
        except StoreError as exc:  # ReservationError included
            log.warning("checkpoint refused: %s", exc, extra={"partition": self.index})
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"partition {self.index}: {exc}")
        except OSError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"partition {self.index}: writing the shard failed: {exc}")
        log.info("shard written", extra={"partition": self.index, "sequence": request.sequence})
        return pb.CheckpointReply(shard_json=json.dumps(info.to_dict()), optimizer_step=optimizer_step)

    def Reload(self, request: pb.ReloadRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        # After a partition failure every partition reloads: new channels reach a restarted peer at
        # once, where the old ones may still wait out a reconnect backoff.
        self.peers.close()
        try:
            self.load()
        except Exception as exc:  # the last valid state stays in force
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"partition {self.index}: reload failed: {exc}")
        return self.Status(pb.StatusRequest(), context)

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        loaded = self._loaded
        reply = pb.StatusReply(partition=self.index, ready=loaded is not None,
                               messages_sent=self.messages_sent, bytes_sent=self.bytes_sent,
                               peer_streams_opened=self.peer_streams_opened, peer_streams_open=self.peer_streams_open)
        if loaded is not None:
            reply.lookup_version = loaded.table.version
            reply.neurons = loaded.table.neuron_count(self.index)
            reply.parameters = _parameters(loaded)
            reply.checkpoint_sequence = loaded.checkpoint
            reply.weights_source = loaded.source
        return reply


def _parameters(loaded: Loaded) -> int:
    """Weights plus biases of the rows ``loaded`` holds."""
    return sum(w.size + b.size for w, b in loaded.engine.params_at(None, 0.0).values())


def _optimizer_fields(msg: pb.OptimizerConfig) -> dict[str, Any]:
    """Every field as sent: proto3 cannot tell an unset 0 from a real one (Adam's beta1 = 0 is
    valid), so the driver always sends the whole config and a missing value fails validation."""
    return {field: getattr(msg, field) for field in asdict(OptimizerConfig())}
