"""Local mode: the data plane of a manifest as processes on one machine (``mpnn run``).

Same distributor, lookup, engine and store as in a cluster: N ``mpnn serve``
processes on loopback, a directory standing in for the NFS volume, and the
lookup table written to a file instead of a ConfigMap. Every server process
stops when ``mpnn run`` ends, however it ends (normal exit, Ctrl-C, a crashed
server, or the parent being killed: the children get SIGKILL via
``PR_SET_PDEATHSIG``).

Workdir layout (the volume)::

    <workdir>/lookup.json, network.json     # what the ConfigMap holds in a cluster
    <workdir>/peer-key                      # this run's peer key (mode 0600), new every run
    <workdir>/<name>/checkpoints/...        # the network's model directory
    <workdir>/logs/partition-<i>.log        # each server's JSON log lines

Every server also answers the Open Inference Protocol v2 for the whole network on
its public gRPC port and on a REST port of its own; ``--serve`` prints them. The peer
ports (``mpnn.v1.Partition``, the addresses in lookup.json) admit only calls signed
with the peer key ``mpnn run`` generates for the run (``api.peer_auth``).

A server that crashes is started again on its ports, up to ``--max-restarts`` times in all
(:meth:`LocalDeployment.restart_crashed`): during training the driver then brings every
partition back to the last committed checkpoint and resumes (``training_loop.Recovery``); while
serving, the restarted server loads the current checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from partition_server.api.distributor import distribute
from partition_server.api.lookup import LookupTable, loopback_addresses
from partition_server.api.manifest import NeuralNetwork, network_document
from partition_server.api.environment import ALLOCATOR_ENV, PARENT_PID_ENV
from partition_server.api.peer_auth import PeerCredentials, TlsFiles, generate_key, write_key
from partition_server.storage.atomic import write_atomically
from partition_server.client.ports import free_ports

BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class ServerCrashed(RuntimeError):
    """A partition server process exited while it was needed; the message names it."""


class LocalDeployment:
    """N partition server processes for one network, on loopback.

    Args:
        net: the validated manifest.
        workdir: the directory standing in for the shared volume.
        host: loopback address to bind.
        tls_dir: a directory of ``tls.crt``, ``tls.key`` and ``ca.crt`` (``mpnn run --tls-dir``):
            the servers serve mutual TLS to each other and TLS on their public ports; None: plaintext.

        max_restarts: crashed servers :meth:`restart_crashed` starts again, in all.

    Attributes:
        restarts: servers restarted so far.

    Use as a context manager: entering starts the servers and waits until all are
    SERVING; leaving stops every one of them.

    Attributes:
        table: the lookup table; its addresses are the servers' peer ports.
        ports, http_ports: each server's public gRPC and REST ports.
        credentials: this deployment's peer key (a new one per deployment), for drivers.
    """

    def __init__(self, net: NeuralNetwork, workdir: Path, host: str = "127.0.0.1", tls_dir: Path | None = None,
                 *, max_restarts: int = 0):
        self.net = net
        self.workdir = Path(workdir)
        self.host = host
        self.max_restarts = max_restarts
        self.restarts = 0
        self.model_dir = self.workdir / net.name
        self.procs: list[subprocess.Popen] = []
        p = net.partitions
        ports = free_ports(3 * p, host)
        self.ports, self.http_ports = ports[p:2 * p], ports[2 * p:]
        assignment = distribute(net.model.layer_units, net.partitions, net.distribution)
        self.table = LookupTable.build(net.name, net.model.layer_units, assignment,
                                       loopback_addresses(ports[:p], host))
        self.tls_dir = Path(tls_dir).resolve() if tls_dir else None
        tls = TlsFiles.from_dir(self.tls_dir) if self.tls_dir else None  # FieldError now, not in N servers
        self.credentials = PeerCredentials(net.name, generate_key(), tls)
        self.key_path = self.workdir / "peer-key"

    def log_path(self, i: int) -> Path:
        return self.workdir / "logs" / f"partition-{i}.log"

    def __enter__(self) -> "LocalDeployment":
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self.model_dir.mkdir(exist_ok=True)
        write_atomically(self.workdir / "lookup.json", self.table.to_json())
        write_atomically(self.workdir / "network.json", json.dumps(network_document(self.net), indent=2))
        write_key(self.key_path, self.credentials.key)
        try:
            for i in range(self.net.partitions):
                self.procs.append(self._spawn(i))
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, i: int) -> subprocess.Popen:
        peer_port = self.table.addresses[i].rsplit(":", 1)[1]
        cmd = [sys.executable, "-m", "partition_server.cli", "serve", "--partition", str(i),
               "--lookup", str(self.workdir / "lookup.json"), "--network", str(self.workdir / "network.json"),
               "--model-dir", str(self.model_dir), "--host", self.host, "--port", str(self.ports[i]),
               "--peer-port", peer_port, "--http-port", str(self.http_ports[i]),
               "--peer-key-file", str(self.key_path)]
        if self.tls_dir is not None:
            cmd += ["--tls-dir", str(self.tls_dir)]
        # N servers on one machine: BLAS thread pools sized for the whole machine each would
        # oversubscribe the cores (measured: 6x slower steps with 4 servers on 2 cores).
        threads = str(max(1, (os.cpu_count() or 1) // self.net.partitions))
        env = {**{var: threads for var in BLAS_THREAD_VARS}, **ALLOCATOR_ENV, **os.environ,
               PARENT_PID_ENV: str(os.getpid())}
        with open(self.log_path(i), "ab") as log:
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env)

    def describe_exit(self, i: int, code: int) -> str:
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
        tail = self.log_path(i).read_text(errors="replace").strip().splitlines()[-5:]
        return (f"partition server {i} ({self.net.name}-{i}, pid {self.procs[i].pid}, {self.table.addresses[i]}) "
                f"exited with {how}; last log lines:\n  " + "\n  ".join(tail))

    def check_alive(self) -> None:
        """Raise :class:`ServerCrashed` if a server has exited."""
        crash = self.find_crash(wait=0.0)
        if crash:
            raise ServerCrashed(crash)

    def find_crash(self, wait: float = 2.0) -> str | None:
        """Describe the first server that has exited, polling up to ``wait`` seconds; None if all run.

        A failed call usually reaches the driver as a peer's error (``sending ... to partition 1
        failed``); the dead process is what the user needs named.
        """
        deadline = time.monotonic() + wait
        while True:
            for i, proc in enumerate(self.procs):
                code = proc.poll()
                if code is not None:
                    return self.describe_exit(i, code)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def restart_crashed(self, error: Exception | None = None, wait: float = 2.0) -> list[int]:
        """Start every server that has exited again, on its ports; returns their indexes.

        A failed call may reach the driver before the dead process is reaped: polls up to ``wait``
        seconds for one to show. None crashed (a stall, a deadline): nothing is restarted.

        Raises:
            ServerCrashed: restarting would exceed ``max_restarts``; names the server.
        """
        del error  # the call that failed; the processes say which server it was
        deadline = time.monotonic() + wait
        crashed: list[int] = []
        while not crashed:
            crashed = [i for i, proc in enumerate(self.procs) if proc.poll() is not None]
            if crashed or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        for i in crashed:
            if self.restarts >= self.max_restarts:
                raise ServerCrashed(f"{self.describe_exit(i, self.procs[i].returncode)}\n"
                                    f"not restarted: {self.restarts} of --max-restarts {self.max_restarts} used")
            self.restarts += 1
            print(f"mpnn run: {self.describe_exit(i, self.procs[i].returncode).splitlines()[0]}; restarting it "
                  f"({self.restarts} of --max-restarts {self.max_restarts})", file=sys.stderr, flush=True)
            self.procs[i] = self._spawn(i)
        return crashed

    def repartition(self, net: NeuralNetwork) -> LookupTable:
        """Move to ``net``'s partition count and distribution: stop the servers beyond it, write the
        new ``lookup.json`` (partitions kept keep their ports), start the new ones. The kept servers
        serve their old rows until they reload (``Reload``, or their lookup watch). Returns the table.
        """
        assignment = distribute(net.model.layer_units, net.partitions, net.distribution)
        peer = [int(a.rsplit(":", 1)[1]) for a in self.table.addresses[:net.partitions]]
        public, http = self.ports[:net.partitions], self.http_ports[:net.partitions]
        grow = net.partitions - len(peer)
        if grow > 0:
            fresh = free_ports(3 * grow, self.host)
            peer, public, http = peer + fresh[:grow], public + fresh[grow:2 * grow], http + fresh[2 * grow:]
        for proc in self.procs[net.partitions:]:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs[net.partitions:]:
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        del self.procs[net.partitions:]
        self.net, self.ports, self.http_ports = net, public, http
        self.table = LookupTable.build(net.name, net.model.layer_units, assignment, loopback_addresses(peer, self.host))
        write_atomically(self.workdir / "lookup.json", self.table.to_json())
        for i in range(len(self.procs), net.partitions):
            self.procs.append(self._spawn(i))
        return self.table

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM every server, then SIGKILL whatever is left after ``grace`` seconds."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
