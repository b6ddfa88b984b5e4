"""The partition server: one partition's neurons behind gRPC.

It loads the lookup table (a file: a mounted ConfigMap in a cluster), takes its
rows of every layer from the latest committed checkpoint on the shared volume
(or an imported PyTorch-layout file, or the seeded initialisation), and runs
the execution engine for the driver's ``RunPass`` calls, reaching its peers with
one ``Exchange`` message per (layer, peer, phase). It serves the standard
``grpc.health.v1`` health service, and re-reads the lookup when the file's
version changes, reloading the rows it now owns from the latest checkpoint.

It also answers the Open Inference Protocol v2 for the whole network, over gRPC
(``inference.GRPCInferenceService``, on the same port) and over HTTP/REST on a
second port: see ``inference.py`` and ``rest.py``.

Status codes: INVALID_ARGUMENT for a wrong shape or dtype, FAILED_PRECONDITION
for a lookup-version mismatch, DEADLINE_EXCEEDED when a peer's message does not
arrive before the call's deadline, UNAVAILABLE while no model is loaded,
RESOURCE_EXHAUSTED for an inference ``RunPass`` beyond :func:`step_slots` (retry),
CANCELLED for a ``RunPass`` whose caller has already gone, ABORTED for a failed exchange
or an inference ``RunPass`` whose ``weights_version`` this partition no longer keeps
("weights changed during the pass; retry", see ``engine.PartitionEngine``).

Threads: every RPC runs on one pool of ``workers`` threads, and a ``RunPass`` holds its
thread for the whole pass, waiting for the ``Exchange`` calls of its peers, which need
threads of the same pool. So inference Steps are bounded below the pool size
(:func:`step_slots`); one beyond the bound is refused at once instead of waiting, and
the threads left always serve ``Exchange`` (and Status, health, Checkpoint and the
inference API's own calls). Training Steps are not counted: an engine runs one at a
time, and one is reserved for. Entry points size their passes in flight from the same
bound (``ModelInference.step_limit``), so with equal pools the partitions do not refuse
each other's passes.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from partition_server import logs
from partition_server.api.channels import CHANNEL_OPTIONS
from partition_server.engine.passes import ExchangeError, OptimizerConfig, PartitionEngine
from partition_server.serving.inference import InferenceServicer, ModelInference
from partition_server.api.lookup import LookupTable
from partition_server.engine.mailbox import Mailbox
from partition_server.api.manifest import ModelSpec, parse_network_document
from partition_server.api.protos import grpc_predict_v2_pb2_grpc as inference_grpc
from partition_server.api.protos import mpnn_pb2 as pb
from partition_server.api.protos import mpnn_pb2_grpc as pb_grpc
from partition_server.testing.reference import init_params
from partition_server.serving.rest import RestServer
from partition_server.storage.store import ModelStore, StoreError, read_torch_rows
from partition_server.api.wire import from_tensor, to_tensor

log = logging.getLogger("mpnn.server")

SERVICE = "mpnn.v1.Partition"
DEFAULT_TIMEOUT = 60.0  # seconds, when a call carries no deadline


@dataclass(frozen=True)
class Loaded:
    """What the server currently serves: one lookup version and the engine built for it."""

    table: LookupTable
    engine: PartitionEngine
    source: str            # "checkpoint", "import" or "init"
    checkpoint: int        # checkpoint step, -1 without one


def step_slots(workers: int) -> int:
    """Inference ``RunPass`` calls a partition with ``workers`` pool threads runs at once.

    The pool also holds the inference API's ``ModelInfer`` calls (``workers // 4``), one
    training Step, and a reserve (``max(2, workers // 8)``) for Exchange, Status and health.
    """
    return max(1, workers - max_infer_calls(workers) - 1 - max(2, workers // 8))


def default_workers(partitions: int) -> int:
    """Pool size for ``partitions`` partitions: at least 32, and enough that every entry point
    plus one outside client can have a forward pass running at once (``step_slots >= P + 1``)."""
    workers = 32
    while step_slots(workers) < partitions + 1:
        workers += 8
    return workers


def max_infer_calls(workers: int) -> int:
    """``ModelInfer`` calls a partition's gRPC port handles at once (each waits for a whole pass)."""
    return max(1, workers // 4)


class Peers:
    """One channel per peer address, reused across calls; :meth:`retain` closes the ones a new
    lookup table no longer names."""

    def __init__(self) -> None:
        self._peers: dict[str, tuple[grpc.Channel, pb_grpc.PartitionStub]] = {}
        self._lock = threading.Lock()

    def stub(self, address: str) -> pb_grpc.PartitionStub:
        with self._lock:
            if address not in self._peers:
                channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
                self._peers[address] = (channel, pb_grpc.PartitionStub(channel))
            return self._peers[address][1]

    def addresses(self) -> list[str]:
        """Addresses with an open channel."""
        with self._lock:
            return list(self._peers)

    def retain(self, addresses: Iterable[str]) -> list[str]:
        """Close the channels to every address not in ``addresses``; returns those addresses.

        A pass still running under the previous table loses its calls to them (its partitions
        no longer serve that table anyway).
        """
        keep = set(addresses)
        with self._lock:
            gone = [a for a in self._peers if a not in keep]
            channels = [self._peers.pop(a)[0] for a in gone]
        for channel in channels:
            channel.close()
        return gone

    def close(self) -> None:
        with self._lock:
            channels = [channel for channel, _ in self._peers.values()]
            self._peers.clear()
        for channel in channels:
            channel.close()


class GrpcTransport:
    """The engine's transport over gRPC: sends with ``Exchange``, receives from this server's mailbox."""

    def __init__(self, server: "PartitionServer", table: LookupTable):
        self.server = server
        self.table = table

    def exchange(self, key: tuple, outgoing: dict[int, np.ndarray], expect, timeout: float) -> dict[int, np.ndarray]:
        pass_id, phase, layer = key
        calls = []
        for peer, arr in outgoing.items():
            tensor = to_tensor(arr)
            request = pb.ExchangeRequest(lookup_version=self.table.version, pass_id=pass_id, phase=phase,
                                         layer=layer, source=self.server.index, tensor=tensor)
            stub = self.server.peers.stub(self.table.addresses[peer])
            calls.append((peer, stub.Exchange.future(request, timeout=timeout)))
            self.server.count_sent(len(tensor.data))
        for peer, call in calls:
            try:
                call.result()
            except grpc.RpcError as exc:
                raise ExchangeError(f"partition {self.server.index}: sending {key!r} to partition {peer} "
                                    f"({self.table.addresses[peer]}) failed: {exc.code().name} {exc.details()}") from exc
        return self.server.mailbox.take_many(key, expect, timeout)


class PartitionServer(pb_grpc.PartitionServicer):
    """Serves partition ``index`` of the network ``name``.

    Args:
        index: partition index, 0..P-1.
        name: the network's name (``metadata.name``).
        model: its shape (inputs, layers, seed, optional import file).
        lookup_path: ``lookup.json``; re-read every ``poll_seconds`` seconds.
        model_dir: the network's directory on the shared volume (checkpoints live below it).

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
        self.step_limit = step_slots(self.workers)
        self._step_slots = threading.Semaphore(self.step_limit)
        self.port: int | None = None
        self.inference = ModelInference(name, model, self._served_table, self._weights_version)
        self._rest: RestServer | None = None
        self.http_port: int | None = None

    # ------------------------------------------------------------ loading

    def load(self) -> Loaded:
        """(Re)load the lookup table and this partition's rows from the newest source.

        Sources, first that exists: the latest committed checkpoint, ``model.weights``
        (PyTorch ``nn.Linear`` layout; relative paths are taken from the volume, the
        parent of ``model_dir``), the seeded initialisation of ``reference.init_params``.
        """
        with self._load_lock:
            table = LookupTable.load(self.lookup_path)
            if list(table.layer_units) != self.model.layer_units:
                raise ValueError(f"lookup {self.lookup_path}: layer units {list(table.layer_units)} differ "
                                 f"from the network's {self.model.layer_units}")
            if not 0 <= self.index < table.num_partitions:
                raise ValueError(f"partition {self.index} is not in the lookup's {table.num_partitions} partitions")
            ranges = {k: [(r.start, r.end) for r in table.ranges(k, self.index)] for k in range(table.num_layers)}
            owned = [k for k, rs in ranges.items() if rs]
            ckpt = self.store.latest()
            if ckpt is not None:
                optimizer = OptimizerConfig(**ckpt.meta["optimizer"]) if "optimizer" in ckpt.meta else None
                tensors = {k: {n: ckpt.read_rows(k, n, ranges[k]) for n in ckpt.tensor_names(k)} for k in owned}
                engine = self._engine(table, {k: (t["weight"], t["bias"]) for k, t in tensors.items()}, optimizer)
                engine.load_state(tensors, int(ckpt.meta.get("optimizer_step", 0)))
                loaded = Loaded(table, engine, "checkpoint", ckpt.step)
            elif self.model.weights:
                path = Path(self.model.weights)
                path = path if path.is_absolute() else self.model_dir.parent / path
                fan_in = [self.model.inputs] + self.model.layer_units[:-1]
                params = {k: read_torch_rows(path, k, ranges[k], fan_in[k], self.model.layer_units[k]) for k in owned}
                loaded = Loaded(table, self._engine(table, params), "import", -1)
            else:
                full = init_params(self.model.inputs, self.model.layers, self.model.seed)
                params = {k: (_rows(full[k][0], ranges[k]), _rows(full[k][1], ranges[k])) for k in owned}
                loaded = Loaded(table, self._engine(table, params), "init", -1)
            self._loaded = loaded
            closed = self.peers.retain(table.addresses)
        if closed:
            log.info("closed channels to addresses no longer in the lookup",
                     extra={"partition": self.index, "addresses": closed})
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        log.info("loaded", extra={"partition": self.index, "lookup_version": table.version,
                                  "source": loaded.source, "checkpoint": loaded.checkpoint,
                                  "neurons": table.neuron_count(self.index)})
        return loaded

    def _served_table(self) -> LookupTable | None:
        loaded = self._loaded
        return loaded.table if loaded is not None else None

    def _weights_version(self) -> int | None:
        loaded = self._loaded
        return loaded.engine.optimizer_step if loaded is not None else None

    def _engine(self, table: LookupTable, params: dict, optimizer: OptimizerConfig | None = None) -> PartitionEngine:
        return PartitionEngine(self.index, self.model.inputs, self.model.layers, table, params, optimizer)

    def _watch_lookup(self) -> None:
        """Reload when the lookup file's version changes (a ConfigMap update arrives as a file swap)."""
        while not self._stop.wait(self.poll_seconds):
            try:
                version = json.loads(self.lookup_path.read_text()).get("version")
            except (OSError, ValueError):
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

    def count_sent(self, nbytes: int) -> None:
        with self._counter_lock:
            self.messages_sent += 1
            self.bytes_sent += nbytes

    def RunPass(self, request: pb.PassRequest, context: grpc.ServicerContext) -> pb.PassReply:
        loaded = self._current(request.lookup_version, context)
        # A cancelled step (the driver saw another partition fail) wakes the engine waiting on its mailbox.
        if not context.add_callback(lambda: self.mailbox.discard(request.pass_id)):
            self.mailbox.discard(request.pass_id)
            context.abort(grpc.StatusCode.CANCELLED, f"partition {self.index}: step {request.pass_id} "
                                                     f"was cancelled before it started")
        if request.train:  # one at a time per engine; reserved for in step_slots()
            return self._step(loaded, request, context)
        if not self._step_slots.acquire(blocking=False):
            self.mailbox.discard(request.pass_id)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"partition {self.index}: {self.step_limit} forward passes are running, the most "
                          f"its {self.workers}-thread pool takes while keeping threads for Exchange; retry")
        try:
            return self._step(loaded, request, context)
        finally:
            self._step_slots.release()

    def _step(self, loaded: Loaded, request: pb.PassRequest, context: grpc.ServicerContext) -> pb.PassReply:
        engine = loaded.engine
        timeout = context.time_remaining() or DEFAULT_TIMEOUT
        try:
            x = from_tensor(request.inputs, "inputs", "float32", [None, self.model.inputs])
            transport = GrpcTransport(self, loaded.table)
            if request.train:
                y = from_tensor(request.labels, "labels", "int64", [x.shape[0]])
                if request.HasField("optimizer"):
                    engine.optimizer = OptimizerConfig(**_optimizer_fields(request.optimizer))
                result = engine.train_step(request.pass_id, x, y, transport, timeout)
                outputs, loss, correct = result.outputs, result.loss, result.correct
            else:
                version = request.weights_version if request.HasField("weights_version") else None
                outputs, loss, correct = engine.forward(request.pass_id, x, transport, timeout, version), None, None
        except ValueError as exc:
            self.mailbox.discard(request.pass_id)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except TimeoutError as exc:
            self.mailbox.discard(request.pass_id)
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
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
            # The sender's step ends by its deadline, and this partition's step of the same pass
            # by (about) the same one: a message still here well after it is never taken.
            ttl = 2 * (context.time_remaining() or DEFAULT_TIMEOUT) + 10.0
            self.mailbox.put((request.pass_id, request.phase, request.layer), request.source, arr, ttl)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.ExchangeReply()

    def Checkpoint(self, request: pb.CheckpointRequest, context: grpc.ServicerContext) -> pb.CheckpointReply:
        loaded = self._current(request.lookup_version, context)
        tensors, step = loaded.engine.state_snapshot()
        ranges = {k: loaded.engine.local_rows(k) for k in tensors}
        try:
            info = self.store.write_shard(request.sequence, self.index, tensors, ranges)
        except StoreError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"partition {self.index}: {exc}")
        except OSError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"partition {self.index}: writing the shard failed: {exc}")
        log.info("shard written", extra={"partition": self.index, "sequence": request.sequence})
        return pb.CheckpointReply(shard_json=json.dumps(info.to_dict()), optimizer_step=step)

    def Reload(self, request: pb.ReloadRequest, context: grpc.ServicerContext) -> pb.StatusReply:
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
            tensors = loaded.engine.state_tensors()
            reply.lookup_version = loaded.table.version
            reply.neurons = loaded.table.neuron_count(self.index)
            reply.parameters = sum(t["weight"].size + t["bias"].size for t in tensors.values())
            reply.checkpoint_sequence = loaded.checkpoint
            reply.weights_source = loaded.source
        return reply

    # ------------------------------------------------------------ lifecycle

    def start(self, host: str = "0.0.0.0", port: int = 50051, workers: int | None = None,
              http_port: int | None = None) -> int:
        """Load the model, bind, and serve in background threads. Returns the bound gRPC port.

        Args:
            host: bind address of both ports.
            port: gRPC port (``mpnn.v1.Partition``, ``grpc.health.v1``, ``inference.GRPCInferenceService``);
                0 lets the OS pick.
            workers: threads of the gRPC pool; sets :func:`step_slots` and :func:`max_infer_calls`.
                None: :func:`default_workers` for the partitions of the lookup table read now (the
                pool keeps its size when a later table has more).
            http_port: Open Inference Protocol REST port; 0 lets the OS pick (see :attr:`http_port`);
                None serves no REST.

        Raises:
            OSError: a port cannot be bound. And whatever :meth:`load` raises.
        """
        if workers is None:
            workers = default_workers(LookupTable.load(self.lookup_path).num_partitions)
        self.workers = workers
        self.step_limit = step_slots(workers)
        self._step_slots = threading.Semaphore(self.step_limit)
        self.inference.step_limit = self.step_limit
        self._executor = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc")
        server = grpc.server(self._executor, options=CHANNEL_OPTIONS)
        pb_grpc.add_PartitionServicer_to_server(self, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        inference_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.inference, max_calls=max_infer_calls(workers)), server)
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind {host}:{port}")
        if http_port is not None:
            self._rest = RestServer(self.inference, host, http_port)
            self.http_port = self._rest.port
        try:
            self.load()
        except BaseException:
            if self._rest is not None:
                self._rest.stop()
            raise
        server.start()
        self._grpc = server
        if self._rest is not None:
            self._rest.start()
        threading.Thread(target=self._watch_lookup, name="lookup-watch", daemon=True).start()
        log.info("serving", extra={"partition": self.index, "address": f"{host}:{self.port}",
                                   "http_port": self.http_port})
        return self.port

    def stop(self, grace: float = 5.0) -> None:
        self._stop.set()
        self.health.enter_graceful_shutdown()
        if self._rest is not None:
            self._rest.stop()
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # grpc leaves its idle worker threads running
        self.inference.close()
        self.peers.close()

    def wait(self) -> None:
        if self._grpc is not None:
            self._grpc.wait_for_termination()


