"""One training step of a network split over 4 partitions versus the single-process reference.

For each width W the network is ``inputs=W``, layers ``[W relu, W relu, 10 softmax]`` (seeded
initialisation, ``engine.init_params``), trained with SGD (lr 0.01, momentum 0.9), one
batch of ``--batch`` random examples. A "step" is forward, backward and the optimizer update.
Three ways of running it are timed, each as the median of ``--repeats`` steps after one
warm-up step:

- ``reference``: ``ReferenceNetwork.train_step``, whole matrices in one process.
- ``local``: 4 ``PartitionEngine``s (balanced assignment) as 4 threads of this process over
  ``LocalTransport``: the engine and its all-gather/reduce-scatter, no serialisation, no gRPC.
- ``grpc``: 4 ``PartitionServer`` objects started *in this process* on 127.0.0.1 (real gRPC
  servers with real ``Exchange`` messages over loopback, one ``ExchangeStream`` per pair,
  raw-bytes tensors, one message per (layer, peer, phase)), driven by ``Driver.step``. One process means one GIL for all four
  servers and the driver; numpy's matrix products release it.
- ``grpc_processes``: the same over 4 ``mpnn serve`` processes, as ``mpnn run`` starts them.

Messages and bytes per step come from ``Driver.traffic()`` deltas over the timed steps.

    .venv/bin/python bench/engine.py [--widths 256 1024 4096] [--repeats 5] [--batch 128]

Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from partition_server.api.distributor import Distribution, distribute  # noqa: E402
from partition_server.client.driver import Driver  # noqa: E402
from partition_server.engine import OptimizerConfig, PartitionEngine, init_params  # noqa: E402
from partition_server.client.local import LocalDeployment  # noqa: E402
from partition_server.client.ports import free_ports  # noqa: E402
from partition_server.storage.atomic import write_atomically  # noqa: E402
from partition_server.api.lookup import LookupTable, loopback_addresses  # noqa: E402
from partition_server.api.manifest import LayerSpec, ModelSpec, parse_neural_network  # noqa: E402
from partition_server.testing import LocalTransport, ReferenceNetwork, slice_params  # noqa: E402
from partition_server.serving.server import PartitionServer  # noqa: E402

PARTITIONS = 4
CLASSES = 10
OPTIMIZER = OptimizerConfig("sgd", learning_rate=0.01, momentum=0.9)
HOST = "127.0.0.1"
LOAD_AT_START: tuple[float, ...] = ()


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_of(width: int) -> ModelSpec:
    return ModelSpec(width, (LayerSpec(width, "relu"), LayerSpec(width, "relu"), LayerSpec(CLASSES, "softmax")), seed=0)


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: first-touch allocations, optimizer buffers, connections
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_reference(model: ModelSpec, x, y, repeats: int) -> list[float]:
    ref = ReferenceNetwork(model.inputs, model.layers, init_params(model.inputs, model.layers, model.seed), OPTIMIZER)
    return timed(lambda: ref.train_step(x, y), repeats)


def bench_local(model: ModelSpec, table: LookupTable, x, y, repeats: int) -> list[float]:
    full = init_params(model.inputs, model.layers, model.seed)
    engines = [PartitionEngine(p, model.inputs, model.layers, table, slice_params(full, table, p), OPTIMIZER)
               for p in range(PARTITIONS)]
    del full
    transports = LocalTransport.group(PARTITIONS)
    counter = iter(range(1 << 30))
    with ThreadPoolExecutor(PARTITIONS) as pool:
        def step():
            sid = f"s{next(counter)}"
            for f in [pool.submit(e.train_step, sid, x, y, t, 300.0) for e, t in zip(engines, transports)]:
                f.result()
        return timed(step, repeats)


def bench_grpc(model: ModelSpec, distribution: Distribution, x, y, repeats: int) -> tuple[list[float], float, float]:
    with tempfile.TemporaryDirectory(prefix="mpnn-bench-") as tmp:
        root = Path(tmp)
        ports = free_ports(PARTITIONS, HOST)
        assignment = distribute(model.layer_units, PARTITIONS, distribution)
        table = LookupTable.build("bench", model.layer_units, assignment, loopback_addresses(ports, HOST))
        (root / "bench").mkdir()
        write_atomically(root / "lookup.json", table.to_json())
        servers = []
        try:
            for i in range(PARTITIONS):
                server = PartitionServer(i, "bench", model, root / "lookup.json", root / "bench", poll_seconds=3600)
                servers.append(server)
                server.start(HOST, ports[i])
            return drive(table, x, y, repeats)
        finally:
            for server in servers:
                server.stop(grace=1.0)


def bench_processes(model: ModelSpec, x, y, repeats: int) -> tuple[list[float], float, float]:
    """4 ``mpnn serve`` processes, as ``mpnn run`` starts them: one GIL each."""
    net = parse_neural_network({
        "apiVersion": "mpnn.dev/v1alpha1", "kind": "NeuralNetwork", "metadata": {"name": "bench"},
        "spec": {"model": model.shape_dict(), "partitions": PARTITIONS}})
    with tempfile.TemporaryDirectory(prefix="mpnn-bench-") as tmp, LocalDeployment(net, Path(tmp)) as dep:
        return drive(dep.table, x, y, repeats, alive=dep.check_alive)


def drive(table: LookupTable, x, y, repeats: int, alive=None) -> tuple[list[float], float, float]:
    """Time ``Driver.step`` training steps; messages and bytes per step between the partitions."""
    with Driver(table, timeout=300.0) as driver:
        driver.wait_ready(timeout=120, alive=alive)
        driver.step(x, y, OPTIMIZER)  # warm-up outside the traffic window
        m0, b0 = driver.traffic()
        times = timed(lambda: driver.step(x, y, OPTIMIZER), repeats)
        m1, b1 = driver.traffic()
    steps = repeats + 1  # timed() runs one more warm-up step
    per = lambda n: n // steps if n % steps == 0 else n / steps  # noqa: E731
    return times, per(m1 - m0), per(b1 - b0)


def run(widths: list[int], repeats: int, batch: int) -> dict:
    results = []
    distribution = Distribution("balanced")
    for width in widths:
        model = model_of(width)
        rng = np.random.default_rng(width)
        x = rng.normal(size=(batch, width)).astype(np.float32)
        y = rng.integers(0, CLASSES, size=batch).astype(np.int64)
        assignment = distribute(model.layer_units, PARTITIONS, distribution)
        table = LookupTable.build("bench", model.layer_units, assignment, [f"p{i}" for i in range(PARTITIONS)])
        say(f"width {width}: reference ...")
        ref = statistics.median(bench_reference(model, x, y, repeats))
        say(f"width {width}: local transport ...")
        local = statistics.median(bench_local(model, table, x, y, repeats))
        say(f"width {width}: gRPC ...")
        times, messages, nbytes = bench_grpc(model, distribution, x, y, repeats)
        grpc_s = statistics.median(times)
        say(f"width {width}: gRPC, 4 server processes ...")
        proc_times, proc_messages, _ = bench_processes(model, x, y, repeats)
        proc_s = statistics.median(proc_times)
        assert proc_messages == messages, (proc_messages, messages)
        parameters = sum(u * (i + 1) for u, i in zip(model.layer_units, [width] + model.layer_units[:-1]))
        results.append({
            "width": width,
            "parameters": parameters,
            "reference_s_per_step": round(ref, 6),
            "local_transport_s_per_step": round(local, 6),
            "grpc_s_per_step": round(grpc_s, 6),
            "grpc_processes_s_per_step": round(proc_s, 6),
            "grpc_over_reference": round(grpc_s / ref, 3),
            "grpc_processes_over_reference": round(proc_s / ref, 3),
            "local_over_reference": round(local / ref, 3),
            "messages_per_step": messages,
            "bytes_per_step": nbytes,
        })
        say(json.dumps(results[-1]))
    return {
        "benchmark": "one training step (forward + backward + SGD momentum update)",
        "network": "inputs=W, layers [W relu, W relu, 10 softmax]",
        "partitions": PARTITIONS,
        "assignment": "balanced",
        "grpc_servers": "grpc: 4 in-process PartitionServer objects on 127.0.0.1; grpc_processes: 4 `mpnn serve` "
                        "processes (LocalDeployment, as `mpnn run`); both driven by Driver.step",
        "batch": batch,
        "repeats": repeats,
        "statistic": "median seconds per step after 1 warm-up step",
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(v, 2) for v in LOAD_AT_START],
        "blas_threads_env": {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
                             if k in os.environ},
        "python": platform.python_version(),
        "numpy": np.__version__,
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[256, 1024, 4096], help="hidden widths W")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per width and mode (median reported)")
    p.add_argument("--batch", type=int, default=128, help="examples per step")
    args = p.parse_args(argv)
    global LOAD_AT_START
    LOAD_AT_START = os.getloadavg()
    if args.repeats < 1 or args.batch < 1 or any(w < 1 for w in args.widths):
        p.error("--widths, --repeats and --batch must be positive")
    print(json.dumps(run(args.widths, args.repeats, args.batch), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
