"""``mpnn distribute`` at the paper's scale, and the lookup table's size per row of issue 14.

Times ``mpnn distribute MANIFEST`` (the CLI, in a fresh subprocess each run: Python start-up,
YAML, distributor, lookup builder and the JSON on stdout) for ``--layers`` x ``--units``
neurons on ``--partitions`` partitions (default 1,000 x 1,000,000 on 1,000: a billion
neurons), and reads each run's peak RSS from ``wait4``. Reports the median, min and max over
``--runs`` runs. Then builds the table in this process for every row of the issue's table
and reports its bytes (compact, as the operator stores it; indented, as ``mpnn distribute``
prints it; gzip) and whether the operator would store it gzip-compressed.

    .venv/bin/python bench/lookup.py [--runs 5] [--layers 1000] [--units 1000000] [--partitions 1000]

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from partition_server.api.distributor import Distribution, distribute  # noqa: E402
from partition_server.api.lookup import COMPRESS_ABOVE, LookupTable, service_addresses  # noqa: E402

# Issue 14's table: (layers, units, partitions) under balanced, and what v1 needed.
ISSUE_ROWS = [(10, 1_000_000, 64, "64 KB"), (100, 100_000, 100, "974 KB"), (256, 1_000, 110, "2.6 MB"),
              (1_000, 1_000, 256, "24 MB"), (1_000, 1_000_000, 1_000, "100 MB (8 MB gzipped)")]
NAME = "big"


def manifest(layers: int, units: int, partitions: int) -> str:
    rows = "\n".join(f"      - {{units: {units}, activation: relu}}" for _ in range(layers))
    return (f"apiVersion: mpnn.dev/v1alpha1\nkind: NeuralNetwork\nmetadata:\n  name: {NAME}\nspec:\n"
            f"  model:\n    inputs: 784\n    layers:\n{rows}\n  partitions: {partitions}\n"
            "  distribution:\n    strategy: balanced\n")


def run_distribute(path: Path) -> tuple[float, float, int]:
    """One ``mpnn distribute`` subprocess: (seconds, peak RSS MiB, bytes printed)."""
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "partition_server.cli", "distribute", str(path)],
                                stdout=out, stderr=subprocess.PIPE, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode() if proc.stderr else ""
        if proc.returncode != 0:
            raise SystemExit(f"mpnn distribute failed ({proc.returncode}): {err}")
        size = out.tell()
    return seconds, usage.ru_maxrss / 1024, size  # ru_maxrss is KiB on Linux


def summary(values: list[float], digits: int) -> dict[str, float]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def table_sizes() -> list[dict]:
    rows = []
    for layers, units, partitions, v1 in ISSUE_ROWS:
        t0 = time.perf_counter()
        table = LookupTable.build(NAME, [units] * layers, distribute([units] * layers, partitions, Distribution()),
                                  service_addresses(NAME, "default", partitions, 50051))
        build_s = time.perf_counter() - t0
        compact = len(table.to_json().encode())
        rows.append({"layers": layers, "units": units, "partitions": partitions, "neurons": layers * units,
                     "lookup_json_bytes": compact, "indented_bytes": len(table.to_json(indent=2).encode()),
                     "gzip_bytes": len(table.to_gzip()), "stored_as": "lookup.json.gz" if compact > COMPRESS_ABOVE
                     else "lookup.json", "build_s": round(build_s, 4), "v1_bytes": v1})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--layers", type=int, default=1_000)
    p.add_argument("--units", type=int, default=1_000_000)
    p.add_argument("--partitions", type=int, default=1_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "nn.yaml"
        path.write_text(manifest(args.layers, args.units, args.partitions))
        runs = [run_distribute(path) for _ in range(args.runs)]
    result = {
        "benchmark": "mpnn distribute",
        "case": {"layers": args.layers, "units": args.units, "partitions": args.partitions,
                 "neurons": args.layers * args.units, "strategy": "balanced"},
        "runs": args.runs,
        "distribute_s": summary([r[0] for r in runs], 3),
        "peak_rss_mib": summary([r[1] for r in runs], 1),
        "stdout_bytes": runs[0][2],
        "issue_rows": table_sizes(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