def _rows(arr: np.ndarray, ranges: list[tuple[int, int]]) -> np.ndarray:
    return np.concatenate([arr[s:e] for s, e in ranges]) if ranges else arr[:0]


def _optimizer_fields(msg: pb.OptimizerConfig) -> dict[str, Any]:
    """Every field as sent: proto3 cannot tell an unset 0 from a real one (Adam's beta1 = 0 is
    valid), so the driver always sends the whole config and a missing value fails validation."""
    return {field: getattr(msg, field) for field in asdict(OptimizerConfig())}


def partition_from_hostname(hostname: str | None = None) -> int:
    """A StatefulSet pod's ordinal: ``digits-3`` → 3. Raises ValueError if the name has none."""
    hostname = hostname or socket.gethostname()
    m = re.search(r"-(\d+)$", hostname.split(".")[0])
    if not m:
        raise ValueError(f"partition: not given (--partition / MPNN_PARTITION) and hostname {hostname!r} has no ordinal")
    return int(m.group(1))


PARENT_PID_ENV = "MPNN_PARENT_PID"


def exit_with_parent(parent_pid: int) -> None:
    """Ask Linux for SIGTERM when the parent process dies (``PR_SET_PDEATHSIG``), so a local
    server never outlives ``mpnn run``, even one killed with SIGKILL. Done here, after exec,
    rather than in a ``preexec_fn``, which would make the parent fork() with gRPC threads running.

    Raises:
        SystemExit: the parent already died before the request took effect.
    """
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        raise SystemExit(f"partition server: parent process {parent_pid} is gone")


def main(args: Any) -> int:
    """``mpnn serve``: run one partition server until SIGTERM or SIGINT (or, started by
    ``mpnn run``, until its parent dies)."""
    logs.configure(args.log_level)
    if os.environ.get(PARENT_PID_ENV):
        exit_with_parent(int(os.environ[PARENT_PID_ENV]))
    index = args.partition if args.partition is not None else partition_from_hostname()
    name, model = parse_network_document(json.loads(Path(args.network).read_text()))
    server = PartitionServer(index, name, model, args.lookup, args.model_dir)
    server.start(args.host, args.port, http_port=args.http_port or None)
    done = threading.Event()

    def shutdown(signum, frame):  # noqa: ARG001 - signal handler signature
        log.info("stopping", extra={"partition": index, "signal": signum})
        done.set()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    while not done.wait(1.0):
        pass
    server.stop()
    return 0
