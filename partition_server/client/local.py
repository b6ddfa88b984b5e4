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
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from partition_server.data.datasets import load_dataset
from partition_server.api.distributor import Distribution, distribute
from partition_server.client.driver import Driver, DriverError
from partition_server.client.training_loop import Recovery, Rescale, train
from partition_server.api.lookup import LookupTable, loopback_addresses
from partition_server.api.manifest import ManifestError, NeuralNetwork, load_manifest, network_document
from partition_server.api.environment import PARENT_PID_ENV
from partition_server.api.peer_auth import PeerCredentials, TlsFiles, generate_key, write_key
from partition_server.storage.atomic import write_atomically
from partition_server.storage.store import ModelStore

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class ServerCrashed(RuntimeError):
    """A partition server process exited while it was needed; the message names it."""


class Terminated(Exception):
    """SIGTERM arrived: stop the servers and clean up as for Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
    raise Terminated()


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that were free a moment ago (the OS picks them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


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
        env = {**{var: threads for var in BLAS_THREAD_VARS}, **os.environ, PARENT_PID_ENV: str(os.getpid())}
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


def _resolve_weights(net: NeuralNetwork, manifest_path: Path) -> NeuralNetwork:
    """Relative ``spec.model.weights`` are relative to the manifest's directory in local mode."""
    weights = net.model.weights
    if weights and not Path(weights).is_absolute():
        weights = str((manifest_path.parent / weights).resolve())
        return replace(net, model=replace(net.model, weights=weights))
    return net


