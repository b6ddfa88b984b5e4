"""A checkpoint written by the store before the rename: what ``tests/unit/data/legacy-v1/`` holds.

Those files were written once by the pre-rename store (commit 89a5409) and are
checked in; this module says what is in them, and how they were made::

    git show 89a5409:partition_server/storage/store.py > /tmp/old_store.py
    PYTHONPATH=/tmp:. .venv/bin/python -m tests.support.legacy_checkpoint tests/unit/data/legacy-v1

The old layout: ``checkpoints/<step:012d>/manifest.json`` (schema
``mpnn.dev/checkpoint/v1``, the checkpoint number under ``"step"``) and shards
whose safetensors metadata says ``step``; beside it, ``<step + 1>`` holds one
shard and no manifest (a writer that died before committing). ``tests/unit/test_store.py``
regenerates the same arrays from :func:`legacy_model` and checks that the new
store loads them and counts the sequence.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

__all__ = ["ASSIGNMENT", "DATA", "DEAD_SEQUENCE", "META", "NETWORK", "SEQUENCE", "legacy_model"]

DATA = Path(__file__).resolve().parents[1] / "unit" / "data" / "legacy-v1"
"""The checked-in store root: ``checkpoints/000000000007/manifest.json`` and its two shards,
``checkpoints/000000000008/shard-00000.safetensors`` (never committed)."""

NETWORK = {"inputs": 3, "layers": [{"units": 4, "activation": "relu"}, {"units": 2, "activation": "softmax"}]}
SEQUENCE = 7
DEAD_SEQUENCE = SEQUENCE + 1
# Two partitions, interleaved rows, so a reload stitches rows from both shards.
ASSIGNMENT = {0: {0: [(0, 1), (3, 4)], 1: [(0, 1)]}, 1: {0: [(1, 3)], 1: [(1, 2)]}}
META = {"run_id": "legacy", "run_step": 12, "optimizer_step": 12,
        "optimizer": {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9}}


def legacy_model() -> dict[int, dict[str, np.ndarray]]:
    """layer -> tensor name -> whole-layer float32 array of the checked-in checkpoint."""
    rng = np.random.default_rng(2024)
    model = {}
    inputs = NETWORK["inputs"]
    for k, layer in enumerate(NETWORK["layers"]):
        units = layer["units"]
        model[k] = {"weight": rng.standard_normal((units, inputs)).astype(np.float32),
                    "bias": rng.standard_normal(units).astype(np.float32),
                    "weight.momentum": rng.standard_normal((units, inputs)).astype(np.float32),
                    "bias.momentum": rng.standard_normal(units).astype(np.float32)}
        inputs = units
    return model


def main(root: str) -> None:
    """Write the legacy checkpoint under ``root`` with the old store (importable as ``old_store``)."""
    from old_store import ModelStore  # the pre-rename store, see the module docstring

    store = ModelStore(root)
    model = legacy_model()
    infos = []
    for partition, owned in ASSIGNMENT.items():
        layers = {k: {n: np.concatenate([a[s:e] for s, e in owned[k]]) for n, a in model[k].items()}
                  for k in owned}
        infos.append(store.write_shard(SEQUENCE, partition, layers, owned))
    store.commit(SEQUENCE, infos, NETWORK, META)
    # The next number: partition 0 wrote its shard, then the writer died before the manifest.
    store.write_shard(DEAD_SEQUENCE, 0, {k: {n: model[k][n][:1] for n in model[k]} for k in (0, 1)},
                      {0: [(0, 1)], 1: [(0, 1)]})


if __name__ == "__main__":
    main(sys.argv[1])
