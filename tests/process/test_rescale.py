"""Rescaling during a training run without loss (local mode, ``mpnn run --repartition``): a
checkpoint at the step boundary, the new lookup, every server reloading the rows it now owns,
and the run going on under the new split; final parameters equal the run without the rescale."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from partition_server.storage.store import ModelStore
from tests.process.test_local_mode import reaper  # noqa: F401 - fixture
from tests.support.dataplane import serve_processes, wait_until

NAME = "rescale"


def _manifest(path: Path, partitions: int) -> Path:
    # 1437 samples / 58 per batch = 25 steps per epoch; 4 epochs = 100 steps.
    doc = {"apiVersion": "mpnn.dev/v1alpha1", "kind": "NeuralNetwork", "metadata": {"name": NAME},
           "spec": {"model": {"inputs": 64, "layers": [{"units": 24, "activation": "relu"},
                                                      {"units": 16, "activation": "tanh"},
                                                      {"units": 10, "activation": "softmax"}], "seed": 11},
                    "partitions": partitions,
                    "training": {"dataset": {"format": "digits"}, "epochs": 4, "batchSize": 58, "learningRate": 0.05,
                                 "optimizer": "sgd", "momentum": 0.9, "checkpointEvery": 20, "runId": "r"}}}
    path.write_text(yaml.safe_dump(doc))
    return path


def _run(manifest: Path, workdir: Path, *extra: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "partition_server.cli", "run", str(manifest), "--json",
                          "--workdir", str(workdir), *extra], cwd=manifest.parent, capture_output=True, text=True,
                         timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    wait_until(lambda: not serve_processes(workdir), timeout=15, what="the servers to exit")
    return {**json.loads(out.stdout), "stderr": out.stderr}


def _parameters(workdir: Path) -> list[np.ndarray]:
    ckpt = ModelStore(workdir / NAME).latest()
    assert ckpt.meta["run_step"] == 100
    return [ckpt.read_layer(k, t) for k in range(ckpt.num_layers) for t in ("weight", "bias")]


@pytest.mark.parametrize("start,repartition,final,strategy", [
    (4, "33:3:layers", 3, "layers"),   # 4 -> 3, balanced -> layers, between checkpoints
    (3, "40:5", 5, "balanced"),        # 3 -> 5, on a checkpoint boundary
])
def test_rescale_mid_run_ends_where_the_unscaled_run_ends(tmp_path, reaper, start, repartition, final,  # noqa: F811
                                                          strategy):
    manifest = _manifest(tmp_path / "net.yaml", start)
    reaper[1].extend([tmp_path / "plain", tmp_path / "scaled"])
    plain = _run(manifest, tmp_path / "plain")
    scaled = _run(manifest, tmp_path / "scaled", "--repartition", repartition)
    assert (plain["final_partitions"], scaled["final_partitions"]) == (start, final)
    assert scaled["final_strategy"] == strategy and scaled["lookupVersion"] != plain["lookupVersion"]
    assert scaled["steps"] == plain["steps"] == 100 and scaled["restarts"] == 0
    assert f"repartitioned to {final} partitions ({strategy})" in scaled["stderr"]
    step = int(repartition.split(":")[0])
    committed = [ModelStore(tmp_path / "scaled" / NAME).get(s).meta["run_step"]
                 for s in ModelStore(tmp_path / "scaled" / NAME).sequences()]
    assert committed[-1] == 100
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(_parameters(tmp_path / "scaled"),
                                                             _parameters(tmp_path / "plain")))
    assert worst <= 1e-4, worst
    print(f"rescale {start}->{final} after step {step}: max abs difference {worst:.2e}")
