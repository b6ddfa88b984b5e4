"""``mpnn render MANIFEST``: the objects the operator would create, as YAML on stdout.

Same builders as the operator, without owner references (there is no
NeuralNetwork uid yet), for GitOps users and for review. The namespace is the
manifest's (``default`` if unset) unless ``--namespace`` overrides it; it
matters, since it is part of every address in ``lookup.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from typing import Any

import yaml

from partition_server.api.distributor import distribute
from partition_server.api.manifest import DEFAULT_IMAGE, ManifestError, load_manifest

from . import builders

_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def render(manifest: str, cluster_domain: str = "cluster.local", namespace: str | None = None,
           server_image: str | None = None) -> list[dict[str, Any]]:
    """The children of the NeuralNetwork in ``manifest``, in apply order; ``server_image`` stands
    for the operator's ``--server-image`` (default: :data:`DEFAULT_IMAGE`).

    Raises:
        ManifestError: the manifest is unreadable or invalid (names the field).
    """
    net = load_manifest(manifest)
    if namespace:
        if not _NAMESPACE.fullmatch(namespace):
            raise ManifestError("--namespace", namespace, "must be a DNS-1123 label (lowercase letters, digits, '-')")
        net = dataclasses.replace(net, namespace=namespace)
    assignment = distribute(net.model.layer_units, net.partitions, net.distribution)
    return builders.children(net, assignment, cluster_domain, server_image or DEFAULT_IMAGE)


class _Dumper(yaml.SafeDumper):
    """Writes the ConfigMap's JSON documents as literal blocks, readable in review."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    """A multi-document YAML stream, keys in builder order."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def main(args: argparse.Namespace) -> int:
    sys.stdout.write(to_yaml(render(args.manifest, args.cluster_domain, args.namespace, args.server_image)))
    return 0
