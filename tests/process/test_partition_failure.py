"""Partition servers that die mid-run (SIGKILL) and come back: ``mpnn run`` restarts them, brings
every partition back to the last committed checkpoint and finishes by itself, with the parameters
of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from partition_server.storage.store import ModelStore
from tests.process.test_local_mode import reaper  # noqa: F401 - fixture
from tests.support.dataplane import serve_processes, wait_until

NAME = "digits-failover"
RUN_TIMEOUT = 300  # seconds


def _manifest(path: Path) -> Path:
    # 1437 training samples / 36 per batch = 40 steps per epoch; 5 epochs = 200 steps.
    doc = {"apiVersion": "mpnn.dev/v1alpha1", "kind": "NeuralNetwork", "metadata": {"name": NAME},
           "spec": {"model": {"inputs": 64, "layers": [{"units": 32, "activation": "relu"},
                                                      {"units": 10, "activation": "softmax"}], "seed": 5},
                    "partitions": 3,
                    "training": {"dataset": {"format": "digits"}, "epochs": 5, "batchSize": 36, "learningRate": 0.05,
                                 "optimizer": "sgd", "momentum": 0.9, "checkpointEvery": 10, "runId": "failover"}}}
    path.write_text(yaml.safe_dump(doc))
    return path


def _run(manifest: Path, workdir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "partition_server.cli", "run", str(manifest), "--json",
                             "--workdir", str(workdir), *extra], cwd=manifest.parent, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _parameters(workdir: Path) -> list[np.ndarray]:
    ckpt = ModelStore(workdir / NAME).latest()
    assert ckpt.meta["run_step"] == 200
    return [ckpt.read_layer(k, t) for k in range(ckpt.num_layers) for t in ("weight", "bias")]


def test_two_killed_servers_cost_only_the_steps_since_the_last_checkpoint(tmp_path, reaper):  # noqa: F811
    procs, workdirs = reaper
    manifest = _manifest(tmp_path / "net.yaml")
    baseline = tmp_path / "baseline"
    workdirs.append(baseline)
    plain = _run(manifest, baseline)
    procs.append(plain)
    out, err = plain.communicate(timeout=RUN_TIMEOUT)
    assert plain.returncode == 0, err
    assert json.loads(out)["restarts"] == 0

    workdir = tmp_path / "killed"
    workdirs.append(workdir)
    proc = _run(manifest, workdir)
    procs.append(proc)
    store = ModelStore(workdir / NAME)
    kills = []
    for at_step, victim in ((80, 1), (150, 2)):
        def reached(at_step=at_step):
            if proc.poll() is not None:
                raise AssertionError(f"mpnn run ended early ({proc.returncode}): {proc.communicate()}")
            latest = store.latest()
            return latest is not None and latest.meta["run_step"] >= at_step
        wait_until(reached, timeout=RUN_TIMEOUT, interval=0.02, what=f"checkpoint of step {at_step}")
        pid = serve_processes(workdir)[victim]
        os.kill(pid, signal.SIGKILL)
        kills.append((victim, pid, time.time()))
    out, err = proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["restarts"] == 2, err
    for victim, pid, _ in kills:
        assert f"partition server {victim} ({NAME}-{victim}, pid {pid}" in err and "restarting it" in err, err
    resumed = summary["recoveries"]
    assert len(resumed) >= 2, summary
    assert [r["resumed_at_step"] for r in resumed[:2]] == [80, 150], resumed
    for r in resumed:
        assert 0 <= r["lost_steps"] <= 10  # at most checkpointEvery
    # The same batches from the same committed state: the parameters of the uninterrupted run.
    for got, want in zip(_parameters(workdir), _parameters(baseline)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # Measured, for the record (no assertion on time): kill -> training resumed.
    measured = [{"kill_to_resumed_s": round(r["resumed_at"] - killed_at, 3), "lost_steps": r["lost_steps"],
                 "noticed_to_resumed_s": r["seconds"]}
                for (_, _, killed_at), r in zip(kills, resumed)]
    print("partition failure recovery:", json.dumps(measured))
    wait_until(lambda: not serve_processes(workdir), timeout=15, what="the servers to exit")
