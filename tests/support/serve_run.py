"""Shared helpers for the tests of ``mpnn run --serve``: a manifest with imported weights, and the
served process itself, stopped with Ctrl-C when the test is done."""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import yaml
from safetensors.numpy import save_file

__all__ = ["served_by_mpnn_run", "write_imported_network"]


def write_imported_network(root: Path, rng: np.random.Generator, name: str, inputs: int,
                           layers: Sequence[tuple[int, str]], partitions: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Write ``weights.safetensors`` (drawn from ``rng``) and ``net.yaml`` importing it into ``root``;
    returns the weights as ``[(weight, bias), ...]``."""
    fan_in = [inputs] + [u for u, _ in layers[:-1]]
    params = [(rng.normal(0, 0.5, (u, n)).astype(np.float32), rng.normal(0, 0.1, u).astype(np.float32))
              for (u, _), n in zip(layers, fan_in)]
    save_file({f"layers.{k}.{t}": a for k, p in enumerate(params) for t, a in zip(("weight", "bias"), p)},
              str(root / "weights.safetensors"))
    doc = {"apiVersion": "mpnn.dev/v1alpha1", "kind": "NeuralNetwork", "metadata": {"name": name},
           "spec": {"model": {"inputs": inputs, "weights": "weights.safetensors",
                              "layers": [{"units": u, "activation": a} for u, a in layers]},
                    "partitions": partitions, "distribution": {"strategy": "balanced"}}}
    (root / "net.yaml").write_text(yaml.safe_dump(doc))
    return params


@contextmanager
def served_by_mpnn_run(cmd: Sequence[str], read_endpoints: Callable[[subprocess.Popen, queue.Queue, float], dict],
            timeout: float, what: str) -> Iterator[dict]:
    """Run ``cmd`` (an ``mpnn run ... --serve``), yield the endpoints ``read_endpoints`` finds in its
    output, then stop it with Ctrl-C and assert it exited 130 (``what`` names it in the failure)."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, name="serve-stdout", daemon=True)
    reader.start()
    try:
        yield read_endpoints(proc, lines, timeout)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: mpnn run stops every server
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        reader.join(10)
        stderr = proc.stderr.read()
        proc.stderr.close()
        assert code == 130, f"{what} exited {code} on Ctrl-C: {stderr}"
