"""An attacker on the local network, replayed against what ``mpnn run examples/digits.yaml --serve``
starts: the digits network's partition server processes on 127.0.0.1 (``LocalDeployment``), with
a trainer's driver holding the training session. Loopback only; every loop is bounded.

The servers run with their defaults (``ServerLimits``). Each attack asserts its fix, and, where the issue asks, that a
legitimate inference still answers within :data:`LEGIT_SECONDS` while the attack runs and that
the attacked server's resident memory grows by less than a stated bound (its peak, ``VmHWM``,
reset before the attack through ``/proc/PID/clear_refs``).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from sklearn.datasets import load_digits

from partition_server.api.manifest import load_manifest
from partition_server.client.driver import Driver
from partition_server.client.local import LocalDeployment

ROOT = Path(__file__).resolve().parents[2]
LEGIT_SECONDS = 2.0   # the bound for a legitimate inference during an attack
MiB = 1 << 20


@dataclass
class Target:
    dep: LocalDeployment
    trainer: Driver
    x: np.ndarray      # four digits, [4, 64] float32

    @property
    def name(self) -> str:
        return self.dep.net.name

    def pid(self, i: int) -> int:
        return self.dep.procs[i].pid

    def rest(self, i: int = 0) -> tuple[str, int]:
        return "127.0.0.1", self.dep.http_ports[i]

    def infer_path(self) -> str:
        return f"/v2/models/{self.name}/infer"


@pytest.fixture(scope="package")
def target(tmp_path_factory) -> Target:
    net = load_manifest(ROOT / "examples" / "digits.yaml")
    dep = LocalDeployment(net, tmp_path_factory.mktemp("security"))
    dep.__enter__()
    trainer = Driver(dep.table, credentials=dep.credentials)
    try:
        trainer.wait_ready(timeout=120, alive=dep.check_alive)
        x = (load_digits().data[:4] / 16).astype(np.float32)
        yield Target(dep, trainer, x)
    finally:
        trainer.close()
        dep.stop()


# ---------------------------------------------------------------- measuring


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int) -> int:
    """Reset the process's peak RSS to its current RSS; returns the current RSS, bytes."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status_kib(pid, "VmRSS") * 1024


def peak_rss(pid: int) -> int:
    """Peak resident memory since :func:`reset_peak`, bytes."""
    return _status_kib(pid, "VmHWM") * 1024


def threads(pid: int) -> int:
    return _status_kib(pid, "Threads")


# ---------------------------------------------------------------- HTTP


def post(host_port: tuple[str, int], path: str, body: bytes, headers: dict[str, str] | None = None,
         timeout: float = 120.0) -> tuple[int, bytes, str]:
    """``(status, body, content type)`` of a POST with ``Content-Length``."""
    conn = http.client.HTTPConnection(*host_port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        reply = conn.getresponse()
        return reply.status, reply.read(), reply.getheader("Content-Type", "")
    finally:
        conn.close()


def legit_body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]}).encode()


def infer(target: Target, x: np.ndarray | None = None, entry: int = 0) -> np.ndarray:
    """A legitimate REST inference; its outputs."""
    x = target.x if x is None else x
    status, raw, _ = post(target.rest(entry), target.infer_path(), legit_body(x))
    assert status == 200, raw
    return np.array(json.loads(raw)["outputs"][0]["data"], np.float32).reshape(len(x), -1)


def under_attack(target: Target, attack: Callable[[], object], *, attackers: int = 1,
                 entry: int = 0) -> tuple[list, list[float]]:
    """Run ``attack`` in ``attackers`` threads; meanwhile send legitimate inferences one after
    another until every attacker is done. Returns ``(what each attack returned, legit seconds)``.

    The legitimate calls must all answer 200 (asserted); the caller asserts their time.
    """
    results: list = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(attack())
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads_ = [threading.Thread(target=run, daemon=True) for _ in range(attackers)]
    for t in threads_:
        t.start()
    seconds: list[float] = []
    while True:
        began = time.monotonic()
        infer(target, entry=entry)
        seconds.append(time.monotonic() - began)
        if not any(t.is_alive() for t in threads_) or len(seconds) >= 200:
            break
        time.sleep(0.05)
    for t in threads_:
        t.join(300)
    if errors:
        raise errors[0]
    return results, seconds
