"""``mpnn run`` end to end, as subprocesses: train, predict, bad input, crashes and Ctrl-C.

Every run gets its own workdir under ``tmp_path``; the ``mpnn serve`` processes are found
through ``/proc`` by that path in their command line, so the tests can kill one of them and
check that none is left behind, however the run ended.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from partition_server.api.lookup import LookupTable
from partition_server.api.manifest import load_manifest
from partition_server.testing import ReferenceNetwork
from partition_server.storage.store import ModelStore
from tests.support.dataplane import serve_processes, wait_until

RUN_TIMEOUT = 180  # seconds; a run takes a few on an idle machine


def manifest(path: Path, *, partitions: int = 3, epochs: int = 2, checkpoint_every: int = 0,
             **spec_overrides) -> Path:
    doc = {
        "apiVersion": "mpnn.dev/v1alpha1",
        "kind": "NeuralNetwork",
        "metadata": {"name": "tiny-digits"},
        "spec": {
            "model": {"inputs": 64, "layers": [{"units": 16, "activation": "relu"},
                                               {"units": 10, "activation": "softmax"}], "seed": 3},
            "partitions": partitions,
            "training": {"dataset": {"format": "digits"}, "epochs": epochs, "batchSize": 32,
                         "learningRate": 0.1, "optimizer": "sgd", "momentum": 0.9,
                         "checkpointEvery": checkpoint_every, "runId": "tiny-1"},
        },
    }
    doc["spec"].update(spec_overrides)
    path.write_text(yaml.safe_dump(doc))
    return path


def mpnn(*args: str, cwd: Path, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "partition_server.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_no_servers_left(workdir: Path) -> None:
    wait_until(lambda: not serve_processes(workdir), timeout=15,
               what=f"every mpnn serve of {workdir} to exit (left: {serve_processes(workdir)})")


@pytest.fixture
def reaper():
    """Kill whatever a failing test leaves running: the run, then its servers."""
    procs: list[subprocess.Popen] = []
    workdirs: list[Path] = []
    yield procs, workdirs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for workdir in workdirs:
        for pid in serve_processes(workdir).values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 2-epoch run on 3 partitions: ``(workdir, manifest path, CompletedProcess)``."""
    root = tmp_path_factory.mktemp("trained")
    path = manifest(root / "net.yaml")
    workdir = root / "work"
    try:
        result = mpnn("run", str(path), "--json", "--workdir", str(workdir), cwd=root)
    finally:
        leftover = serve_processes(workdir)
        for pid in leftover.values():
            os.kill(pid, signal.SIGKILL)
    assert result.returncode == 0, result.stderr
    assert not leftover, f"mpnn serve processes left after a normal run: {leftover}"
    return workdir, path, result


def test_run_prints_json_summary_and_learns(trained):
    workdir, path, result = trained
    summary = json.loads(result.stdout)
    for key in ("accuracy", "loss", "partitions", "strategy", "epochs", "train_seconds", "messages", "bytes_sent"):
        assert key in summary, key
    assert summary["partitions"] == 3 and summary["strategy"] == "balanced" and summary["epochs"] == 2
    assert summary["accuracy"] > 0.5  # chance is 0.1
    assert 0 < summary["loss"] < np.log(10)
    assert summary["train_seconds"] > 0
    # 1437 training images in batches of 32: 45 steps per epoch; then 360 test images in 2 batches.
    assert summary["steps"] == 90 and summary["test_samples"] == 360
    # balanced/3 over [16, 10]: per training step 6 + 6 forward and 6 backward messages.
    assert summary["messages"] == 90 * 18 + 2 * 12
    table = LookupTable.load(workdir / "lookup.json")
    assert table.num_partitions == 3 and summary["lookupVersion"] == table.version
    # Every sample crosses each cut once per column: fwd 16 + 10 columns to 2 peers, bwd 16 columns to 2.
    assert summary["bytes_sent"] == 4 * 2 * ((16 + 10 + 16) * 1437 * 2 + (16 + 10) * 360)


def test_run_leaves_a_committed_checkpoint(trained):
    workdir, _, result = trained
    ckpt = ModelStore(workdir / "tiny-digits").latest()
    assert ckpt is not None and ckpt.sequence == json.loads(result.stdout)["checkpoint"] == 2
    assert ckpt.meta["run_id"] == "tiny-1" and ckpt.meta["run_step"] == 90
    assert sorted(s.partition for s in ckpt.shards) == [0, 1, 2]
    assert [ckpt.units(k) for k in range(2)] == [16, 10]


