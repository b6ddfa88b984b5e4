"""The partition server: one partition's neurons behind gRPC (the peer service ``mpnn.v1.Partition``).

It loads the lookup table (a file: a mounted ConfigMap in a cluster), takes its rows of every
layer from the newest weights source (``loading``), and runs the execution engine for the
driver's ``RunPass`` calls, reaching its peers with one ``Exchange`` message per (layer, peer,
phase), carried by one long-lived ``ExchangeStream`` per peer (``peers``; the receiving side is
``exchange``). It serves the standard ``grpc.health.v1`` health service, and re-reads the
lookup when the file's version changes, reloading the rows it now owns from the latest checkpoint.

Three ports, two audiences: the peer port carries ``mpnn.v1.Partition`` (and health) for this
network's servers and trainer only, every call signed with the network's key
(:class:`~partition_server.api.peer_auth.AuthInterceptor`, else UNAUTHENTICATED); the public gRPC
port answers the Open Inference Protocol v2 for the whole network
(``inference.GRPCInferenceService``, ``inference_grpc``) and ``grpc.health.v1``; REST is on a
third port (``rest``). ``main`` runs it as the ``mpnn serve`` process.

Status codes: INVALID_ARGUMENT for a wrong shape or dtype, FAILED_PRECONDITION for a
lookup-version mismatch, DEADLINE_EXCEEDED when a peer's message does not arrive before the
call's deadline, UNAVAILABLE while no model is loaded, RESOURCE_EXHAUSTED for an inference
``RunPass`` beyond :func:`~partition_server.serving.limits.pass_slots` (retry), CANCELLED for a
``RunPass`` whose caller has already gone, ABORTED for a failed exchange or an inference
``RunPass`` whose ``weights_version`` this partition no longer keeps; the latter carries the
trailing metadata ``mpnn-error: weights-changed`` (see ``reasons``) and the message "weights
changed during the pass; retry". A training ``RunPass`` without the current training session's
token is PERMISSION_DENIED with ``mpnn-error: training-session`` and changes nothing (``training``);
an ``Exchange`` beyond what its peer may hold in the mailbox is RESOURCE_EXHAUSTED. On an
``ExchangeStream`` the first such message ends the stream with that status; a stream beyond
``peer_stream_limit`` is RESOURCE_EXHAUSTED (``mpnn-error: peer-streams``) before any message is
read. A peer port call is authenticated when it starts: a stream, once, when it opens.

Bounds (``limits.ServerLimits``): a ``RunPass`` runs at most ``max_pass_seconds`` whatever its
deadline; an ``Exchange`` must name a peer partition of the table, a layer of the network and a
phase, and is held within the mailbox's per-peer caps (tighter for passes not running here);
a ``ModelInfer`` message may take ``max_request_bytes``.

Threads: every RPC runs on one pool of ``workers`` threads plus ``peer_stream_limit`` more for
the inbound peer streams, each of which holds a thread while open; inference passes are bounded
below ``workers`` so that ``Exchange`` always finds a thread (see ``limits``). Entry points size their
passes in flight from the same bound (``ModelInference.pass_limit``), so with equal pools the
partitions do not refuse each other's passes.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from partition_server.api.channels import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES
from partition_server.api.lookup import LookupTable, read_version
from partition_server.api.manifest import DynamicBatching, ModelSpec
from partition_server.api.peer_auth import AuthInterceptor, PeerCredentials, TlsFiles
from partition_server.api.protos import grpc_predict_v2_pb2_grpc as inference_grpc
from partition_server.api.protos import mpnn_pb2 as pb
from partition_server.api.protos import mpnn_pb2_grpc as pb_grpc
from partition_server.api.wire import from_tensor, to_tensor
from partition_server.engine import ExchangeError, Mailbox, OptimizerConfig, PeerLost, WeightsChanged
from partition_server.serving import reasons
from partition_server.serving.control import ControlHandlers, _parameters
from partition_server.serving.exchange import ExchangeHandlers
from partition_server.serving.inference import ModelInference
from partition_server.serving.inference_grpc import InferenceServicer
from partition_server.serving.limits import ServerLimits, default_workers, max_infer_calls, pass_slots, peer_streams
from partition_server.serving.loading import Loaded, load_partition
from partition_server.serving.metrics import ServerMetrics
from partition_server.serving.peers import GrpcTransport, Peers
from partition_server.serving.rest import RestServer
from partition_server.serving.training import SessionRefused, TrainingSessions
from partition_server.storage.store import ModelStore

__all__ = ["DEFAULT_TIMEOUT", "SERVICE", "PartitionServer"]

log = logging.getLogger("mpnn.server")

SERVICE = "mpnn.v1.Partition"
DEFAULT_TIMEOUT = 60.0  # seconds, when a call carries no deadline


class PartitionServer(ControlHandlers, ExchangeHandlers, pb_grpc.PartitionServicer):
    """Serves partition ``index`` of the network ``name``.

    Args:
        index: partition index, 0..P-1.
        name: the network's name (``metadata.name``).
        model: its shape (inputs, layers, seed, optional import file).
        lookup_path: ``lookup.json``; re-read every ``poll_seconds`` seconds.
        model_dir: the network's directory on the shared volume (checkpoints live below it).
        poll_seconds: how often the lookup file's version is checked, seconds.
        credentials: the network's peer key (and TLS files): the peer port admits only calls
            signed with it, and this server signs its own calls to its peers with it.
        limits: what a caller can hold (default: ``ServerLimits.from_env()``).
        batching: dynamic batching of inference requests (``network.json``'s ``dynamicBatching``);
            None: off.

    Attributes:
        workers: threads of the gRPC pool (set by :meth:`start`).
        pass_limit: inference ``RunPass`` calls run at once (:func:`~partition_server.serving.limits.pass_slots`).
        peer_stream_limit: inbound ``ExchangeStream`` calls open at once (``limits.max_peer_streams``,
            else :func:`~partition_server.serving.limits.peer_streams` of the partitions at start).
        peer_streams_open, peer_streams_opened: inbound streams open now, and accepted since start.
        port, peer_port, http_port: the bound public gRPC, peer and REST ports, once started
            (``http_port`` None without REST).
        inference: the Open Inference Protocol model this server is an entry point of.

    Raises:
        LookupTableError, StoreError, ValueError: from :meth:`load` when nothing can be served.
    """

    def __init__(self, index: int, name: str, model: ModelSpec, lookup_path: str | Path,
                 model_dir: str | Path, poll_seconds: float = 2.0, *, credentials: PeerCredentials,
                 limits: ServerLimits | None = None, batching: DynamicBatching | None = None):
        self.index = index
        self.name = name
        self.model = model
        self.lookup_path = Path(lookup_path)
        self.model_dir = Path(model_dir)
        self.store = ModelStore(self.model_dir)
        self.limits = limits = limits if limits is not None else ServerLimits.from_env()
        self.mailbox = Mailbox(peer_bytes=limits.mailbox_peer_bytes, peer_entries=limits.mailbox_peer_entries,
                               early_bytes=limits.mailbox_early_bytes, early_entries=limits.mailbox_early_entries,
                               early_ttl=limits.mailbox_early_seconds)
        self.sessions = TrainingSessions(limits.training_lease_seconds)
        self.credentials = credentials
        self.peers = Peers(credentials, window_messages=limits.peer_window_messages,
                           window_bytes=limits.peer_window_bytes)
        self._streams_lock = threading.Lock()
        self.peer_streams_open = 0      # inbound ExchangeStream calls open now
        self.peer_streams_opened = 0    # and accepted since start
        self._inbound: set[grpc.ServicerContext] = set()
        self._passes_running = 0
        self.peer_stream_limit = limits.max_peer_streams or peer_streams(2)
        self.health = health.HealthServicer()
        self.poll_seconds = poll_seconds
        self._loaded: Loaded | None = None
        self._load_lock = threading.Lock()
        self._counter_lock = threading.Lock()
        self.messages_sent = 0
        self.bytes_sent = 0
        self._stop = threading.Event()
        self._grpc: grpc.Server | None = None
        self._peer_grpc: grpc.Server | None = None
        self.peer_port: int | None = None
        self._executor: futures.ThreadPoolExecutor | None = None
        self.workers = 32
        self.pass_limit = pass_slots(self.workers)
        self._pass_slots = threading.Semaphore(self.pass_limit)
        self.port: int | None = None
        # The entry point's drivers use the peer channels, which carry long-lived streams.
        self.inference = ModelInference(name, model, self._served_table, weights_version=self._weights_version,
                                        credentials=credentials, timeout=min(60.0, limits.max_pass_seconds),
                                        channels=self.peers.channel, batching=batching)
        self._rest: RestServer | None = None
        self.http_port: int | None = None
        self.metrics = ServerMetrics(network=name, partition=index,
                                     committed=lambda: (self.store.sequences() or [0])[-1],
                                     peer_streams=lambda: (self.peer_streams_open, self.peer_streams_opened,
                                                           self.peers.streams_open(), self.peers.streams_opened))
        self.metrics.instrument_inference(self.inference)

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

    def _timeout(self, context: grpc.ServicerContext) -> float:
        """Seconds this call may take: the caller's deadline, capped at ``limits.max_pass_seconds``."""
        remaining = context.time_remaining()
        cap = self.limits.max_pass_seconds
        return cap if remaining is None else max(0.0, min(remaining, cap))

    def RunPass(self, request: pb.PassRequest, context: grpc.ServicerContext) -> pb.PassReply:
        with self._streams_lock:
            self._passes_running += 1
        try:
            return self._run_pass_call(request, context)
        finally:
            with self._streams_lock:
                self._passes_running -= 1

    def _run_pass_call(self, request: pb.PassRequest, context: grpc.ServicerContext) -> pb.PassReply:
        loaded = self._current(request.lookup_version, context)
        if request.train:  # refused before it touches the mailbox, the training lock or the weights
            if request.HasField("optimizer"):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              "optimizer: fixed per training session (OpenTraining), not sent with a RunPass")
            try:
                optimizer = self.sessions.begin(request.session)
            except SessionRefused as exc:
                reasons.abort(context, exc.code, f"partition {self.index}: {exc.message}",
                              reason=reasons.TRAINING_SESSION)
            try:
                return self._admitted_pass(loaded, request, context, optimizer)
            finally:
                self.sessions.end(request.session)
        if not self._pass_slots.acquire(blocking=False):
            self.mailbox.discard(request.pass_id)  # its peers' messages are not kept for it
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"partition {self.index}: {self.pass_limit} forward passes are running, the most "
                          f"its {self.workers}-thread pool takes while keeping threads for Exchange; retry")
        try:
            return self._admitted_pass(loaded, request, context, None)
        finally:
            self._pass_slots.release()

    def _admitted_pass(self, loaded: Loaded, request: pb.PassRequest, context: grpc.ServicerContext,
                       optimizer: OptimizerConfig | None) -> pb.PassReply:
        timeout = self._timeout(context)
        # A cancelled pass (the driver saw another partition fail) wakes the engine waiting on its mailbox.
        self.mailbox.open(request.pass_id, ttl=timeout + 10.0)
        if not context.add_callback(lambda: self.mailbox.discard(request.pass_id)):
            self.mailbox.discard(request.pass_id)
            context.abort(grpc.StatusCode.CANCELLED, f"partition {self.index}: pass {request.pass_id} "
                                                     f"was cancelled before it started")
        return self._run_pass(loaded, request, context, timeout, optimizer)

    def _run_pass(self, loaded: Loaded, request: pb.PassRequest, context: grpc.ServicerContext, timeout: float,
                  optimizer: OptimizerConfig | None) -> pb.PassReply:
        engine = loaded.engine
        try:
            x = from_tensor(request.inputs, "inputs", "float32", [None, self.model.inputs])
            transport = GrpcTransport(index=self.index, table=loaded.table, peers=self.peers,
                                      mailbox=self.mailbox, count_sent=self.count_sent)
            if request.train:
                y = from_tensor(request.labels, "labels", "int64", [x.shape[0]])
                engine.optimizer = optimizer
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
        except PeerLost as exc:
            self.mailbox.discard(request.pass_id)
            reasons.abort(context, grpc.StatusCode.ABORTED, f"partition {self.index}: {exc}", reason=reasons.PEER_LOST)
        except (ExchangeError, RuntimeError) as exc:
            self.mailbox.discard(request.pass_id)
            context.abort(grpc.StatusCode.ABORTED, str(exc))
        reply = pb.PassReply(has_outputs=outputs is not None)
        if outputs is not None:
            reply.outputs.CopyFrom(to_tensor(outputs))
        if loss is not None:
            reply.loss, reply.correct = loss, correct
        return reply

    # ------------------------------------------------------------ lifecycle

    def start(self, host: str = "0.0.0.0", port: int = 50051, *, peer_port: int = 50052,
              workers: int | None = None, http_port: int | None = None) -> int:
        """Load the model, bind, and serve in background threads. Returns the bound public gRPC port.

        Args:
            host: bind address of every port.
            port: public gRPC port (``inference.GRPCInferenceService``, ``grpc.health.v1``); 0 lets
                the OS pick.
            peer_port: peer port (``mpnn.v1.Partition``, ``grpc.health.v1``), signed calls only;
                the lookup table names it; 0 lets the OS pick (see :attr:`peer_port`).
            workers: threads of the gRPC pool for calls, which both gRPC ports share; sets
                :attr:`pass_limit` and the ``ModelInfer`` cap (``limits``); the pool has
                :attr:`peer_stream_limit` more threads for inbound peer streams. None:
                ``limits.default_workers`` for the partitions of the lookup table read now (the
                pool keeps its size when a later table has more).
            http_port: Open Inference Protocol REST port; 0 lets the OS pick (see :attr:`http_port`);
                None serves no REST.

        With ``credentials.tls`` the peer port serves mutual TLS (clients verified against
        ``ca.crt``), the public gRPC port and REST serve TLS.

        Raises:
            OSError: a port cannot be bound. And whatever :meth:`load` raises.
        """
        partitions = LookupTable.load(self.lookup_path).num_partitions
        if workers is None:
            workers = default_workers(partitions)
        self.workers = workers
        self.pass_limit = pass_slots(workers)
        self._pass_slots = threading.Semaphore(self.pass_limit)
        self.inference.pass_limit = self.pass_limit
        self.peer_stream_limit = self.limits.max_peer_streams or peer_streams(partitions)
        # Peer streams hold a thread each for their whole life: they get threads beyond `workers`.
        self._executor = futures.ThreadPoolExecutor(max_workers=workers + self.peer_stream_limit,
                                                    thread_name_prefix="rpc")
        auth = AuthInterceptor(self.credentials.key, network=self.name, audiences=self._audiences)
        peer_server = grpc.server(self._executor, options=CHANNEL_OPTIONS, interceptors=[auth])
        pb_grpc.add_PartitionServicer_to_server(self, peer_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, peer_server)
        # The public port admits messages up to the public request limit; peers may send more.
        public_options = [("grpc.max_receive_message_length", self.limits.max_request_bytes),
                          ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        server = grpc.server(self._executor, options=public_options)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        inference_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.inference, max_calls=max_infer_calls(workers),
                              max_request_bytes=self.limits.max_request_bytes, metrics=self.metrics), server)
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        tls = self.credentials.tls
        try:
            if tls is None:
                self.peer_port = peer_server.add_insecure_port(f"{host}:{peer_port}")
                self.port = server.add_insecure_port(f"{host}:{port}")
            else:
                self.peer_port = peer_server.add_secure_port(f"{host}:{peer_port}", grpc.ssl_server_credentials(
                    [(tls.key, tls.cert)], root_certificates=tls.ca, require_client_auth=True))
                self.port = server.add_secure_port(f"{host}:{port}",
                                                   grpc.ssl_server_credentials([(tls.key, tls.cert)]))
        except RuntimeError as exc:  # grpc raises RuntimeError where older versions returned 0
            raise OSError(f"cannot bind {host}:{port} or {host}:{peer_port}: {exc}") from exc
        if self.port == 0 or self.peer_port == 0:
            raise OSError(f"cannot bind {host}:{port if self.port == 0 else peer_port}")
        if http_port is not None:
            self._rest = RestServer(self.inference, host, http_port, max_body_bytes=self.limits.max_request_bytes,
                                    max_inflight_bytes=self.limits.max_inflight_request_bytes,
                                    ssl_context=_server_ssl_context(tls) if tls is not None else None,
                                    metrics=self.metrics)
            self.http_port = self._rest.port
        try:
            self.load()
            peer_server.start()
            server.start()
            if self._rest is not None:
                self._rest.start()
        except BaseException:
            if self._rest is not None:
                self._rest.stop()
            peer_server.stop(0)
            server.stop(0)
            self._executor.shutdown(wait=False)
            raise
        self._grpc, self._peer_grpc = server, peer_server
        threading.Thread(target=self._watch_lookup, name="lookup-watch", daemon=True).start()
        log.info("serving", extra={"partition": self.index, "address": f"{host}:{self.port}",
                                   "peer_port": self.peer_port, "http_port": self.http_port, "tls": tls is not None})
        return self.port

    def _audiences(self) -> list[str]:
        """The peer addresses a signed call to this server may name: its own in the table served."""
        loaded = self._loaded
        if loaded is None or self.index >= loaded.table.num_partitions:
            return []
        return [loaded.table.addresses[self.index]]

    def stop(self, grace: float = 5.0) -> None:
        """Stop serving: REST first, then the public gRPC port, then the peer port, giving calls
        in progress up to ``grace`` seconds each. The peers' streams to this server end once no
        ``RunPass`` runs here (they carry its messages until then), not after the whole grace."""
        self._stop.set()
        self.health.enter_graceful_shutdown()
        if self._rest is not None:
            self._rest.stop(grace)
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        if self._peer_grpc is not None:
            stopped = self._peer_grpc.stop(grace)
            deadline = time.monotonic() + grace
            while self._passes_running and time.monotonic() < deadline:
                time.sleep(0.02)
            self.peers.close()  # our streams to the peers: what is queued is delivered, then they end
            with self._streams_lock:
                inbound = list(self._inbound)
            for context in inbound:
                context.cancel()
            stopped.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # grpc leaves its idle worker threads running
        self.inference.close()
        self.peers.close()

    def wait(self) -> None:
        """Block until the gRPC servers have stopped."""
        if self._grpc is not None:
            self._grpc.wait_for_termination()
        if self._peer_grpc is not None:
            self._peer_grpc.wait_for_termination()


def _server_ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    """REST's TLS: this server's certificate and key (client certificates not asked for)."""
    import tempfile

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # ssl loads a certificate chain from files only; a private temporary directory holds them
    # for the moment of loading.
    with tempfile.TemporaryDirectory(prefix="mpnn-tls-") as tmp:
        cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
        cert.write_bytes(tls.cert)
        key.touch(mode=0o600)
        key.write_bytes(tls.key)
        context.load_cert_chain(cert, key)
    return context
