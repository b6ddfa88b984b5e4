"""mpnn against its peers: the same neuron-split training step with mpi4py, and one numpy process.

For every width ``W`` and partition count ``P`` the network is ``inputs=W``, layers
``[W relu, W relu, 10 softmax]`` (batch ``--batch``, SGD lr 0.01 momentum 0.9, the seeded
initial weights). Contenders, each a separate set of processes:

- ``mpnn``: ``P`` ``mpnn serve`` processes (``LocalDeployment``, as ``mpnn run`` starts them;
  ``--strategy``, default ``balanced``) driven by ``Driver.step`` from this process;
- ``mpi4py``: ``mpirun -np P bench/mpi_step.py --mode mpi``: ``MPI_Allgatherv`` forward,
  ``MPI_Reduce_scatter`` backward, the same rows, initial weights and update (skipped with a
  message when ``mpirun`` or ``mpi4py`` is missing: ``make bench`` installs them);
- ``numpy``: ``bench/mpi_step.py --mode numpy``, the whole network in one process, 1 BLAS thread;
- ``grpc_floor``: ``bench/transport_floor.py``: mpnn's messages of one step over bare grpcio
  streams between ``P`` processes, computing nothing: what any grpcio design with these messages
  costs here, so ``grpc_floor_over_mpi4py`` is the least ``mpnn_over_mpi4py`` can be.

Rounds are interleaved (round r runs every contender once, in an order rotated per round),
each round times ``--steps`` steps after a warm-up step and keeps their median; reported are
the median over rounds with min and max. Ratios are taken within the run. Also reported:
messages and bytes per mpnn step against the lower bounds, MNIST training samples/s
(784-256-128-10, batch 64, P=4, t10k set; ``--mnist DIR``), single-sample inference p50/p99
over REST and gRPC on the digits network at P=4, and (``--memory``) ``bench/memory.py``.

    .venv/bin/python bench/contenders.py [--widths 256 1024 4096] [--partitions 2 4 8]
        [--rounds 3] [--steps 3] [--mnist /work/shared/datasets/mnist] [--memory]

One JSON object on stdout; progress on stderr. Timings on a shared machine are noisy:
compare the ratios within one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from partition_server.api.manifest import parse_neural_network  # noqa: E402
from partition_server.client.driver import Driver  # noqa: E402
from partition_server.client.local import LocalDeployment  # noqa: E402
from partition_server.engine import OptimizerConfig  # noqa: E402
from stats import summary  # noqa: E402
from transport_floor import messages_per_step, step_times  # noqa: E402

HERE = Path(__file__).resolve().parent
OPTIMIZER = OptimizerConfig("sgd", learning_rate=0.01, momentum=0.9)
MNIST_OPTIMIZER = OptimizerConfig("sgd", learning_rate=0.05, momentum=0.9)
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mpi_available() -> str | None:
    """None when the mpi4py contender can run, else why not."""
    if shutil.which("mpirun") is None:
        return "mpirun not found (make bench installs openmpi-bin and libopenmpi-dev with apt-get)"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed in this environment (make bench installs it)"
    return None


def run_worker(mode: str, partitions: int, extra: list[str]) -> list[float]:
    cmd = [sys.executable, str(HERE / "mpi_step.py"), "--mode", mode, *extra]
    if mode == "mpi":
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", str(partitions),
               *cmd]
    env = {**os.environ, **ONE_THREAD, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} worker failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["s_per_step"]


def manifest(name: str, model: dict, partitions: int, strategy: str) -> dict:
    return {"apiVersion": "mpnn.dev/v1alpha1", "kind": "NeuralNetwork", "metadata": {"name": name},
            "spec": {"model": model, "partitions": partitions, "distribution": {"strategy": strategy}}}


def width_model(width: int) -> dict:
    return {"inputs": width, "seed": 0, "layers": [{"units": width, "activation": "relu"},
                                                   {"units": width, "activation": "relu"},
                                                   {"units": 10, "activation": "softmax"}]}


MNIST_MODEL = {"inputs": 784, "seed": 0, "layers": [{"units": 256, "activation": "relu"},
                                                    {"units": 128, "activation": "relu"},
                                                    {"units": 10, "activation": "softmax"}]}
DIGITS_MODEL = {"inputs": 64, "seed": 0, "layers": [{"units": 128, "activation": "relu"},
                                                    {"units": 64, "activation": "relu"},
                                                    {"units": 10, "activation": "softmax"}]}


def lower_bounds(table, batch: int) -> dict:
    """Bytes: every partition that must hold a layer receives the columns it does not compute
    (all-gather), and every contributor of a reduce-scatter sends the columns it does not keep.
    Messages: ``P·ceil(log2 P)`` per collective (log depth), against ``P·(P-1)`` sent directly."""
    units = list(table.layer_units)
    last = len(units) - 1
    own = lambda k, q: sum(r.end - r.start for r in table.ranges(k, q))  # noqa: E731
    crosses = lambda a, b: any(p != q for p in a for q in b)  # noqa: E731
    nbytes = collectives = 0
    for k in range(len(units)):
        owners = table.partitions_in_layer(k)
        holders = table.partitions_in_layer(k if k == last else k + 1)
        nbytes += sum(4 * batch * (units[k] - own(k, q)) for q in holders)
        collectives += crosses(owners, holders)
        if k >= 1:
            below = table.partitions_in_layer(k - 1)
            nbytes += sum(4 * batch * (units[k - 1] - own(k - 1, p)) for p in owners if crosses([p], below))
            collectives += crosses(owners, below)
    P = table.num_partitions
    return {"bytes": nbytes, "messages_log_depth": collectives * P * math.ceil(math.log2(P)) if P > 1 else 0,
            "messages_direct": collectives * P * (P - 1)}


def time_mpnn(driver: Driver, xs, ys, optimizer, warm: bool) -> list[float]:
    if warm:
        driver.step(xs[0], ys[0], optimizer)
    out = []
    for x, y in zip(xs[1:], ys[1:]):
        t0 = time.perf_counter()
        driver.step(x, y, optimizer)
        out.append(time.perf_counter() - t0)
    return out


def interleaved(contenders: dict, rounds: int) -> dict[str, list[float]]:
    """Run each contender once per round, rotating the order; per round the median step time."""
    names = list(contenders)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            per_round[n].append(statistics.median(contenders[n](r)))
    return per_round


def bench_steps(args, mpi_reason: str | None) -> list[dict]:
    results = []
    for width in args.widths:
        rng = np.random.default_rng(width)
        x = rng.normal(size=(args.batch, width)).astype(np.float32)
        y = rng.integers(0, 10, size=args.batch).astype(np.int64)
        xs, ys = [x] * (args.steps + 1), [y] * (args.steps + 1)
        worker = ["--width", str(width), "--batch", str(args.batch), "--steps", str(args.steps)]
        for P in args.partitions:
            say(f"W={width} P={P}: starting {P} mpnn servers ...")
            net = parse_neural_network(manifest("bench", width_model(width), P, args.strategy))
            with tempfile.TemporaryDirectory(prefix="mpnn-bench-") as tmp, LocalDeployment(net, Path(tmp)) as dep, \
                    Driver(dep.table, timeout=600.0, credentials=dep.credentials) as driver:
                driver.wait_ready(timeout=300, alive=dep.check_alive)
                traffic = {}

                def mpnn(r):
                    m0, b0 = driver.traffic()
                    t = time_mpnn(driver, xs, ys, OPTIMIZER, warm=True)
                    m1, b1 = driver.traffic()
                    traffic.update(messages=(m1 - m0) / (len(t) + 1), bytes=(b1 - b0) / (len(t) + 1))
                    return t

                contenders = {"mpnn": mpnn, "numpy": lambda r: run_worker("numpy", 1, worker),
                              "grpc_floor": lambda r: step_times(width, P, batch=args.batch, steps=args.steps)[0]}
                if mpi_reason is None:
                    contenders["mpi4py"] = lambda r: run_worker("mpi", P, worker)
                per_round = interleaved(contenders, args.rounds)
                bounds = lower_bounds(dep.table, args.batch)
            row = {"width": width, "partitions": P, "s_per_step": {n: summary(v) for n, v in per_round.items()},
                   "mpnn_over_numpy": round(statistics.median(per_round["mpnn"]) / statistics.median(per_round["numpy"]), 3)}
            if "mpi4py" in per_round:
                mpi = statistics.median(per_round["mpi4py"])
                row["mpnn_over_mpi4py"] = round(statistics.median(per_round["mpnn"]) / mpi, 3)
                row["mpi4py_over_numpy"] = round(mpi / statistics.median(per_round["numpy"]), 3)
                row["grpc_floor_over_mpi4py"] = round(statistics.median(per_round["grpc_floor"]) / mpi, 3)
            row["grpc_floor_messages_per_step"] = messages_per_step(P)
            row.update(messages_per_step=traffic["messages"], bytes_per_step=traffic["bytes"],
                       bytes_lower_bound=bounds["bytes"], messages_direct=bounds["messages_direct"],
                       messages_log_depth=bounds["messages_log_depth"])
            say(json.dumps(row))
            results.append(row)
    return results


def bench_mnist(args, mpi_reason: str | None, strategy: str) -> dict:
    sys.path.insert(0, str(HERE))
    from mpi_step import mnist_data
    P, batch = 4, 64
    xs, ys = mnist_data(args.mnist, batch, args.mnist_steps + 1)
    worker = ["--mnist", args.mnist, "--batch", str(batch), "--steps", str(args.mnist_steps)]
    say(f"MNIST ({strategy}): starting {P} mpnn servers ...")
    net = parse_neural_network(manifest("mnist", MNIST_MODEL, P, strategy))
    with tempfile.TemporaryDirectory(prefix="mpnn-bench-") as tmp, LocalDeployment(net, Path(tmp)) as dep, \
            Driver(dep.table, timeout=600.0, credentials=dep.credentials) as driver:
        driver.wait_ready(timeout=300, alive=dep.check_alive)
        contenders = {"mpnn": lambda r: time_mpnn(driver, xs, ys, MNIST_OPTIMIZER, warm=r == 0),
                      "numpy": lambda r: run_worker("numpy", 1, worker)}
        if mpi_reason is None:
            contenders["mpi4py"] = lambda r: run_worker("mpi", P, worker)
        per_round = interleaved(contenders, args.rounds)
    out = {"network": "784-256-128-10", "partitions": P, "strategy": strategy, "batch": batch,
           "steps_per_round": args.mnist_steps,
           "samples_per_s": {n: summary([batch / t for t in v], 1) for n, v in per_round.items()}}
    out["mpnn_share_of_numpy"] = round(statistics.median(per_round["numpy"]) / statistics.median(per_round["mpnn"]), 3)
    say(json.dumps(out))
    return out


def concurrent_grpc(address: str, x: np.ndarray, clients: int, requests: int) -> dict:
    """``clients`` threads, each with its own ``tritonclient.grpc`` client, send ``requests``
    single-sample requests each, back to back: requests/s over all, and per-request p50/p99 in ms."""
    import threading

    import tritonclient.grpc as grpcclient
    times: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client() -> None:
        c = grpcclient.InferenceServerClient(address)
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        try:
            try:
                c.infer("digits", [inp])
            except BaseException:
                start.abort()  # the others (and the timer) stop waiting for this client
                raise
            start.wait()
            mine = []
            for _ in range(requests):
                t0 = time.perf_counter()
                c.infer("digits", [inp])
                mine.append(time.perf_counter() - t0)
            with lock:
                times.extend(mine)
        finally:
            c.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    ms = [t * 1e3 for t in times]
    return {"clients": clients, "requests_per_s": round(len(times) / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def bench_inference(args, strategy: str, batching_us: int | None = None) -> dict:
    """Single-sample requests, one at a time, to partition 0 of the digits network at P=4; REST over
    one kept-alive connection, as an HTTP client with a session sends them. Then ``--clients``
    concurrent gRPC clients (:func:`concurrent_grpc`). ``batching_us``: with
    ``spec.server.dynamicBatching`` of that delay."""
    import http.client

    import tritonclient.grpc as grpcclient
    P = 4
    doc = manifest("digits", DIGITS_MODEL, P, strategy)
    if batching_us:
        doc["spec"]["server"] = {"dynamicBatching": {"maxDelayMicroseconds": batching_us}}
    net = parse_neural_network(doc)
    x = np.random.default_rng(0).random((1, 64), dtype=np.float32)
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    say(f"inference ({strategy}, batching {batching_us or 'off'}): starting {P} mpnn servers ...")
    out = {"network": "digits 64-128-64-10", "partitions": P, "strategy": strategy,
           "dynamic_batching_us": batching_us, "requests": args.requests}
    with tempfile.TemporaryDirectory(prefix="mpnn-bench-") as tmp, LocalDeployment(net, Path(tmp)) as dep, \
            Driver(dep.table, timeout=600.0, credentials=dep.credentials) as driver:
        driver.wait_ready(timeout=300, alive=dep.check_alive)
        conn = http.client.HTTPConnection(dep.host, dep.http_ports[0], timeout=60)

        def rest():
            conn.request("POST", "/v2/models/digits/infer", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"REST inference answered {resp.status}")
        client = grpcclient.InferenceServerClient(f"{dep.host}:{dep.ports[0]}")
        inp = grpcclient.InferInput("input", [1, 64], "FP32")
        inp.set_data_from_numpy(x)

        def grpc_call():
            client.infer("digits", [inp])
        for name, fn in (("rest", rest), ("grpc", grpc_call)):
            for _ in range(5):
                fn()
            times = []
            for _ in range(args.requests):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            out[f"{name}_ms"] = {"p50": round(float(np.percentile(times, 50)), 3),
                                 "p99": round(float(np.percentile(times, 99)), 3)}
        client.close()
        conn.close()
        out["concurrent_grpc"] = concurrent_grpc(f"{dep.host}:{dep.ports[0]}", x, args.clients,
                                                 max(1, args.requests // args.clients))
    say(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--partitions", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per configuration")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round (median kept)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--strategy", default="balanced", help="mpnn's distribution strategy")
    p.add_argument("--also-strategies", nargs="*", default=["auto"],
                   help="strategies MNIST and inference also run with (auto: the 10-unit output layer on one partition)")
    p.add_argument("--mnist", default="/work/shared/datasets/mnist", help="MNIST IDX directory ('' to skip)")
    p.add_argument("--mnist-steps", type=int, default=40)
    p.add_argument("--requests", type=int, default=200, help="single-sample inference requests per protocol")
    p.add_argument("--clients", type=int, default=8, help="concurrent gRPC inference clients")
    p.add_argument("--batching-us", type=int, default=2000,
                   help="inference also runs with spec.server.dynamicBatching of this delay (0: not)")
    p.add_argument("--skip", nargs="*", default=[], choices=["steps", "mnist", "inference"])
    p.add_argument("--memory", action="store_true", help="also run bench/memory.py (about a minute)")
    args = p.parse_args(argv)
    load = os.getloadavg()
    mpi_reason = mpi_available()
    if mpi_reason:
        say(f"mpi4py contender skipped: {mpi_reason}")
    report: dict = {"benchmark": "mpnn vs mpi4py vs numpy (1 BLAS thread), interleaved rounds",
                    "network": "inputs=W, layers [W relu, W relu, 10 softmax]", "batch": args.batch,
                    "rounds": args.rounds, "steps_per_round": args.steps, "strategy": args.strategy,
                    "statistic": "median over rounds of the per-round median step time; min/max over rounds",
                    "cpus": os.cpu_count(), "load_average_at_start": [round(v, 2) for v in load],
                    "mpi4py": "ran" if mpi_reason is None else f"skipped: {mpi_reason}"}
    if "steps" not in args.skip:
        report["steps"] = bench_steps(args, mpi_reason)
    if "mnist" not in args.skip and args.mnist:
        if (Path(args.mnist) / "t10k-images-idx3-ubyte.gz").exists():
            report["mnist"] = [bench_mnist(args, mpi_reason, s) for s in [args.strategy, *args.also_strategies]]
        else:
            report["mnist"] = f"skipped: no MNIST t10k files in {args.mnist}"
    if "inference" not in args.skip:
        report["inference"] = [bench_inference(args, s) for s in [args.strategy, *args.also_strategies]]
        if args.batching_us:
            report["inference"] += [bench_inference(args, s, args.batching_us)
                                    for s in [args.strategy, *args.also_strategies]]
    if args.memory:
        say("memory: bench/memory.py ...")
        out = subprocess.run([sys.executable, str(HERE / "memory.py")], capture_output=True, text=True)
        # A failed memory run must not lose the rest of the report (minutes of measurements).
        report["memory"] = json.loads(out.stdout) if out.returncode == 0 else \
            {"error": f"memory.py exited {out.returncode}", "stderr": out.stderr[-2000:]}
    report["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(report, indent=2))
    return 1 if "error" in report.get("memory", {}) else 0


if __name__ == "__main__":
    sys.exit(main())
