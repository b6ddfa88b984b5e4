"""Prometheus metrics of one partition server, served on its REST port at ``GET /metrics``.

Every server keeps its own :class:`~prometheus_client.CollectorRegistry` (tests run several
servers in one process), so names never collide and nothing registers globally. The exposition
format is prometheus_client's, never hand-written.

=============================================  =========  ==========================================
name                                           type       labels / meaning
=============================================  =========  ==========================================
``mpnn_exchange_messages_total``               counter    ``peer``, ``phase`` (fwd, bwd): messages sent
``mpnn_exchange_bytes_total``                  counter    ``peer``, ``phase``: tensor payload bytes sent
``mpnn_peer_streams_open``                      gauge      ``direction`` (in, out): peer streams open now
``mpnn_peer_streams_opened_total``             counter    ``direction``: peer streams opened (reopens count)
``mpnn_pass_phase_seconds``                    histogram  ``phase`` (forward, backward, update): engine time
``mpnn_inference_requests_total``              counter    ``protocol`` (rest, grpc), ``status`` (HTTP code or
                                                          gRPC code name)
``mpnn_inference_request_seconds``             histogram  ``protocol``: inference latency, arrival to answer
``mpnn_inference_pass_rows``                   histogram  rows per inference pass this entry point ran (more
                                                          than a request's with dynamic batching)
``mpnn_training_steps_total``                  counter    training steps this process ran to completion
``mpnn_checkpoint_committed_sequence``         gauge      newest committed checkpoint on the volume (0: none)
``mpnn_checkpoint_loaded_sequence``            gauge      checkpoint the served rows came from (-1: none)
``mpnn_lookup_info``                           info       ``version``: the lookup table served
``mpnn_parameters_owned``                      gauge      weights plus biases of this partition's rows
``mpnn_neurons_owned``                         gauge      neurons this partition owns
``mpnn_partition_info``                        info       ``network``, ``partition``
``mpnn_process_resident_memory_bytes`` etc.    gauge      prometheus_client's process collector
=============================================  =========  ==========================================
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client.core import CounterMetricFamily

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info,
                               ProcessCollector, generate_latest)

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Engine phases run from well under a millisecond (a small layer) to seconds (a large batch).
_PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# Rows per inference pass: 1 for single requests, up to 256 (ModelInference.BATCH).
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """The metrics of one partition server (see the module's table).

    Args:
        network: the network's name.
        partition: this server's index.
        committed: returns the newest committed checkpoint's sequence (0 when none), read at scrape time.
        peer_streams: returns ``(inbound open, inbound opened, outbound open, outbound opened)``
            peer streams, read at scrape time.
    """

    def __init__(self, *, network: str, partition: int, committed: Callable[[], int] = lambda: 0,
                 peer_streams: Callable[[], tuple[int, int, int, int]] = lambda: (0, 0, 0, 0)):
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(namespace="mpnn", registry=r)
        Info("mpnn_partition", "The network and partition this server runs", registry=r).info(
            {"network": network, "partition": str(partition)})
        self.exchange_messages = Counter("mpnn_exchange_messages", "Exchange messages sent to peers",
                                         ["peer", "phase"], registry=r)
        self.exchange_bytes = Counter("mpnn_exchange_bytes", "Tensor payload bytes sent to peers",
                                      ["peer", "phase"], registry=r)
        streams = Gauge("mpnn_peer_streams_open", "Peer ExchangeStreams open now", ["direction"], registry=r)
        streams.labels("in").set_function(lambda: peer_streams()[0])
        streams.labels("out").set_function(lambda: peer_streams()[2])
        r.register(_OpenedStreams(peer_streams))
        self.phase_seconds = Histogram("mpnn_pass_phase_seconds", "Engine time per pass phase, seconds",
                                       ["phase"], buckets=_PHASE_BUCKETS, registry=r)
        self.inference_requests = Counter("mpnn_inference_requests", "Open Inference Protocol infer requests",
                                          ["protocol", "status"], registry=r)
        self.inference_seconds = Histogram("mpnn_inference_request_seconds",
                                           "Inference request latency, arrival to answer, seconds",
                                           ["protocol"], registry=r)
        self.inference_pass_rows = Histogram("mpnn_inference_pass_rows", "Rows per inference pass run here",
                                             buckets=_ROW_BUCKETS, registry=r)
        self.training_steps = Counter("mpnn_training_steps", "Training steps this server completed", registry=r)
        committed_gauge = Gauge("mpnn_checkpoint_committed_sequence",
                                "Sequence of the newest committed checkpoint on the volume (0: none)", registry=r)
        committed_gauge.set_function(committed)
        self.loaded_checkpoint = Gauge("mpnn_checkpoint_loaded_sequence",
                                       "Checkpoint the served rows were loaded from (-1: none)", registry=r)
        self.lookup = Info("mpnn_lookup", "The lookup table this server serves", registry=r)
        self.parameters = Gauge("mpnn_parameters_owned", "Weights plus biases of this partition's rows",
                                registry=r)
        self.neurons = Gauge("mpnn_neurons_owned", "Neurons this partition owns", registry=r)

    def sent(self, nbytes: int, *, peer: int, phase: str) -> None:
        """Count one exchange message of ``nbytes`` payload bytes to partition ``peer`` in ``phase``."""
        self.exchange_messages.labels(str(peer), phase).inc()
        self.exchange_bytes.labels(str(peer), phase).inc(nbytes)

    def loaded(self, *, lookup_version: str, checkpoint: int, parameters: int, neurons: int) -> None:
        """Record what a (re)load put in service."""
        self.lookup.info({"version": lookup_version})
        self.loaded_checkpoint.set(checkpoint)
        self.parameters.set(parameters)
        self.neurons.set(neurons)

    def inference(self, *, protocol: str, status: str, seconds: float) -> None:
        """Count one inference request answered with ``status`` after ``seconds``."""
        self.inference_requests.labels(protocol, status).inc()
        self.inference_seconds.labels(protocol).observe(seconds)

    def instrument_engine(self, engine: Any) -> None:
        """Time ``engine``'s forward, backward and update phases into ``mpnn_pass_phase_seconds``
        (through its ``phase_observer``; the engine itself knows nothing of metrics)."""
        engine.phase_observer = lambda phase, seconds: self.phase_seconds.labels(phase).observe(seconds)

    def instrument_inference(self, inference: Any) -> None:
        """Count the rows of ``inference``'s passes into ``mpnn_inference_pass_rows`` (through its
        ``pass_observer``)."""
        inference.pass_observer = self.inference_pass_rows.observe

    def exposition(self) -> bytes:
        """The text exposition format (``CONTENT_TYPE``) of every metric, now."""
        return generate_latest(self.registry)


class _OpenedStreams:
    """``mpnn_peer_streams_opened_total{direction}``, read from the server at scrape time."""

    def __init__(self, peer_streams: Callable[[], tuple[int, int, int, int]]):
        self._peer_streams = peer_streams

    def describe(self):
        return [CounterMetricFamily("mpnn_peer_streams_opened", "Peer ExchangeStreams opened", labels=["direction"])]

    def collect(self):
        inbound_open, inbound, outbound_open, outbound = self._peer_streams()
        family = CounterMetricFamily("mpnn_peer_streams_opened", "Peer ExchangeStreams opened", labels=["direction"])
        family.add_metric(["in"], inbound)
        family.add_metric(["out"], outbound)
        yield family