def test_predict_with_a_trained_workdir_equals_reference_forward(trained, tmp_path):
    workdir, path, _ = trained
    x = np.random.default_rng(5).uniform(0, 1, size=(300, 64)).astype(np.float32)  # > one 256 batch
    np.save(tmp_path / "in.npy", x)
    result = mpnn("run", str(path), "--workdir", str(workdir), "--predict", str(tmp_path / "in.npy"),
                  "--output", str(tmp_path / "out.npy"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # nothing trained, no summary
    out = np.load(tmp_path / "out.npy")
    assert out.dtype == np.float32 and out.shape == (300, 10)

    ckpt = ModelStore(workdir / "tiny-digits").latest()
    export = ckpt.export_torch(tmp_path / "model.safetensors")
    from safetensors.numpy import load_file
    weights = load_file(str(export))
    params = [(weights[f"layers.{k}.weight"], weights[f"layers.{k}.bias"]) for k in range(2)]
    np.testing.assert_array_equal(params[0][0], ckpt.read_layer(0, "weight"))
    model = load_manifest(path).model
    want = ReferenceNetwork(model.inputs, model.layers, params).forward(x)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert_no_servers_left(workdir)


@pytest.mark.parametrize("spec, field", [
    ({"partitions": 0}, "spec.partitions"),
    ({"distribution": {"strategy": "count", "counts": [10, 10, 10]}}, "spec.distribution.counts"),
    ({"distribution": {"strategy": "layers", "layers": [[0], [0], [1]]}}, "spec.distribution.layers[1][0]"),
    ({"model": {"inputs": 64, "layers": [{"units": 16, "activation": "softmax"}, {"units": 10}]}},
     "spec.model.layers[0].activation"),
], ids=["partitions", "counts-sum", "layer-twice", "softmax-inside"])
def test_bad_manifest_exits_2_naming_the_field(tmp_path, spec, field):
    path = manifest(tmp_path / "bad.yaml", **spec)
    result = mpnn("run", str(path), "--workdir", str(tmp_path / "work"), cwd=tmp_path, timeout=60)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith(f"mpnn run: error: {field}: ")
    assert not (tmp_path / "work").exists()  # rejected before anything ran


def test_bad_predict_input_exits_2_naming_the_option(tmp_path):
    path = manifest(tmp_path / "net.yaml")
    np.save(tmp_path / "in.npy", np.zeros((4, 63), np.float32))
    result = mpnn("run", str(path), "--workdir", str(tmp_path / "work"), "--predict", str(tmp_path / "in.npy"),
                  "--output", str(tmp_path / "out.npy"), cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert "--predict: must be shaped [batch, 64] (got [4, 63])" in result.stderr
    assert not (tmp_path / "out.npy").exists()


def _start_long_run(tmp_path: Path, reaper, *extra: str) -> tuple[subprocess.Popen, Path]:
    """A run that would take many minutes, once it is training (a checkpoint exists)."""
    procs, workdirs = reaper
    path = manifest(tmp_path / "net.yaml", epochs=1000, checkpoint_every=5)
    workdir = tmp_path / "work"
    workdirs.append(workdir)
    proc = subprocess.Popen([sys.executable, "-m", "partition_server.cli", "run", str(path), "--json",
                             "--workdir", str(workdir), *extra], cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(proc)
    store = ModelStore(workdir / "tiny-digits")

    def training():
        if proc.poll() is not None:
            raise AssertionError(f"mpnn run ended early ({proc.returncode}): {proc.communicate()}")
        return store.latest() is not None

    wait_until(training, timeout=RUN_TIMEOUT, interval=0.2, what="the run to write its first checkpoint")
    assert sorted(serve_processes(workdir)) == [0, 1, 2]
    return proc, workdir


def test_killed_partition_server_fails_the_run_naming_it(tmp_path, reaper):
    """With no restarts left (--max-restarts 0), a crashed server ends the run, named."""
    proc, workdir = _start_long_run(tmp_path, reaper, "--max-restarts", "0")
    victim = serve_processes(workdir)[1]
    address = LookupTable.load(workdir / "lookup.json").addresses[1]
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode == 1, stderr
    assert stdout == ""
    error = next(line for line in stderr.splitlines() if line.startswith("mpnn run: error: "))
    assert f"partition server 1 (tiny-digits-1, pid {victim}, {address}) exited with signal SIGKILL" in error, stderr
    assert_no_servers_left(workdir)


@pytest.mark.parametrize("sig,code,said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signals_stop_the_run_and_its_servers(tmp_path, reaper, sig, code, said):
    proc, workdir = _start_long_run(tmp_path, reaper)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode == code, stderr
    assert stdout == ""
    assert stderr.strip().endswith(f"mpnn run: {said}; servers stopped")
    assert_no_servers_left(workdir)


def test_output_in_a_missing_directory_is_refused_before_anything_runs(tmp_path):
    path = manifest(tmp_path / "net.yaml")
    np.save(tmp_path / "in.npy", np.zeros((4, 64), np.float32))
    result = mpnn("run", str(path), "--workdir", str(tmp_path / "work"), "--predict", str(tmp_path / "in.npy"),
                  "--output", str(tmp_path / "missing" / "out.npy"), cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("mpnn run: error: --output: its directory does not exist")
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("args, env, message", [
    (["serve", "--port", "99999"], {}, "argument --port: port must be 0-65535, got 99999"),
    (["serve"], {"MPNN_PORT": "abc"}, "argument --port: not a port number: 'abc'"),
    (["serve", "--partition", "-1"], {}, "argument --partition: partition index must be >= 0, got -1"),
], ids=["port-range", "port-env", "partition"])
def test_bad_serve_settings_are_usage_errors(tmp_path, monkeypatch, args, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = mpnn(*args, cwd=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().endswith(message)


def test_servers_exit_when_mpnn_run_is_killed_outright(tmp_path, reaper):
    proc, workdir = _start_long_run(tmp_path, reaper)
    proc.kill()  # SIGKILL: no handler of mpnn run gets to stop anything
    proc.wait(timeout=30)
    assert_no_servers_left(workdir)
