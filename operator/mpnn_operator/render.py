"""``mpnn render MANIFEST``: the objects the operator would create, as YAML on stdout.

Same builders as the operator, without owner references (there is no
NeuralNetwork uid yet), for GitOps users and for review. The namespace is the
manifest's (``default`` if unset) unless ``--namespace`` overrides it; it
matters, since it is part of every address in ``lookup.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

import yaml

from partition_server.api.distributor import distribute
from partition_server.api.manifest import DEFAULT_IMAGE, NAMESPACE_RE, ManifestError, load_manifest, parse_resources

from . import builders

__all__ = ["main", "render", "server_resources_flag", "to_yaml"]


def render(manifest: str, *, cluster_domain: str = "cluster.local", namespace: str | None = None,
           server_image: str | None = None, server_resources: dict[str, Any] | None = None
           ) -> list[dict[str, Any]]:
    """The children of the NeuralNetwork in ``manifest``, in apply order; ``server_image`` stands
    for the operator's ``--server-image`` (default: :data:`DEFAULT_IMAGE`), ``server_resources``
    for its ``--server-resources``.

    Raises:
        ManifestError: the manifest is unreadable or invalid (names the field).
    """
    net = load_manifest(manifest)
    if namespace:
        if not NAMESPACE_RE.fullmatch(namespace):
            raise ManifestError("--namespace", namespace, "must be a DNS-1123 label (lowercase letters, digits, '-')")
        net = dataclasses.replace(net, namespace=namespace)
    assignment = distribute(net.model.layer_units, net.partitions, net.distribution)
    return builders.children(net, assignment, cluster_domain=cluster_domain,
                             default_image=server_image or DEFAULT_IMAGE, default_resources=server_resources)


class _Dumper(yaml.SafeDumper):
    """Writes the ConfigMap's JSON documents as literal blocks, readable in review."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """A multi-document YAML stream, keys in builder order."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def server_resources_flag(text: str) -> dict[str, Any]:
    """``--server-resources``: JSON ``{requests, limits}``.

    Raises:
        ManifestError: not JSON, or not container resources (names the flag).
    """
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ManifestError("--server-resources", text, f"is not JSON: {exc}") from exc
    return parse_resources(value, "--server-resources")


def main(args: argparse.Namespace) -> int:
    """``mpnn render``: the objects as YAML on stdout; returns the exit code."""
    sys.stdout.write(to_yaml(render(args.manifest, cluster_domain=args.cluster_domain, namespace=args.namespace,
                                    server_image=args.server_image,
                                    server_resources=server_resources_flag(args.server_resources))))
    return 0
