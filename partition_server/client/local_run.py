"""``mpnn run``: the command around :class:`~partition_server.client.local.LocalDeployment`.

:func:`main` reads the manifest and the command's options, starts the local deployment, then
trains (with recovery from crashed servers and ``--repartition`` rescales), predicts or serves,
and turns what happened into an exit code.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from partition_server.data.datasets import load_dataset
from partition_server.api.distributor import Distribution
from partition_server.client.driver import Driver, DriverError
from partition_server.client.local import LocalDeployment, ServerCrashed
from partition_server.client.training_loop import Recovery, Rescale, train
from partition_server.api.manifest import ManifestError, NeuralNetwork, load_manifest
from partition_server.storage.store import ModelStore

__all__ = ["main", "parse_repartition"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class Terminated(Exception):
    """SIGTERM arrived: stop the servers and clean up as for Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
    raise Terminated()


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