def main(args: Any) -> int:
    """``mpnn run``. Returns an exit code: 0 ok, 1 failure or crashed server, 2 invalid input,
    130 Ctrl-C, 143 SIGTERM."""
    manifest_path = Path(args.manifest)
    net = _resolve_weights(load_manifest(manifest_path), manifest_path)
    if args.partitions is not None:
        net = net.with_partitions(args.partitions)
    if args.epochs is not None and net.training:
        if args.epochs < 1:
            raise ManifestError("--epochs", args.epochs, "must be at least 1")
        net = replace(net, training=replace(net.training, epochs=args.epochs))
    predict_input = _load_predict_input(args, net)
    for text in getattr(args, "repartition", None) or []:  # a usage error before anything runs
        parse_repartition(text, net)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _run(args, net, predict_input)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: Any, net: NeuralNetwork, predict_input: np.ndarray | None) -> int:
    stack = ExitStack()
    with stack:
        if args.workdir:
            workdir = Path(args.workdir).resolve()
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mpnn-")))
        deployment = LocalDeployment(net, workdir, tls_dir=getattr(args, "tls_dir", None),
                                     max_restarts=args.max_restarts)
        try:
            stack.enter_context(deployment)
            driver = stack.enter_context(Driver(deployment.table, credentials=deployment.credentials))
            driver.wait_ready(timeout=120, alive=deployment.check_alive)
            return _work(args, net, deployment, driver, predict_input, workdir)
        except KeyboardInterrupt:
            print("mpnn run: interrupted; servers stopped", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Terminated:
            print("mpnn run: terminated; servers stopped", file=sys.stderr)
            return EXIT_TERMINATED
        except ServerCrashed as exc:
            print(f"mpnn run: error: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        except DriverError as exc:
            print(f"mpnn run: error: {deployment.find_crash() or exc}", file=sys.stderr)
            return EXIT_FAILURE


def _load_predict_input(args: Any, net: NeuralNetwork) -> np.ndarray | None:
    if not args.predict:
        if args.output:
            raise ManifestError("--output", args.output, "needs --predict INPUT.npy")
        return None
    if not args.output:
        raise ManifestError("--output", None, "--predict needs --output OUT.npy")
    if not Path(args.output).resolve().parent.is_dir():
        raise ManifestError("--output", args.output, "its directory does not exist")
    try:
        x = np.load(args.predict, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ManifestError("--predict", args.predict, f"cannot be read as a .npy array: {exc}") from exc
    if x.ndim != 2 or x.shape[1] != net.model.inputs:
        raise ManifestError("--predict", list(x.shape), f"must be shaped [batch, {net.model.inputs}]")
    if not np.issubdtype(x.dtype, np.number):
        raise ManifestError("--predict", str(x.dtype), "must hold numbers")
    return x.astype(np.float32)


def _work(args: Any, net: NeuralNetwork, deployment: LocalDeployment, driver: Driver,
          predict_input: np.ndarray | None, workdir: Path) -> int:
    if predict_input is not None:
        outputs = driver.predict(predict_input)
        np.save(args.output, outputs)
        print(f"wrote {args.output}: outputs {list(outputs.shape)} float32", file=sys.stderr)
        return _serve_forever(args, deployment) if args.serve else EXIT_OK
    summary: dict[str, Any] = {"partitions": net.partitions, "strategy": net.distribution.strategy,
                               "lookupVersion": deployment.table.version, "workdir": str(workdir)}
    if net.training is not None:
        path = args.data or net.training.dataset.path
        if path and not args.data and not Path(path).is_absolute():
            path = str(workdir / path)
        data = load_dataset(net.training.dataset.format, path)
        store = ModelStore(deployment.model_dir)
        recoveries: list[dict[str, Any]] = []
        recovery = Recovery(wait_seconds=120.0, max_recoveries=max(args.max_restarts, 1) * 3,
                            restart=deployment.restart_crashed, report=_recovery_reporter(recoveries))
        current = [driver]  # the driver of each table the run used; the first is closed by the caller
        try:
            result = train(driver, data, net.training, store, net.model, show_bar=not args.json, recovery=recovery,
                           rescales=[Rescale(at, lambda d, apply=apply: current.append(apply(d)) or current[-1])
                                     for at, apply in _rescales(args, net, deployment)])
            driver = current[-1]
            evaluation = driver.evaluate(data.x_test, data.y_test)
            messages, nbytes = driver.traffic()
        finally:
            for extra in current[1:]:
                extra.close()
        summary.update(accuracy=round(evaluation.accuracy, 6), loss=round(evaluation.loss, 6),
                       epochs=net.training.epochs, train_seconds=round(result.seconds, 3),
                       steps=result.steps, messages=messages, bytes_sent=nbytes,
                       checkpoint=result.checkpoint, dataset=data.name,
                       train_samples=len(data.x_train), test_samples=len(data.x_test),
                       restarts=deployment.restarts, recoveries=recoveries,
                       final_partitions=deployment.net.partitions, final_strategy=deployment.net.distribution.strategy,
                       lookupVersion=deployment.table.version)
    else:
        messages, nbytes = driver.traffic()
        summary.update(messages=messages, bytes_sent=nbytes)
    if args.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    return _serve_forever(args, deployment) if args.serve else EXIT_OK


def parse_repartition(text: str, net: NeuralNetwork) -> tuple[int, NeuralNetwork]:
    """``STEP:PARTITIONS[:STRATEGY]`` (``--repartition``): after step STEP, run on PARTITIONS
    partitions, distributed by STRATEGY: ``balanced``, or ``layers`` (whole layers, cut into
    PARTITIONS contiguous near-equal runs); without it, the manifest's strategy.

    Raises:
        ManifestError: malformed, or the distribution does not fit the network.
    """
    parts = text.split(":")
    try:
        step, partitions = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise ManifestError("--repartition", text, "must be STEP:PARTITIONS[:balanced|layers]") from None
    if step < 1 or partitions < 1 or len(parts) > 3:
        raise ManifestError("--repartition", text, "must be STEP:PARTITIONS[:balanced|layers], STEP and PARTITIONS >= 1")
    strategy = parts[2] if len(parts) == 3 else None
    distribution = net.distribution
    if strategy == "balanced":
        distribution = Distribution()
    elif strategy == "layers":
        layers = len(net.model.layer_units)
        if partitions > layers:
            raise ManifestError("--repartition", text, f"layers gives each of {partitions} partitions a whole layer; "
                                                       f"the network has {layers}")
        cuts = [round(i * layers / partitions) for i in range(partitions + 1)]
        distribution = Distribution("layers", layers=tuple(tuple(range(cuts[i], cuts[i + 1]))
                                                           for i in range(partitions)))
    elif strategy is not None:
        raise ManifestError("--repartition", text, "STRATEGY must be balanced or layers")
    return step, replace(net, distribution=distribution).with_partitions(partitions)


def _rescales(args: Any, net: NeuralNetwork, deployment: LocalDeployment) -> list[tuple[int, Any]]:
    """``(step, apply)`` per ``--repartition``, in step order; ``apply(driver)`` repartitions the
    deployment, reloads every server from the checkpoint just committed and returns the new driver."""
    plans = sorted((parse_repartition(text, net) for text in (getattr(args, "repartition", None) or [])),
                   key=lambda plan: plan[0])

    def applier(target: NeuralNetwork):
        def apply(old: Driver) -> Driver:
            old.close_training()  # the kept servers take the new driver's session at once
            table = deployment.repartition(target)
            new = Driver(table, timeout=old.timeout, credentials=deployment.credentials)
            try:
                new.wait_ready(timeout=120, alive=deployment.check_alive)
                replies = new.reload()
            except BaseException:
                new.close()
                raise
            stale = [r.partition for r in replies if r.lookup_version != table.version]
            if stale:
                raise DriverError(f"partitions {stale} did not take lookup {table.version}")
            print(f"mpnn run: repartitioned to {target.partitions} partitions ({target.distribution.strategy}); "
                  f"lookup {table.version[:19]}", file=sys.stderr, flush=True)
            return new
        return apply

    return [(step, applier(target)) for step, target in plans]


def _recovery_reporter(recoveries: list[dict[str, Any]]):
    """A ``Recovery.report`` that tells the user and keeps each resumption for the summary."""
    def report(event: dict[str, Any]) -> None:
        if event["event"] == "unavailable":
            print(f"mpnn run: step {event['step'] + 1} failed ({event['error'].splitlines()[0]}); waiting up to "
                  f"{event['wait_seconds']:.0f} s for every partition, then resuming from the last committed "
                  f"checkpoint", file=sys.stderr, flush=True)
        else:
            recoveries.append({"resumed_at_step": event["step"], "lost_steps": event["lost_steps"],
                               "seconds": round(event["seconds"], 3), "checkpoint": event["checkpoint"],
                               "resumed_at": time.time()})
            print(f"mpnn run: resumed at step {event['step']} from checkpoint {event['checkpoint']} after "
                  f"{event['seconds']:.1f} s; {event['lost_steps']} steps redone", file=sys.stderr, flush=True)
    return report


def _print_summary(summary: dict[str, Any]) -> None:
    if "accuracy" in summary:
        print(f"test accuracy {summary['accuracy']:.4f}  loss {summary['loss']:.4f}  "
              f"({summary['test_samples']} held-out {summary['dataset']} samples)")
        print(f"trained {summary['epochs']} epochs, {summary['steps']} steps in {summary['train_seconds']:.1f} s "
              f"on {summary['partitions']} partitions ({summary['strategy']}); "
              f"{summary['messages']} messages, {summary['bytes_sent'] / 1e6:.1f} MB between partitions")
    else:
        print(f"{summary['partitions']} partitions ({summary['strategy']}) served; no spec.training, nothing trained")


def _serve_forever(args: Any, deployment: LocalDeployment) -> int:
    """Print the endpoints, then wait for Ctrl-C or a crashed server.

    The first lines name partition 0's Open Inference Protocol endpoints, ``REST  http://HOST:PORT``
    and ``gRPC  HOST:PORT``; every partition is an entry point, and the indented lines list them all.
    """
    table, name, host = deployment.table, deployment.net.name, deployment.host
    scheme = "https" if deployment.tls_dir else "http"
    tls = f" with TLS (CA: {deployment.tls_dir / 'ca.crt'})" if deployment.tls_dir else ""
    print(f"model {name!r} (Open Inference Protocol v2, KServe / Triton clients){tls}:")
    print(f"REST  {scheme}://{host}:{deployment.http_ports[0]}")
    print(f"gRPC  {host}:{deployment.ports[0]}")
    print("partition servers (any is an entry point; the peer port takes only signed mpnn.v1.Partition calls):")
    for i, address in enumerate(table.addresses):
        print(f"  {i}  REST {scheme}://{host}:{deployment.http_ports[i]}  gRPC {host}:{deployment.ports[i]}  "
              f"peer {address}")
    print("Ctrl-C stops them.", flush=True)
    while True:
        # A crashed server is started again (it loads the current checkpoint) within --max-restarts;
        # beyond that, ServerCrashed ends the run naming it.
        deployment.restart_crashed(wait=0.0)
        time.sleep(0.2)
