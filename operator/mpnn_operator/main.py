"""``mpnn operator``: run the kopf operator until SIGINT/SIGTERM.

Standalone (no peering objects): run exactly one replica. Watches the given
namespaces, or all of them. ``/healthz`` on ``--liveness-port`` answers once
the operator is up (0 disables it); ``/metrics`` on ``--metrics-port`` (0 disables it) serves
the Prometheus metrics of :mod:`mpnn_operator.metrics`.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Mapping

import kopf
from prometheus_client import start_http_server

from partition_server.api.errors import FieldError

from . import handlers, naming
from .kube import Kube
from .reconcile import Reconciler
from .rescale import DEFAULT_TIMEOUT
from .render import server_resources_flag
from .retry import Later

__all__ = ["LOG_LEVELS", "main", "settings"]

LOG_LEVELS = ("debug", "info", "warning", "error")


def settings() -> kopf.OperatorSettings:
    """kopf settings: our own finalizer and annotation keys; only warnings of handlers
    are mirrored as Events (the reconciler posts its own)."""
    s = kopf.OperatorSettings()
    s.persistence.finalizer = f"{naming.GROUP}/cleanup"
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=naming.GROUP)
    s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=naming.GROUP, key="last-handled-configuration")
    s.posting.level = logging.WARNING
    return s


def _emit(obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    kopf.event(dict(obj), type=type_, reason=reason, message=message[:1024])


def _adopt(child: dict[str, Any], owner: Mapping[str, Any]) -> None:
    # Not kopf.adopt: that would also copy the owner's labels, making children
    # differ from `mpnn render` and change whenever the NeuralNetwork is relabelled.
    kopf.append_owner_reference(child, owner=kopf.Body(dict(owner)))


def main(args: argparse.Namespace) -> int:
    """Run the operator; returns the exit code after a graceful stop.

    Raises:
        FieldError: ``args.log_level`` is not one of :data:`LOG_LEVELS`, or ``args.server_resources``
            is not JSON container resources.
    """
    level = str(args.log_level).lower()
    if level not in LOG_LEVELS:
        raise FieldError("--log-level", args.log_level, f"must be one of {', '.join(LOG_LEVELS)}")
    kopf.configure(debug=level == "debug", log_format=kopf.LogFormat.PLAIN)
    logging.getLogger().setLevel(level.upper())
    reconciler = Reconciler(Kube(), args.cluster_domain, emit=_emit, adopt=_adopt, server_image=args.server_image,
                            server_resources=server_resources_flag(args.server_resources),
                            rescale_timeout=getattr(args, "rescale_timeout", DEFAULT_TIMEOUT))
    later = Later()  # reconciles that watch events deferred (handlers.run_for_event)
    if getattr(args, "metrics_port", 0):
        start_http_server(args.metrics_port, registry=reconciler.metrics.registry)
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    try:
        kopf.run(registry=handlers.registry, settings=settings(), standalone=True,
                 clusterwide=not args.namespaces, namespaces=args.namespaces or (),
                 liveness_endpoint=liveness, memo=kopf.Memo(reconciler=reconciler, later=later))
    finally:
        later.cancel()
    return 0
