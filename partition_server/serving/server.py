"""The partition server: one partition's neurons behind gRPC (the peer service ``mpnn.v1.Partition``).

It loads the lookup table (a file: a mounted ConfigMap in a cluster), takes its rows of every
layer from the newest weights source (``loading``), and runs the execution engine for the
driver's ``RunPass`` calls, reaching its peers with one ``Exchange`` message per (layer, peer,
phase) (``peers``). It serves the standard ``grpc.health.v1`` health service, and re-reads the
lookup when the file's version changes, reloading the rows it now owns from the latest checkpoint.

It also answers the Open Inference Protocol v2 for the whole network, over gRPC
(``inference.GRPCInferenceService``, on the same port, ``inference_grpc``) and over HTTP/REST on
a second port (``rest``). ``main`` runs it as the ``mpnn serve`` process.

Status codes: INVALID_ARGUMENT for a wrong shape or dtype, FAILED_PRECONDITION for a
lookup-version mismatch, DEADLINE_EXCEEDED when a peer's message does not arrive before the
call's deadline, UNAVAILABLE while no model is loaded, RESOURCE_EXHAUSTED for an inference
``RunPass`` beyond :func:`~partition_server.serving.limits.pass_slots` (retry), CANCELLED for a
``RunPass`` whose caller has already gone, ABORTED for a failed exchange or an inference
``RunPass`` whose ``weights_version`` this partition no longer keeps; the latter carries the
trailing metadata ``mpnn-error: weights-changed`` (see ``reasons``) and the message "weights
changed during the pass; retry".

Threads: every RPC runs on one pool of ``workers`` threads; inference passes are bounded below
its size so that ``Exchange`` always finds a thread (see ``limits``). Entry points size their
passes in flight from the same bound (``ModelInference.pass_limit``), so with equal pools the
partitions do not refuse each other's passes.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent import futures
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from partition_server.api.channels import CHANNEL_OPTIONS
from partition_server.api.lookup import LookupTable, read_version
from partition_server.api.manifest import ModelSpec
from partition_server.api.protos import grpc_predict_v2_pb2_grpc as inference_grpc
from partition_server.api.protos import mpnn_pb2 as pb
from partition_server.api.protos import mpnn_pb2_grpc as pb_grpc
from partition_server.api.wire import from_tensor, to_tensor
from partition_server.engine import ExchangeError, Mailbox, OptimizerConfig, WeightsChanged
from partition_server.serving import reasons
from partition_server.serving.inference import ModelInference
from partition_server.serving.inference_grpc import InferenceServicer
from partition_server.serving.limits import default_workers, max_infer_calls, pass_slots
from partition_server.serving.loading import Loaded, load_partition
from partition_server.serving.metrics import ServerMetrics
from partition_server.serving.peers import GrpcTransport, Peers
from partition_server.serving.rest import RestServer
from partition_server.storage.store import ModelStore, StoreError

__all__ = ["DEFAULT_TIMEOUT", "SERVICE", "PartitionServer"]

log = logging.getLogger("mpnn.server")

SERVICE = "mpnn.v1.Partition"
DEFAULT_TIMEOUT = 60.0  # seconds, when a call carries no deadline


class PartitionServer(pb_grpc.PartitionServicer):
    """Serves partition ``index`` of the network ``name``.

    Args:
        index: partition index, 0..P-1.
        name: the network's name (``metadata.name``).
        model: its shape (inputs, layers, seed, optional import file).
        lookup_path: ``lookup.json``; re-read every ``poll_seconds`` seconds.
        model_dir: the network's directory on the shared volume (checkpoints live below it).
        poll_seconds: how often the lookup file's version is checked, seconds.

    Attributes:
        workers: threads of the gRPC pool (set by :meth:`start`).
        pass_limit: inference ``RunPass`` calls run at once (:func:`~partition_server.serving.limits.pass_slots`).
        port, http_port: the bound gRPC and REST ports, once started (``http_port`` None without REST).
        inference: the Open Inference Protocol model this server is an entry point of.

    Raises:
        LookupTableError, StoreError, ValueError: from :meth:`load` when nothing can be served.
    """

    def __init__(self, index: int, name: str, model: ModelSpec, lookup_path: str | Path,
                 model_dir: str | Path, poll_seconds: float = 2.0):
        self.index = index
        self.name = name
        self.model = model
        self.lookup_path = Path(lookup_path)
        self.model_dir = Path(model_dir)
        self.store = ModelStore(self.model_dir)
        self.mailbox = Mailbox()
        self.peers = Peers()
        self.health = health.HealthServicer()
        self.poll_seconds = poll_seconds
        self._loaded: Loaded | None = None
        self._load_lock = threading.Lock()
        self._counter_lock = threading.Lock()
        self.messages_sent = 0
        self.bytes_sent = 0
        self._stop = threading.Event()
        self._grpc: grpc.Server | None = None
        self._executor: futures.ThreadPoolExecutor | None = None
        self.workers = 32
        self.pass_limit = pass_slots(self.workers)
        self._pass_slots = threading.Semaphore(self.pass_limit)
        self.port: int | None = None
        self.inference = ModelInference(name, model, self._served_table, weights_version=self._weights_version)
        self._rest: RestServer | None = None
        self.http_port: int | None = None
        self.metrics = ServerMetrics(network=name, partition=index,
                                     committed=lambda: (self.store.sequences() or [0])[-1])

    # ------------------------------------------------------------ loading

    def load(self) -> Loaded:
        """(Re)load the lookup table and this partition's rows from the newest source
        (see :func:`~partition_server.serving.loading.load_partition`); on failure the last
        loaded state stays in force."""
        with self._load_lock:
            loaded = load_partition(self.index, self.model, lookup_path=self.lookup_path, store=self.store)
            self._loaded = loaded
            closed = self.peers.retain(loaded.table.addresses)
            self.metrics.instrument_engine(loaded.engine)
            self.metrics.loaded(lookup_version=loaded.table.version, checkpoint=loaded.checkpoint,
                                parameters=_parameters(loaded), neurons=loaded.table.neuron_count(self.index))
        if closed:
            log.info("closed channels to addresses no longer in the lookup",
                     extra={"partition": self.index, "addresses": closed})
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        log.info("loaded", extra={"partition": self.index, "lookup_version": loaded.table.version,
                                  "source": loaded.source, "checkpoint": loaded.checkpoint,
                                  "neurons": loaded.table.neuron_count(self.index)})
        return loaded

    def _served_table(self) -> LookupTable | None:
        loaded = self._loaded
        return loaded.table if loaded is not None else None

    def _weights_version(self) -> int | None:
        loaded = self._loaded
        return loaded.engine.optimizer_step if loaded is not None else None

    def _watch_lookup(self) -> None:
        """Reload when the lookup file's version changes (a ConfigMap update arrives as a file swap).
        The file may be gzip, or only ``<lookup>.gz`` may exist (``LookupTable.load`` reads the same)."""
        while not self._stop.wait(self.poll_seconds):
            version = read_version(self.lookup_path)
            if version is None:
                continue
            current = self._loaded.table.version if self._loaded else None
            if version and version != current:
                try:
                    self.load()
                except Exception:  # keep serving the last valid table
                    log.exception("reload failed", extra={"partition": self.index, "lookup_version": version})

    # ------------------------------------------------------------ RPCs

    def _current(self, version: str, context: grpc.ServicerContext) -> Loaded:
        loaded = self._loaded
        if loaded is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"partition {self.index}: no model loaded")
        if version != loaded.table.version:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"partition {self.index}: lookup version {version or '(none)'} does not match "
                          f"the served {loaded.table.version}")
        return loaded

    def count_sent(self, nbytes: int, *, peer: int | None = None, phase: str = "") -> None:
        """Count one message of ``nbytes`` payload bytes sent to partition ``peer`` in ``phase``
        (``Status`` reports the totals, ``/metrics`` them by peer and phase)."""
        with self._counter_lock:
            self.messages_sent += 1
            self.bytes_sent += nbytes
        if peer is not None:
            self.metrics.sent(nbytes, peer=peer, phase=phase)

    def RunPass(self, request: pb.PassRequest, context: grpc.ServicerContext) -> pb.PassReply:
        loaded = self._current(request.lookup_version, context)
        # A cancelled pass (the driver saw another partition fail) wakes the engine waiting on its mailbox.
        if not context.add_callback(lambda: self.mailbox.discard(request.pass_id)):
            self.mailbox.discard(request.pass_id)
            context.abort(grpc.StatusCode.CANCELLED, f"partition {self.index}: pass {request.pass_id} "
                                                     f"was cancelled before it started")
        if request.train:  # one at a time per engine; reserved for in pass_slots()
            return self._run_pass(loaded, request, context)
        if not self._pass_slots.acquire(blocking=False):
            self.mailbox.discard(request.pass_id)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"partition {self.index}: {self.pass_limit} forward passes are running, the most "
                          f"its {self.workers}-thread pool takes while keeping threads for Exchange; retry")
        try:
            return self._run_pass(loaded, request, context)
        finally:
            self._pass_slots.release()

    def _run_pass(self, loaded: Loaded, request: pb.PassRequest, context: grpc.ServicerContext) -> pb.PassReply:
        engine = loaded.engine
        timeout = context.time_remaining() or DEFAULT_TIMEOUT
        try:
            x = from_tensor(request.inputs, "inputs", "float32", [None, self.model.inputs])
            transport = GrpcTransport(index=self.index, table=loaded.table, peers=self.peers,
                                      mailbox=self.mailbox, count_sent=self.count_sent)
            if request.train:
                y = from_tensor(request.labels, "labels", "int64", [x.shape[0]])
                if request.HasField("optimizer"):
                    engine.optimizer = OptimizerConfig(**_optimizer_fields(request.optimizer))
                result = engine.train_step(request.pass_id, x, y, transport, timeout)
                outputs, loss, correct = result.outputs, result.loss, result.correct
                self.metrics.training_steps.inc()
            else:
                version = request.weights_version if request.HasField("weights_version") else None
                outputs, loss, correct = engine.forward(request.pass_id, x, transport, timeout, version), None, None
        except ValueError as exc:
            self.mailbox.discard(request.pass_id)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except TimeoutError as exc:
            self.mailbox.discard(request.pass_id)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        except WeightsChanged as exc:
            self.mailbox.discard(request.pass_id)
            reasons.abort(context, grpc.StatusCode.ABORTED, str(exc), reason=reasons.WEIGHTS_CHANGED)
        except (ExchangeError, RuntimeError) as exc:
            self.mailbox.discard(request.pass_id)
            context.abort(grpc.StatusCode.ABORTED, str(exc))
        reply = pb.PassReply(has_outputs=outputs is not None)
        if outputs is not None:
            reply.outputs.CopyFrom(to_tensor(outputs))
        if loss is not None:
            reply.loss, reply.correct = loss, correct
        return reply

    def Exchange(self, request: pb.ExchangeRequest, context: grpc.ServicerContext) -> pb.ExchangeReply:
        self._current(request.lookup_version, context)
        if request.phase not in ("fwd", "bwd"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"phase must be fwd or bwd, got {request.phase!r}")
        try:
            arr = from_tensor(request.tensor, "tensor", "float32")
            # The sender's pass ends by its deadline, and this partition's part of the same pass
            # by (about) the same one: a message still here well after it is never taken.
            ttl = 2 * (context.time_remaining() or DEFAULT_TIMEOUT) + 10.0
            self.mailbox.put((request.pass_id, request.phase, request.layer), request.source, arr, ttl)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.ExchangeReply()

    def Checkpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext) -> pb.CheckpointReply:
        loaded = self._current(request.lookup_version, context)
        tensors, optimizer_step = loaded.engine.state_snapshot()
        ranges = {k: loaded.engine.local_rows(k) for k in tensors}
        try:
            info = self.store.write_shard(request.sequence, partition=self.index, layers=tensors, ranges=ranges)
        except StoreError as exc:
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
                               messages_sent=self.messages_sent, bytes_sent=self.bytes_sent)
        if loaded is not None:
            reply.lookup_version = loaded.table.version
            reply.neurons = loaded.table.neuron_count(self.index)
            reply.parameters = _parameters(loaded)
            reply.checkpoint_sequence = loaded.checkpoint
            reply.weights_source = loaded.source
        return reply

    # ------------------------------------------------------------ lifecycle

    def start(self, host: str = "0.0.0.0", port: int = 50051, *, workers: int | None = None,
              http_port: int | None = None) -> int:
        """Load the model, bind, and serve in background threads. Returns the bound gRPC port.

        Args:
            host: bind address of both ports.
            port: gRPC port (``mpnn.v1.Partition``, ``grpc.health.v1``, ``inference.GRPCInferenceService``);
                0 lets the OS pick.
            workers: threads of the gRPC pool; sets :attr:`pass_limit` and the ``ModelInfer`` cap
                (``limits``). None: ``limits.default_workers`` for the partitions of the lookup
                table read now (the pool keeps its size when a later table has more).
            http_port: Open Inference Protocol REST port; 0 lets the OS pick (see :attr:`http_port`);
                None serves no REST.

        Raises:
            OSError: a port cannot be bound. And whatever :meth:`load` raises.
        """
        if workers is None:
            workers = default_workers(LookupTable.load(self.lookup_path).num_partitions)
        self.workers = workers
        self.pass_limit = pass_slots(workers)
        self._pass_slots = threading.Semaphore(self.pass_limit)
        self.inference.pass_limit = self.pass_limit
        self._executor = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc")
        server = grpc.server(self._executor, options=CHANNEL_OPTIONS)
        pb_grpc.add_PartitionServicer_to_server(self, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        inference_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.inference, max_calls=max_infer_calls(workers), metrics=self.metrics), server)
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind {host}:{port}")
        if http_port is not None:
            self._rest = RestServer(self.inference, host, http_port, metrics=self.metrics)
            self.http_port = self._rest.port
        try:
            self.load()
            server.start()
            if self._rest is not None:
                self._rest.start()
        except BaseException:
            if self._rest is not None:
                self._rest.stop()
            server.stop(0)
            self._executor.shutdown(wait=False)
            raise
        self._grpc = server
        threading.Thread(target=self._watch_lookup, name="lookup-watch", daemon=True).start()
        log.info("serving", extra={"partition": self.index, "address": f"{host}:{self.port}",
                                   "http_port": self.http_port})
        return self.port

    def stop(self, grace: float = 5.0) -> None:
        """Stop serving: REST first, then gRPC, giving calls in progress up to ``grace`` seconds each."""
        self._stop.set()
        self.health.enter_graceful_shutdown()
        if self._rest is not None:
            self._rest.stop(grace)
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # grpc leaves its idle worker threads running
        self.inference.close()
        self.peers.close()

    def wait(self) -> None:
        """Block until the gRPC server has stopped."""
        if self._grpc is not None:
            self._grpc.wait_for_termination()


def _parameters(loaded: Loaded) -> int:
    """Weights plus biases of the rows ``loaded`` holds."""
    return sum(t["weight"].size + t["bias"].size for t in loaded.engine.state_tensors().values())


def _optimizer_fields(msg: pb.OptimizerConfig) -> dict[str, Any]:
    """Every field as sent: proto3 cannot tell an unset 0 from a real one (Adam's beta1 = 0 is
    valid), so the driver always sends the whole config and a missing value fails validation."""
    return {field: getattr(msg, field) for field in asdict(OptimizerConfig())}
