"""Pure parts of the operator: placement decisions and status conditions (no cluster)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mpnn_operator import builders
from mpnn_operator.conditions import Finding, network_status, set_condition
from mpnn_operator.placement import MANUAL, STRATEGY, distribution_hash, owners_from_partitions, plan
from partition_server.api.coverage import normalize
from partition_server.api.distributor import Distribution, distribute
from partition_server.api.manifest import load_manifest

DIGITS = Path(__file__).resolve().parents[2] / "examples" / "digits.yaml"


def _net():
    return load_manifest(DIGITS)


def _partitions(net, ranges=None):
    assignment = distribute(net.model.layer_units, net.partitions, net.distribution)
    objs = builders.partitions(net, assignment)
    for obj, r in zip(objs, ranges or []):
        if r is not None:
            obj["spec"]["ranges"] = r
    return objs


def test_first_placement_distributes_from_the_strategy():
    net = _net()
    p = plan(net, [], None)
    assert p.redistribute and p.source == STRATEGY and p.problems == ()
    assert p.assignment == normalize(distribute(net.model.layer_units, 4, net.distribution))
    assert p.distribution_hash == distribution_hash(net)


def test_unchanged_inputs_keep_the_partitions_in_force():
    net = _net()
    p = plan(net, _partitions(net), distribution_hash(net))
    assert not p.redistribute and p.source == STRATEGY and p.problems == ()


def test_consistent_hand_edits_are_a_manual_placement():
    net = _net()
    # Move 0:0-3 from partition 0 to partition 1.
    edited = _partitions(net, [["0:4-31", "1:0-15", "2:0-2"], ["0:0-3", "0:32-63", "1:16-31", "2:3-5"]])
    p = plan(net, edited, distribution_hash(net))
    assert not p.redistribute and p.source == MANUAL and p.problems == ()
    assert [r for r in p.assignment[0] if r.start == 0][0].partition == 1


def test_inconsistent_hand_edits_name_the_neurons():
    net = _net()
    removed = _partitions(net, [["0:4-31", "1:0-15", "2:0-2"]])
    p = plan(net, removed, distribution_hash(net))
    assert p.assignment is None and not p.redistribute
    assert p.problems == ("neurons 0:0-3 owned by no partition",)
    doubled = _partitions(net, [None, ["0:0-3", "0:32-63", "1:16-31", "2:3-5"]])
    assert plan(net, doubled, distribution_hash(net)).problems == ("neurons 0:0-3 owned twice",)


def test_bad_ranges_are_problems_naming_the_partition():
    net = _net()
    _, problems = owners_from_partitions(_partitions(net, [["0:0-31", "1:0-15", "2:0-2", "7:0"]]), [128, 64, 10])
    assert problems == ["Partition digits-0: layer 7 does not exist (the network has 3)"]
    _, problems = owners_from_partitions(_partitions(net, [["0:0-31", "1:0-15", "2:0-2", "x"]]), [128, 64, 10])
    assert problems[0].startswith("Partition digits-0 spec.ranges[3]")


def test_a_spec_change_of_the_distribution_inputs_redistributes_over_hand_edits():
    net = _net()
    edited = _partitions(net, [["0:4-31", "1:0-15", "2:0-2"], ["0:0-3", "0:32-63", "1:16-31", "2:3-5"]])
    recorded = distribution_hash(net)
    scaled = net.with_partitions(6)
    assert plan(scaled, edited, recorded).redistribute
    counted = dataclasses.replace(net, distribution=Distribution("count", counts=(50, 50, 50, 52)))
    assert plan(counted, edited, recorded).redistribute


def test_a_missing_partition_redistributes():
    net = _net()
    assert plan(net, _partitions(net)[:3], distribution_hash(net)).redistribute


def test_condition_transition_time_moves_only_on_a_status_change():
    conds = set_condition([], "Ready", status=False, reason="A", message="a", generation=1, timestamp="t1")
    conds = set_condition(conds, "Ready", status=False, reason="B", message="b", generation=2, timestamp="t2")
    assert conds == [{"type": "Ready", "status": "False", "reason": "B", "message": "b",
                      "lastTransitionTime": "t1", "observedGeneration": 2}]
    conds = set_condition(conds, "Ready", status=True, reason="C", message="c", generation=2, timestamp="t3")
    assert conds[0]["lastTransitionTime"] == "t3" and conds[0]["status"] == "True"


def _sts(replicas, ready, updated=None, generation=1, observed=1):
    return {"metadata": {"generation": generation}, "spec": {"replicas": replicas},
            "status": {"replicas": replicas, "readyReplicas": ready,
                       "updatedReplicas": replicas if updated is None else updated,
                       "observedGeneration": observed}}


def test_network_status_phases():
    ok = Finding(False, "Reconciled", "fine")
    bad = Finding(True, "InconsistentPartitions", "neurons 0:0-3 owned twice")
    s = network_status({}, statefulset=None, desired=None, finding=ok, generation=1, timestamp="t")
    assert s["phase"] == "Progressing" and s["readyPartitions"] == 0
    s = network_status(s, statefulset=_sts(4, 2), desired=4, finding=ok, generation=1, timestamp="t")
    assert s["phase"] == "Progressing"
    assert {c["type"]: c["status"] for c in s["conditions"]} == \
        {"Ready": "False", "Progressing": "True", "Degraded": "False"}
    s = network_status(s, statefulset=_sts(4, 4), desired=4, finding=None, generation=1, timestamp="t2")
    assert s["phase"] == "Ready" and s["readyPartitions"] == 4
    assert [c["type"] for c in s["conditions"]] == ["Ready", "Progressing", "Degraded"]
    # The controller has not seen the new spec yet: not ready.
    s2 = network_status(s, statefulset=_sts(4, 4, generation=2, observed=1), desired=4, finding=None,
                        generation=1, timestamp="t3")
    assert s2["phase"] == "Progressing"
    s = network_status(s, statefulset=_sts(4, 4), desired=4, finding=bad, generation=2, timestamp="t4")
    assert s["phase"] == "Degraded"
    degraded = next(c for c in s["conditions"] if c["type"] == "Degraded")
    assert degraded["message"] == "neurons 0:0-3 owned twice" and degraded["observedGeneration"] == 2
    # Recomputing the same status is a fixed point (so no API write).
    again = network_status(s, statefulset=_sts(4, 4), desired=4, finding=bad, generation=2, timestamp="t5")
    assert again == s
