"""The floor of grpcio under mpnn's message pattern: the same messages, nothing else.

``P`` processes on this machine, each with a grpcio server and one long-lived client stream to
every peer (the design of ``serving.peers``, with none of mpnn's work: no signing, no checks,
no mailbox, no engine, no driver). A *step* is the rounds of one mpnn training step of the
network ``inputs=W``, ``[W relu, W relu, 10 softmax]`` at ``balanced``: in each round every
process sends one message to each peer (``[batch, units/P]`` float32 bytes, the size of that
layer's block) and waits for one from each (at ``P >= 8``, the rounds of the log-depth collectives
mpnn uses there). The median step time is what any design with these
messages over grpcio's Python API costs on this machine before computing anything; compared
with the mpi4py contender's *whole* step (``contenders.py``), it bounds how close mpnn can get.

    .venv/bin/python bench/transport_floor.py [--widths 256 1024 4096] [--partitions 4] [--steps 40]

Prints one JSON object on stdout: per (W, P) the step time (median, min, max over steps), the
messages per step, and the CPU seconds per message (all processes, user + system).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from partition_server.api.channels import CHANNEL_OPTIONS  # noqa: E402
from partition_server.client.ports import free_ports  # noqa: E402
from partition_server.engine.plan import LOG_FROM, bruck_rounds  # noqa: E402
from stats import summary  # noqa: E402

METHOD = "/floor.Floor/Stream"
HOST = "127.0.0.1"


def round_sizes(width: int, partitions: int, batch: int) -> list[int]:
    """Bytes of one message in each round of a step: forward all-gathers of layers 0, 1, 2,
    backward reduce-scatters into layers 1 and 0 (the direct exchange's rounds)."""
    block = lambda units: 4 * batch * max(1, units // partitions)  # noqa: E731
    return [block(width), block(width), block(10), block(width), block(width)]


def schedule(rank: int, partitions: int, sizes: list[int]) -> list[tuple[list[int], list[int], int]]:
    """A step's exchanges as ``(send to, receive from, bytes per message)``: per round of
    :func:`round_sizes`, every peer at once (the direct exchange) or, at ``P >= LOG_FROM``, the
    rounds of Bruck's collective (``engine.plan``: one peer each, a block per partition carried)."""
    peers = [p for p in range(partitions) if p != rank]
    if partitions < LOG_FROM:
        return [(peers, peers, size) for size in sizes]
    return [([(rank - d) % partitions], [(rank + d) % partitions], size * blocks)
            for size in sizes for d, blocks in bruck_rounds(partitions)]


def worker(rank: int, ports: list[int], sizes: list[int], steps: int) -> None:
    """One process: serve, stream to every peer, run ``steps`` steps; one JSON line on stdout."""
    peers = [p for p in range(len(ports)) if p != rank]
    inbox = {p: queue.SimpleQueue() for p in peers}

    def handler(requests, _context):
        for message in requests:
            inbox[message[0]].put(message)
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=len(ports) + 4), options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "floor.Floor", {"Stream": grpc.stream_unary_rpc_method_handler(handler)})])
    server.add_insecure_port(f"{HOST}:{ports[rank]}")
    server.start()
    outboxes = {}
    calls = []
    for p in peers:
        channel = grpc.insecure_channel(f"{HOST}:{ports[p]}", options=CHANNEL_OPTIONS)
        outbox: queue.SimpleQueue = queue.SimpleQueue()
        outboxes[p] = outbox
        calls.append(channel.stream_unary(METHOD).future(iter(outbox.get, None), wait_for_ready=True))
    exchanges = [(to, frm, bytes([rank]) + b"\0" * (size - 1)) for to, frm, size in schedule(rank, len(ports), sizes)]

    def step() -> None:
        for to, frm, payload in exchanges:
            for p in to:
                outboxes[p].put(payload)
            for p in frm:
                inbox[p].get()

    for _ in range(3):  # connect and warm up
        step()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"rank": rank, "times": times, "cpu": usage.ru_utime + usage.ru_stime - cpu0}), flush=True)
    for outbox in outboxes.values():
        outbox.put(None)
    for call in calls:
        try:
            call.result(timeout=5)
        except (grpc.RpcError, grpc.FutureTimeoutError):
            pass
    time.sleep(0.5)  # let the peers finish reading before this server goes
    server.stop(grace=1)


def step_times(width: int, partitions: int, *, batch: int, steps: int) -> tuple[list[float], float]:
    """Run ``partitions`` worker processes for one width: ``(seconds per step, CPU seconds per
    message)``. A step ends for all when the slowest process ends it: per step, the longest of
    the P processes' times."""
    sizes = round_sizes(width, partitions, batch)
    ports = free_ports(partitions)
    cmd = [sys.executable, __file__, "--worker", "--ports", *map(str, ports), "--sizes", *map(str, sizes),
           "--steps", str(steps)]
    procs = [subprocess.Popen([*cmd, "--rank", str(r)], stdout=subprocess.PIPE, text=True) for r in range(partitions)]
    rows = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"transport_floor worker exited {proc.returncode}")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    per_step = [max(r["times"][i] for r in rows) for i in range(steps)]
    return per_step, sum(r["cpu"] for r in rows) / (steps * messages_per_step(partitions))


def messages_per_step(partitions: int) -> int:
    return partitions * sum(len(to) for to, _, _ in schedule(0, partitions, round_sizes(1, partitions, 1)))


def measure(width: int, partitions: int, *, batch: int, steps: int) -> dict:
    """The report row of one (W, P)."""
    per_step, cpu = step_times(width, partitions, batch=batch, steps=steps)
    sizes = round_sizes(width, partitions, batch)
    return {"width": width, "partitions": partitions, "batch": batch,
            "s_per_step": summary(per_step),
            "messages_per_step": messages_per_step(partitions),
            "bytes_per_step": partitions * sum(len(to) * n for to, _, n in schedule(0, partitions, sizes)),
            "cpu_s_per_message": round(cpu, 7)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--partitions", type=int, nargs="+", default=[4])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per configuration")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ports", type=int, nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.rank, args.ports, args.sizes, args.steps)
        return 0
    rows = []
    for width in args.widths:
        for partitions in args.partitions:
            print(f"transport floor: W={width} P={partitions} ...", file=sys.stderr, flush=True)
            rows.append(measure(width, partitions, batch=args.batch, steps=args.steps))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "grpcio streams under mpnn's message pattern, no computation",
                      "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(), "floor": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
