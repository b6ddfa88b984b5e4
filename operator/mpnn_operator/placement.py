"""Where neurons live: distributed from the strategy, or as the Partitions say.

The Partition CRs are the placement in force. The operator rewrites them from
``spec.distribution`` only when the inputs of the distribution change (layer
sizes, partition count, distribution; see :func:`distribution_hash`) or when the
set of Partitions is incomplete. Otherwise hand edits of ``spec.ranges`` stand:
they become the lookup table once every neuron is owned exactly once, and until
then :attr:`Placement.problems` names the neurons owned twice or never.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from partition_server.api.coverage import check_coverage, normalize
from partition_server.api.distributor import Assignment, DistributionError, Range, distribute, parse_neuron_ids
from partition_server.api.manifest import NeuralNetwork

__all__ = ["MANUAL", "STRATEGY", "Placement", "distribution_hash", "owners_from_partitions", "parse_ranges",
           "partition_index", "plan"]

STRATEGY, MANUAL = "strategy", "manual"


@dataclass(frozen=True)
class Placement:
    """The outcome of :func:`plan`.

    Attributes:
        assignment: the assignment to publish; None while the Partitions are inconsistent.
        redistribute: the Partitions must be (re)written from the strategy.
        source: ``strategy`` or ``manual`` (the assignment differs from the strategy's).
        problems: neurons owned twice or never, malformed ranges (empty when consistent).
        distribution_hash: :func:`distribution_hash` of the network.
    """

    assignment: Assignment | None
    redistribute: bool
    source: str
    problems: tuple[str, ...]
    distribution_hash: str


def distribution_hash(net: NeuralNetwork) -> str:
    """``sha256:<hex>`` of what the strategy's assignment depends on."""
    inputs = {"layers": net.model.layer_units, "partitions": net.partitions,
              "distribution": net.distribution.to_dict()}
    return "sha256:" + hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def partition_index(obj: Mapping[str, Any]) -> int | None:
    """A Partition's ``spec.index``, or None unless it is an integer."""
    index = (obj.get("spec") or {}).get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) else None


def parse_ranges(obj: Mapping[str, Any]) -> tuple[list[tuple[int, int, int]], list[str]]:
    """A Partition's ``spec.ranges`` as ``(layer, start, end)`` half-open triples, plus problems."""
    name = (obj.get("metadata") or {}).get("name", "?")
    triples, problems = [], []
    for j, text in enumerate((obj.get("spec") or {}).get("ranges") or []):
        try:
            triples.append(parse_neuron_ids(text, f"Partition {name} spec.ranges[{j}]"))
        except DistributionError as exc:
            problems.append(str(exc))
    return triples, problems


def owners_from_partitions(partitions: Sequence[Mapping[str, Any]], layer_units: Sequence[int]
                           ) -> tuple[Assignment, list[str]]:
    """Per-layer ranges claimed by the Partitions, and every problem with them.

    Problems name the Partition for malformed ranges or unknown layers, and the
    neurons (``L:A-B``) owned twice or by no partition.
    """
    owners: Assignment = [[] for _ in layer_units]
    problems: list[str] = []
    for obj in partitions:
        index = partition_index(obj)
        triples, bad = parse_ranges(obj)
        problems += bad
        for layer, start, end in triples:
            if layer >= len(layer_units):
                name = obj["metadata"]["name"]
                problems.append(f"Partition {name}: layer {layer} does not exist "
                                f"(the network has {len(layer_units)})")
                continue
            owners[layer].append(Range(index, start, end))
    problems += check_coverage(layer_units, owners)
    return normalize(owners), problems


def plan(net: NeuralNetwork, partitions: Sequence[Mapping[str, Any]], recorded_hash: str | None) -> Placement:
    """Decide the placement of ``net`` given its current Partitions.

    Args:
        net: the validated network.
        partitions: the network's Partition objects (as dicts; those being deleted excluded).
        recorded_hash: the distribution hash the Partitions were last written for
            (``status.distributionHash``), None if never.

    Raises:
        DistributionError: never for a validated ``net``.
    """
    strategy = distribute(net.model.layer_units, net.partitions, net.distribution)
    digest = distribution_hash(net)
    indices = sorted(-1 if i is None else i for i in map(partition_index, partitions))
    if recorded_hash != digest or indices != list(range(net.partitions)):
        return Placement(normalize(strategy), True, STRATEGY, (), digest)
    owners, problems = owners_from_partitions(partitions, net.model.layer_units)
    if problems:
        return Placement(None, False, MANUAL, tuple(problems), digest)
    source = STRATEGY if owners == normalize(strategy) else MANUAL
    return Placement(owners, False, source, (), digest)
