"""``mpnn``: the command line for both planes.

Each subcommand imports its implementation lazily, so ``mpnn serve`` (the
partition servers' entrypoint) starts without loading kopf or the Kubernetes
client. Exit codes: 0 success, 1 runtime failure, 2 bad usage or invalid input.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module

from partition_server.api.environment import PEER_KEY_FILE_ENV
from partition_server.api.manifest import DEFAULT_IMAGE

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "distribute", "main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
# What `pip install 'mpnn[operator]'` adds; the partition servers and local mode need none of it.
OPERATOR_EXTRA = ("kopf", "kubernetes")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpnn", description="Deploy one neural network across many partition servers.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("distribute", help="print lookup.json for a NeuralNetwork manifest",
                       description="Run the distributor on MANIFEST and print lookup.json to stdout.")
    d.add_argument("manifest")
    d.add_argument("--partitions", type=int, help="override spec.partitions")
    d.add_argument("--cluster-domain", default="cluster.local", help="DNS suffix of the addresses (default: %(default)s)")
    d.set_defaults(target="partition_server.cli:distribute")

    r = sub.add_parser("run", help="run a manifest as local partition server processes",
                       description="Distribute MANIFEST, start one `mpnn serve` per partition on loopback, "
                                   "train if spec.training is set, then evaluate.")
    r.add_argument("manifest")
    r.add_argument("--partitions", type=int, help="override spec.partitions")
    r.add_argument("--data", help="dataset directory or file (overrides spec.training.dataset.path)")
    r.add_argument("--workdir", help="directory standing in for the NFS volume (default: a temporary one)")
    r.add_argument("--json", action="store_true", help="print one JSON object with the results")
    r.add_argument("--epochs", type=int, help="override spec.training.epochs")
    r.add_argument("--predict", metavar="INPUT.npy", help="skip training; write outputs for this [batch, inputs] array")
    r.add_argument("--output", metavar="OUT.npy", help="where --predict writes the outputs")
    r.add_argument("--serve", action="store_true", help="keep the servers up after training and print endpoints")
    r.add_argument("--tls-dir", default=os.environ.get("MPNN_TLS_DIR") or None,
                   help="directory holding tls.crt, tls.key and ca.crt, as spec.server.tls mounts them: mutual "
                        "TLS between the servers (and the driver), TLS on their gRPC and REST ports; the "
                        "certificate must name 127.0.0.1 and be good for server and client auth "
                        "(env MPNN_TLS_DIR; default: plaintext)")
    r.add_argument("--repartition", action="append", metavar="STEP:PARTITIONS[:balanced|layers]",
                   help="after training step STEP, checkpoint and move to PARTITIONS partitions (and strategy) "
                        "without losing progress; repeatable")
    r.add_argument("--max-restarts", type=_restarts, default=3,
                   help="restart crashed partition servers this many times in all, then fail naming the "
                        "server (default: %(default)s); training resumes from the last committed checkpoint")
    r.set_defaults(target="partition_server.client.local_run:main")

    s = sub.add_parser("serve", help="run one partition server (the container entrypoint)",
                       description="Serve one partition to its peers (mpnn.v1.Partition on --peer-port, calls "
                                   "signed with the network's key only), and the whole network over the Open "
                                   "Inference Protocol v2 (gRPC on --port, REST on --http-port). Settings come from "
                                   "flags or MPNN_* variables.")
    s.add_argument("--partition", type=_index, default=os.environ.get("MPNN_PARTITION") or None,
                   help="partition index (env MPNN_PARTITION; default: the hostname's ordinal suffix)")
    s.add_argument("--lookup", default=os.environ.get("MPNN_LOOKUP", "/etc/mpnn/lookup.json"),
                   help="lookup.json path (env MPNN_LOOKUP; default: %(default)s)")
    s.add_argument("--network", default=os.environ.get("MPNN_NETWORK", "/etc/mpnn/network.json"),
                   help="network.json path (env MPNN_NETWORK; default: %(default)s)")
    s.add_argument("--model-dir", default=os.environ.get("MPNN_MODEL_DIR", "/var/lib/mpnn/model"),
                   help="the network's directory on the shared volume (env MPNN_MODEL_DIR; default: %(default)s)")
    s.add_argument("--host", default=os.environ.get("MPNN_HOST", "0.0.0.0"), help="bind address (default: %(default)s)")
    s.add_argument("--port", type=_port, default=os.environ.get("MPNN_PORT", "50051"),
                   help="public gRPC port: Open Inference Protocol, health (env MPNN_PORT; default: %(default)s)")
    s.add_argument("--peer-port", type=_port, default=os.environ.get("MPNN_PEER_PORT", "50052"),
                   help="peer port: mpnn.v1.Partition, the port lookup.json names (env MPNN_PEER_PORT; "
                        "default: %(default)s)")
    _peer_security(s)
    s.add_argument("--http-port", type=_port, default=os.environ.get("MPNN_HTTP_PORT", "8000"),
                   help="Open Inference Protocol v2 REST port; 0 disables REST "
                        "(env MPNN_HTTP_PORT; default: %(default)s)")
    s.add_argument("--log-level", default=os.environ.get("MPNN_LOG_LEVEL", "info"))
    s.set_defaults(target="partition_server.serving.main:main")

    t = sub.add_parser("train", help="run a training run against deployed partition servers (the Job's command)",
                       description="Train the network served at the lookup's addresses, checkpointing to the "
                                   "shared volume and reporting progress into the NeuralNetwork's status.training.")
    t.add_argument("--training", required=True, help="spec.training as JSON (camelCase keys, as in the manifest)")
    t.add_argument("--lookup", default=os.environ.get("MPNN_LOOKUP", "/etc/mpnn/lookup.json"))
    t.add_argument("--network", default=os.environ.get("MPNN_NETWORK", "/etc/mpnn/network.json"))
    t.add_argument("--model-dir", default=os.environ.get("MPNN_MODEL_DIR", "/var/lib/mpnn/model"))
    t.add_argument("--namespace", default=os.environ.get("MPNN_NAMESPACE", "default"),
                   help="namespace of the NeuralNetwork to report to (env MPNN_NAMESPACE)")
    t.add_argument("--report", action="store_true", help="patch status.training of the NeuralNetwork")
    t.add_argument("--timeout", type=float, default=120.0, help="deadline of each step, seconds")
    t.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for every partition")
    _peer_security(t)
    t.add_argument("--recovery-timeout", type=float, default=300.0,
                   help="seconds to wait for a failed partition to come back before the attempt fails "
                        "(then the Job retries); 0: fail at once")
    t.add_argument("--rescale-poll", type=float, default=1.0,
                   help="with --report: how often, at most, to read status.training.rescale at a step boundary "
                        "for the operator's checkpoint request before a rescale, seconds (default: %(default)s)")
    t.add_argument("--log-level", default=os.environ.get("MPNN_LOG_LEVEL", "info"))
    t.set_defaults(target="partition_server.client.trainer:main")

    o = sub.add_parser("operator", help="run the Kubernetes operator (kopf)",
                       description="Reconcile NeuralNetwork resources into partition-server deployments.")
    o.add_argument("--namespace", action="append", dest="namespaces",
                   help="watch this namespace (repeatable); default: all namespaces")
    o.add_argument("--cluster-domain", default=os.environ.get("MPNN_CLUSTER_DOMAIN", "cluster.local"))
    o.add_argument("--server-image", default=os.environ.get("MPNN_SERVER_IMAGE") or DEFAULT_IMAGE,
                   help="image of partition servers and training Jobs whose NeuralNetwork sets no "
                        "spec.server.image (env MPNN_SERVER_IMAGE; default: %(default)s)")
    o.add_argument("--server-resources", default=os.environ.get("MPNN_SERVER_RESOURCES") or "{}",
                   help="JSON {requests, limits} of partition servers whose NeuralNetwork sets no "
                        "spec.server.resources (env MPNN_SERVER_RESOURCES; the chart's serverResources)")
    o.add_argument("--liveness-port", type=_port, default=os.environ.get("MPNN_LIVENESS_PORT", "8080"),
                   help="serve /healthz on this port (default: %(default)s)")
    o.add_argument("--metrics-port", type=_port, default=os.environ.get("MPNN_METRICS_PORT", "8081"),
                   help="serve Prometheus /metrics on this port; 0: none (default: %(default)s)")
    o.add_argument("--rescale-timeout", type=float, default=float(os.environ.get("MPNN_RESCALE_TIMEOUT", "120")),
                   help="seconds a new lookup table waits for the checkpoint of a Running training run before "
                        "it is published anyway (env MPNN_RESCALE_TIMEOUT; default: %(default)s)")
    o.add_argument("--log-level", default=os.environ.get("MPNN_LOG_LEVEL", "info"))
    o.set_defaults(target="mpnn_operator.main:main")

    n = sub.add_parser("render", help="print the Kubernetes objects the operator would create",
                       description="Render MANIFEST into the operator's child objects as YAML, from the same builders.")
    n.add_argument("manifest")
    n.add_argument("--cluster-domain", default="cluster.local")
    n.add_argument("--namespace", help="namespace of the objects (default: the manifest's, else default)")
    n.add_argument("--server-image", default=DEFAULT_IMAGE,
                   help="image of the servers and the training Job unless spec.server.image is set, as the "
                        "operator's --server-image (default: %(default)s)")
    n.add_argument("--server-resources", default="{}",
                   help="JSON {requests, limits} standing for the operator's --server-resources")
    n.set_defaults(target="mpnn_operator.render:main")
    return p


def _peer_security(p: argparse.ArgumentParser) -> None:
    """The peer key and TLS flags that ``mpnn serve`` and ``mpnn train`` share."""
    p.add_argument("--peer-key-file", default=os.environ.get(PEER_KEY_FILE_ENV),
                   help=f"file holding the network's peer key, 256 random bits (env {PEER_KEY_FILE_ENV}; "
                        "required: the mounted Secret <name>-peer-key)")
    p.add_argument("--tls-dir", default=os.environ.get("MPNN_TLS_DIR") or None,
                   help="directory of a kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt): mutual TLS between "
                        "peers, TLS on the public ports (env MPNN_TLS_DIR; default: plaintext)")


def _at_least_zero(text: str, what: str, subject: str = "") -> int:
    """argparse type body: ``text`` as an int >= 0; ``what`` names it when it is not a number,
    ``subject`` (with a trailing space) starts the message when it is negative."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a {what}: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{subject}must be >= 0, got {value}")
    return value


