"""Shared helpers for the data-plane tests: partition servers in this process, on loopback.

``Cluster`` starts ``PartitionServer`` objects (real gRPC servers on 127.0.0.1, real
``Exchange`` calls between them) for one lookup table, the way ``LocalDeployment`` lays out
a workdir: ``lookup.json`` and ``network.json`` beside the network's model directory. Ports
are chosen before the table is written, because every server reads its peers' addresses
from it. Being in-process, the tests can also read each engine's state and gradients.

Also: the tiny network every data-plane test uses, seeded batches, and ``/proc`` helpers to
find ``mpnn serve`` processes by their workdir.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable, Sequence

import grpc
import numpy as np

from partition_server.api.peer_auth import PeerCredentials, generate_key
from partition_server.api.distributor import Distribution, distribute
from partition_server.client.driver import Driver
from partition_server.engine import OptimizerConfig, init_params
from partition_server.client.ports import free_ports
from partition_server.storage.atomic import write_atomically
from partition_server.api.lookup import LookupTable, loopback_addresses
from partition_server.api.manifest import LayerSpec, ModelSpec
from partition_server.api.protos import mpnn_pb2_grpc as pb_grpc
from partition_server.testing import ReferenceNetwork, gather_rows
from partition_server.serving.limits import ServerLimits
from partition_server.serving.server import PartitionServer

HOST = "127.0.0.1"
NAME = "tiny"
INPUTS = 10
LAYERS = (LayerSpec(12, "relu"), LayerSpec(7, "tanh"), LayerSpec(5, "softmax"))
MODEL = ModelSpec(INPUTS, LAYERS, seed=7)
UNITS = [layer.units for layer in LAYERS]
BATCH = 9
TOL = dict(rtol=1e-5, atol=1e-5)


def batch(seed: int, n: int = BATCH, model: ModelSpec = MODEL) -> tuple[np.ndarray, np.ndarray]:
    """A reproducible ``(x [n, inputs] float32, y [n] int64)``."""
    rng = np.random.default_rng([1234, seed])
    x = rng.normal(size=(n, model.inputs)).astype(np.float32)
    y = rng.integers(0, model.layers[-1].units, size=n).astype(np.int64)
    return x, y


def reference(model: ModelSpec = MODEL, optimizer: OptimizerConfig | None = None) -> ReferenceNetwork:
    """The single-process network with the servers' seeded initial parameters."""
    return ReferenceNetwork(model.inputs, model.layers, init_params(model.inputs, model.layers, model.seed),
                            optimizer)


def network_document(name: str, model: ModelSpec) -> dict:
    return {"apiVersion": "mpnn.dev/network/v1", "name": name, **model.shape_dict(),
            "seed": model.seed, "weights": model.weights}


def build_table(addresses: Sequence[str], distribution: Distribution, model: ModelSpec = MODEL,
                name: str = NAME) -> LookupTable:
    assignment = distribute(model.layer_units, len(addresses), distribution)
    return LookupTable.build(name, model.layer_units, assignment, list(addresses))


