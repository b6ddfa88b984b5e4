"""Peak RSS of one partition server's start, against its share of the parameters.

The network is ``inputs=7000``, layers ``[7000 relu, 7000 relu, 10 softmax]``: 98.1M parameters,
392 MB of float32. For each ``P`` (default 4 and 8, ``balanced``) every partition is started as
its own fresh process that runs ``serving.loading.load_partition``, what ``mpnn serve`` runs
before it listens, once from the seeded initialisation (``init``) and once from a checkpoint
with SGD momentum state (``checkpoint``; written by 4 partitions, so at P=8 rows are re-split on
load). Each child reports its resident set before loading (imports only, ``base_mib``), its
peak (``VmHWM``, ``peak_mib``) and the bytes its engine holds (``held_mib``: rows plus optimizer
state); ``share_mib`` is that partition's share (``params/P``, doubled from a checkpoint with
momentum). ``over_share_mib = peak - held`` is what loading costs beyond the rows themselves
(the issue's bound is 150 MiB). The server's process adds gRPC and aiohttp to ``base_mib``.

    .venv/bin/python bench/memory.py [--partitions 4 8] [--width 7000]

One JSON object on stdout; children run one at a time (about a minute on a loaded machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIB = 1 << 20
RUN_ID = "bench-memory"  # the run that reserves and commits the checkpoint


def rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def model_of(width: int):
    from partition_server.api.manifest import LayerSpec, ModelSpec
    return ModelSpec(width, (LayerSpec(width, "relu"), LayerSpec(width, "relu"), LayerSpec(10, "softmax")), seed=0)


def table_of(model, partitions: int):
    from partition_server.api.distributor import Distribution, distribute
    from partition_server.api.lookup import LookupTable
    assignment = distribute(model.layer_units, partitions, Distribution("balanced"))
    return LookupTable.build("bench", model.layer_units, assignment, [f"p{i}:1" for i in range(partitions)])


def child_load(args) -> None:
    """In a fresh process: load partition ``args.index`` and report memory."""
    from partition_server.serving.loading import load_partition
    from partition_server.storage.store import ModelStore
    model = model_of(args.width)
    base = rss_mib("VmRSS")
    loaded = load_partition(args.index, model, lookup_path=Path(args.lookup), store=ModelStore(args.store))
    peak = rss_mib("VmHWM")  # before anything below allocates
    params, opt_state, _ = loaded.engine._versions.snapshot()  # what the engine holds, no copies
    held = (sum(a.nbytes for wb in params.values() for a in wb)
            + sum(a.nbytes for st in opt_state.values() for a in st.values())) / MIB
    print(json.dumps({"source": loaded.source, "base_mib": round(base, 1), "peak_mib": round(peak, 1),
                      "held_mib": round(held, 1)}))


def child_write(args) -> None:
    """In a fresh process: write partition ``args.index``'s shard (rows and momentum) of a checkpoint."""
    import numpy as np
    from partition_server.api.lookup import LookupTable
    from partition_server.engine import init_partition
    from partition_server.storage.reservation import Reservation
    from partition_server.storage.store import ModelStore
    model = model_of(args.width)
    table = LookupTable.load(Path(args.lookup))
    ranges = {k: [(r.start, r.end) for r in table.ranges(k, args.index)] for k in range(table.num_layers)}
    rows = init_partition(model.inputs, model.layers, model.seed, ranges)
    layers = {k: {"weight": w, "bias": b, "weight.momentum": np.full_like(w, 1e-3), "bias.momentum": np.zeros_like(b)}
              for k, (w, b) in rows.items()}
    reservation = Reservation.of(sequence=args.sequence, run_id=RUN_ID, token=args.token)
    info = ModelStore(args.store).write_shard(reservation, partition=args.index, layers=layers,
                                              ranges={k: ranges[k] for k in layers})
    print(json.dumps(info.to_dict()))


def run_child(*argv: str) -> str:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"memory.py {' '.join(argv[:4])} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--partitions", type=int, nargs="+", default=[4, 8])
    p.add_argument("--width", type=int, default=7000)
    p.add_argument("--child", choices=["load", "write"], help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, help=argparse.SUPPRESS)
    p.add_argument("--lookup", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--token", help=argparse.SUPPRESS)
    p.add_argument("--sequence", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "load":
        child_load(args)
        return 0
    if args.child == "write":
        child_write(args)
        return 0

    from partition_server.engine import OptimizerConfig
    from partition_server.storage.atomic import write_atomically
    from partition_server.storage.schema import ShardInfo
    from partition_server.storage.store import ModelStore
    model = model_of(args.width)
    params = sum(u * (i + 1) for u, i in zip(model.layer_units, [model.inputs] + model.layer_units[:-1]))
    results = []
    with tempfile.TemporaryDirectory(prefix="mpnn-bench-mem-") as tmp:
        root = Path(tmp)
        empty, ckpt = root / "empty", root / "ckpt"
        empty.mkdir()
        ckpt.mkdir()
        lookups = {}
        for n in sorted(set(args.partitions) | {4}):
            lookups[n] = root / f"lookup-{n}.json"
            write_atomically(lookups[n], table_of(model, n).to_json())
        print("writing a checkpoint (4 partitions, with momentum) ...", file=sys.stderr, flush=True)
        reservation = ModelStore(ckpt).reserve(run_id=RUN_ID)
        shards = [ShardInfo.from_dict(json.loads(run_child("--child", "write", "--index", str(i), "--width",
                                                           str(args.width), "--lookup", str(lookups[4]),
                                                           "--store", str(ckpt), "--token", reservation.token,
                                                           "--sequence", str(reservation.sequence))))
                  for i in range(4)]
        ModelStore(ckpt).commit(reservation, shards, network=model.shape_dict(),
                                meta={"optimizer": asdict(OptimizerConfig("sgd", 0.01, 0.9)), "optimizer_step": 1})
        for n in args.partitions:
            for source, store in (("init", empty), ("checkpoint", ckpt)):
                print(f"P={n} from {source} ...", file=sys.stderr, flush=True)
                rows = []
                for i in range(n):
                    r = json.loads(run_child("--child", "load", "--index", str(i), "--width", str(args.width),
                                             "--lookup", str(lookups[n]), "--store", str(store)))
                    assert r["source"] == source, r
                    share = params * 4 / n / MIB * (2 if source == "checkpoint" else 1)
                    r.update(partition=i, share_mib=round(share, 1),
                             over_share_mib=round(r["peak_mib"] - r["held_mib"], 1))
                    rows.append(r)
                worst = max(rows, key=lambda r: r["over_share_mib"])
                results.append({
                    "partitions": n, "source": source,
                    "peak_mib": {"median": round(statistics.median(r["peak_mib"] for r in rows), 1),
                                 "min": min(r["peak_mib"] for r in rows), "max": max(r["peak_mib"] for r in rows)},
                    "share_mib": round(params * 4 / n / MIB * (2 if source == "checkpoint" else 1), 1),
                    "worst_over_share_mib": worst["over_share_mib"],
                    "per_partition": rows,
                })
                print(json.dumps({k: v for k, v in results[-1].items() if k != "per_partition"}),
                      file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "peak RSS of one partition's load (load_partition in a fresh process)",
                      "network": f"inputs={model.inputs}, layers {model.layer_units}", "parameters": params,
                      "parameter_mib": round(params * 4 / MIB, 1), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