def _restarts(text: str) -> int:
    return _at_least_zero(text, "whole number")


def _port(text: str) -> int:
    """argparse type: a TCP port, 0 (the OS picks) to 65535. String defaults (from MPNN_* variables)
    pass through it too, so a bad variable is a usage error naming the option, not a traceback."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {value}")
    return value


def _index(text: str) -> int:
    return _at_least_zero(text, "partition index", "partition index ")


def distribute(args: argparse.Namespace) -> int:
    """``mpnn distribute``: lookup.json with the addresses the operator would publish."""
    from partition_server.api.distributor import distribute as assign
    from partition_server.api.lookup import LookupTable, service_addresses
    from partition_server.api.manifest import load_manifest

    net = load_manifest(args.manifest)
    if args.partitions is not None:
        net = net.with_partitions(args.partitions)
    assignment = assign(net.model.layer_units, net.partitions, net.distribution)
    addresses = service_addresses(net.name, net.namespace, net.partitions, net.server.peer_port, args.cluster_domain)
    sys.stdout.write(LookupTable.build(net.name, net.model.layer_units, assignment, addresses).to_json(indent=2))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from partition_server.api.errors import FieldError

    args = _parser().parse_args(argv)
    module, func = args.target.split(":")
    try:
        target = import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in OPERATOR_EXTRA:
            raise
        print(f"mpnn {args.command}: error: needs the [operator] extra ({', '.join(OPERATOR_EXTRA)}), and "
              f"{exc.name} is not installed: pip install 'mpnn[operator]'", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(getattr(target, func)(args) or EXIT_OK)
    except FieldError as exc:
        print(f"mpnn {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError) as exc:  # unreadable data, a full disk, a checkpoint that fails its checks
        print(f"mpnn {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