class Cluster:
    """``P`` in-process partition servers for one table, rooted at ``root`` (the "volume").

    Args:
        root: directory holding ``lookup.json``, ``network.json`` and ``<name>/`` (model dir).
        partitions: P.
        distribution: the distributor strategy.
        start: which partitions to start (default: all); the others are in the table only.
        poll_seconds: how often servers re-read ``lookup.json``.
        ports: reuse these ports (e.g. to restart under a new table), else free ones.
        credentials: the network's peer key and TLS files (default: a new key, no TLS).
    """

    def __init__(self, root: Path, partitions: int, distribution: Distribution = Distribution(),
                 model: ModelSpec = MODEL, name: str = NAME, start: Iterable[int] | None = None,
                 poll_seconds: float = 3600.0, ports: Sequence[int] | None = None,
                 credentials: PeerCredentials | None = None, limits: ServerLimits | None = None):
        self.root = Path(root)
        # Tests open many drivers one after another without closing each: a session may be
        # replaced as soon as it has no training pass running (tests/security checks the lease).
        self.limits = limits if limits is not None else ServerLimits(training_lease_seconds=0.0)
        self.model = model
        self.name = name
        self.ports = list(ports) if ports is not None else free_ports(partitions, HOST)
        self.table = build_table(loopback_addresses(self.ports, HOST), distribution, model, name)
        self.model_dir = self.root / name
        self.lookup_path = self.root / "lookup.json"
        self.poll_seconds = poll_seconds
        self.servers: dict[int, PartitionServer] = {}
        self.credentials = credentials or PeerCredentials(name, generate_key())
        self._drivers: list[Driver] = []
        self._channels: list[grpc.Channel] = []
        self._start = list(range(partitions)) if start is None else list(start)

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> "Cluster":
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.write_lookup(self.table)
        write_atomically(self.root / "network.json", json.dumps(network_document(self.name, self.model)))
        try:
            for i in self._start:
                server = PartitionServer(i, self.name, self.model, self.lookup_path, self.model_dir,
                                         poll_seconds=self.poll_seconds, credentials=self.credentials,
                                         limits=self.limits)
                self.servers[i] = server
                server.start(HOST, 0, peer_port=self.ports[i])
                bound = server.peer_port
                assert bound == self.ports[i], f"partition {i} bound {bound}, the table says {self.ports[i]}"
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for d in self._drivers:
            d.close()
        for c in self._channels:
            c.close()
        self._drivers.clear()
        self._channels.clear()
        for server in self.servers.values():
            server.stop(grace=0.5)
            # grpc leaves the server's worker pool alive; end its idle threads.
            pool = getattr(getattr(server._grpc, "_state", None), "thread_pool", None)
            if pool is not None:
                pool.shutdown(wait=False)
        self.servers.clear()

    def write_lookup(self, table: LookupTable) -> None:
        write_atomically(self.lookup_path, table.to_json())

    # ------------------------------------------------------------ clients

    def driver(self, table: LookupTable | None = None, timeout: float = 60.0) -> Driver:
        d = Driver(table or self.table, timeout=timeout, credentials=self.credentials)
        self._drivers.append(d)
        return d

    def stub(self, i: int) -> pb_grpc.PartitionStub:
        return pb_grpc.PartitionStub(self.channel(i))

    def channel(self, i: int) -> grpc.Channel:
        """A channel to partition ``i``'s peer port whose calls are signed with the network's key."""
        channel = self.credentials.channel(self.table.addresses[i])
        self._channels.append(channel)
        return channel

    def unsigned_channel(self, i: int) -> grpc.Channel:
        """A plain channel to partition ``i``'s peer port: what any other caller has."""
        channel = grpc.insecure_channel(self.table.addresses[i])
        self._channels.append(channel)
        return channel

    # ------------------------------------------------------------ engine state (in-process only)

    def engines(self) -> dict:
        return {i: s._loaded.engine for i, s in self.servers.items()}

    def _assemble(self, table: LookupTable, per_partition: dict[int, dict[int, np.ndarray]], layer: int) -> np.ndarray:
        owners = table.partitions_in_layer(layer)
        return gather_rows(table, layer, {p: per_partition[p][layer] for p in owners})

    def tensor(self, layer: int, name: str) -> np.ndarray:
        """Tensor ``name`` (``weight``, ``bias``, ``weight.momentum``, ...) of ``layer``, all rows."""
        table = next(iter(self.servers.values()))._loaded.table
        parts = {i: {k: t[name] for k, t in e.state_tensors().items()} for i, e in self.engines().items()}
        return self._assemble(table, parts, layer)

    def params(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.tensor(k, "weight"), self.tensor(k, "bias")) for k in range(len(self.model.layers))]

    def grads(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The last training step's ``(dW, db)`` per layer, from every engine's ``last_grads``."""
        table = next(iter(self.servers.values()))._loaded.table
        engines = self.engines()
        out = []
        for k in range(len(self.model.layers)):
            dw = self._assemble(table, {i: {l: g[0] for l, g in e.last_grads.items()} for i, e in engines.items()}, k)
            db = self._assemble(table, {i: {l: g[1] for l, g in e.last_grads.items()} for i, e in engines.items()}, k)
            out.append((dw, db))
        return out


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; return it. AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------- processes (/proc, no psutil)

def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")[:-1] if raw else None


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def serve_processes(marker: str | os.PathLike) -> dict[int, int]:
    """Live ``mpnn serve`` processes whose command line mentions ``marker`` (a unique workdir):
    ``{partition: pid}``."""
    marker = str(marker)
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        args = _cmdline(pid)
        if not args or "serve" not in args or not any(marker in a for a in args) or _is_zombie(pid):
            continue
        try:
            found[int(args[args.index("--partition") + 1])] = pid
        except (ValueError, IndexError):
            found[-pid] = pid
    return found
