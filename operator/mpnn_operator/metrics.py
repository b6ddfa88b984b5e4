"""Prometheus metrics of the operator, served by ``mpnn operator`` at ``GET /metrics`` on
``--metrics-port`` (see ``docs/metrics.md``).

=================================  =========  ===========================================================
``mpnn_reconciles_total``          counter    ``result``: ``ok``, ``retry`` (RetryLater), ``error`` (raised)
``mpnn_reconcile_seconds``         histogram  duration of a reconcile, seconds, lock wait included
``mpnn_networks``                  gauge      NeuralNetworks reconciled and not seen deleted
``mpnn_networks_degraded``         gauge      ``reason``: of those, how many are Degraded for it
=================================  =========  ===========================================================
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["OperatorMetrics"]


class OperatorMetrics(Collector):
    """The operator's metrics in a registry of their own (:attr:`registry`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reconciles = Counter("mpnn_reconciles", "Reconciles of a NeuralNetwork, by result", ["result"],
                                  registry=self.registry)
        self.reconcile_seconds = Histogram("mpnn_reconcile_seconds", "Duration of a reconcile, seconds",
                                           registry=self.registry)
        for result in ("ok", "retry", "error"):
            self.reconciles.labels(result)
        self._degraded: dict[tuple[str, str], str | None] = {}  # (namespace, name) -> Degraded reason
        self._lock = threading.Lock()
        self.registry.register(self)

    @contextmanager
    def reconcile(self, retry: type[BaseException]) -> Iterator[None]:
        """Time and count the reconcile run in the ``with`` body; ``retry`` is the exception that
        means "again later" (counted as ``retry``, not ``error``)."""
        began = time.perf_counter()
        result = "error"
        try:
            yield
            result = "ok"
        except retry:
            result = "retry"
            raise
        finally:
            self.reconciles.labels(result).inc()
            self.reconcile_seconds.observe(time.perf_counter() - began)

    def network_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Record the status just computed for a NeuralNetwork (its Degraded condition)."""
        degraded = next((c for c in status.get("conditions") or []
                         if c.get("type") == "Degraded" and c.get("status") == "True"), None)
        with self._lock:
            self._degraded[(namespace, name)] = degraded.get("reason") or "Unknown" if degraded else None

    def network_deleted(self, namespace: str, name: str) -> None:
        with self._lock:
            self._degraded.pop((namespace, name), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            reasons = list(self._degraded.values())
        yield GaugeMetricFamily("mpnn_networks", "NeuralNetworks the operator manages", value=len(reasons))
        degraded = GaugeMetricFamily("mpnn_networks_degraded", "NeuralNetworks that are Degraded, by reason",
                                     labels=["reason"])
        for reason in sorted({r for r in reasons if r}):
            degraded.add_metric([reason], sum(1 for r in reasons if r == reason))
        yield degraded

    def describe(self) -> list:
        return []  # collected at scrape time only
