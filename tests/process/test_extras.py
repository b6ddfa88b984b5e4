"""The data plane without the ``[operator]`` extra: ``mpnn run`` and ``mpnn serve`` need neither
kopf nor the kubernetes client, and ``mpnn operator`` says which extra it needs.

No fresh venv (that would need the network): each command runs in a subprocess whose
``PYTHONPATH`` starts with a directory that shadows ``kopf`` and ``kubernetes`` with modules
that record the attempt and raise ``ModuleNotFoundError``, as if they were not installed. Its
``sitecustomize`` records every Python process that starts with that directory on its path, so
the tests also see that the servers ``mpnn run`` starts ran under the same block.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits.yaml"
RUN_TIMEOUT = 180  # seconds; one epoch of digits takes a few on an idle machine

_BLOCKED = '''
import os
with open(os.environ["MPNN_TEST_IMPORT_LOG"], "a") as log:
    log.write("blocked {name} in " + str(os.getpid()) + "\\n")
raise ModuleNotFoundError("No module named {name!r} (blocked by tests/process/test_extras.py)", name={name!r})
'''
_SITECUSTOMIZE = '''
import os, sys
with open(os.environ["MPNN_TEST_IMPORT_LOG"], "a") as log:
    log.write("started " + str(os.getpid()) + " " + " ".join(sys.argv[1:3]) + "\\n")
'''


@pytest.fixture
def without_operator_extra(tmp_path):
    """``(env, log)``: an environment in which ``import kopf`` and ``import kubernetes`` fail,
    and the file where the processes started in it write what they did."""
    block = tmp_path / "block"
    (block / "kubernetes").mkdir(parents=True)
    (block / "kopf.py").write_text(_BLOCKED.format(name="kopf"))
    (block / "kubernetes" / "__init__.py").write_text(_BLOCKED.format(name="kubernetes"))
    (block / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    log = tmp_path / "imports.log"
    log.touch()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), str(ROOT)]), "MPNN_TEST_IMPORT_LOG": str(log)}
    return env, log


def _mpnn(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "partition_server.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _lines(log: Path, prefix: str) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith(prefix)]


def test_the_block_works(without_operator_extra):
    env, log = without_operator_extra
    for module in ("kopf", "kubernetes", "kubernetes.client"):
        r = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, (module, r.stderr)
    assert len(_lines(log, "blocked")) == 3


def test_mpnn_serve_and_run_need_neither_kopf_nor_kubernetes(tmp_path, without_operator_extra):
    env, log = without_operator_extra
    r = _mpnn("serve", "--help", env=env)
    assert r.returncode == 0 and "--partition" in r.stdout, r.stderr
    r = _mpnn("run", str(DIGITS), "--epochs", "1", "--json", "--workdir", str(tmp_path / "work"), env=env,
              timeout=RUN_TIMEOUT)
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["partitions"] == 4 and result["epochs"] == 1 and 0 <= result["accuracy"] <= 1, result
    assert _lines(log, "blocked") == [], log.read_text()  # never even tried
    servers = [line for line in _lines(log, "started") if line.split()[2:] == ["serve", "--partition"]]
    assert len(servers) == 4, log.read_text()  # the partition servers ran under the block too


def test_mpnn_render_needs_neither(without_operator_extra):
    env, log = without_operator_extra
    r = _mpnn("render", str(DIGITS), env=env)
    assert r.returncode == 0, r.stderr
    assert [d["kind"] for d in yaml.safe_load_all(r.stdout)][-1] == "StatefulSet"
    assert _lines(log, "blocked") == []


def test_mpnn_operator_names_the_extra_it_needs(without_operator_extra):
    env, _ = without_operator_extra
    r = _mpnn("operator", env=env)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert "mpnn operator: error:" in r.stderr and "mpnn[operator]" in r.stderr, r.stderr
