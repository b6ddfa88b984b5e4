"""The distributor's strategies, exactly as DESIGN.md ("Distributor strategies") states them."""

from __future__ import annotations

import numpy as np
import pytest

from partition_server.api.coverage import check_coverage, normalize, range_texts, shares
from partition_server.api.distributor import (
    Distribution,
    DistributionError,
    Range,
    distribute,
    parse_neuron_ids,
    percentages_to_counts,
    Runs,
)


def R(p: int, a: int, b: int) -> Range:
    return Range(p, a, b)


def owner_map(layer_units, assignment) -> list[list[int]]:
    """Per layer, the owning partition of every unit (-1 if none, raises on a double owner)."""
    out = []
    for units, ranges in zip(layer_units, assignment):
        owners = [-1] * units
        for r in ranges:
            for u in range(r.start, r.end):
                assert owners[u] == -1, f"unit {u} owned twice"
                owners[u] = r.partition
        out.append(owners)
    return out


def assert_well_formed(layer_units, assignment, partitions):
    """Sorted, merged, non-empty ranges covering every layer exactly once."""
    assert len(assignment) == len(layer_units)
    assert check_coverage(layer_units, assignment) == []
    for units, ranges in zip(layer_units, assignment):
        assert ranges, "every layer has at least one owner"
        assert ranges[0].start == 0 and ranges[-1].end == units
        for r in ranges:
            assert 0 <= r.partition < partitions
            assert r.start < r.end
        for a, b in zip(ranges, ranges[1:]):
            assert a.end == b.start, "sorted and contiguous"
            assert a.partition != b.partition, "adjacent ranges of one partition are merged"


# --------------------------------------------------------------------------- auto


class TestAuto:
    def test_narrow_layers_stay_whole_on_the_last_partitions(self):
        got = distribute([128, 64, 10], 4, Distribution("auto"))
        assert got[:2] == distribute([128, 64], 4, Distribution("balanced"))
        assert got[2] == [R(3, 0, 10)]
        # Several narrow layers rotate from the last partition down.
        got = distribute([40, 300, 12, 9], 3, Distribution("auto"))
        assert [list(layer) for layer in got] == [[R(2, 0, 40)], list(distribute([300], 3, Distribution())[0]),
                                                  [R(1, 0, 12)], [R(0, 0, 9)]]

    def test_threshold_and_single_partition(self):
        assert len(distribute([64], 4, Distribution("auto"))[0]) == 4   # 16 per partition: split
        assert len(distribute([63], 4, Distribution("auto"))[0]) == 1   # below: whole
        assert distribute([5, 3], 1, Distribution("auto")) == distribute([5, 3], 1, Distribution())

    def test_manifest_accepts_auto(self):
        from partition_server.api.manifest import parse_neural_network
        net = parse_neural_network({"apiVersion": "mpnn.dev/v1alpha1", "kind": "NeuralNetwork",
                                    "metadata": {"name": "n"},
                                    "spec": {"model": {"inputs": 4, "layers": [{"units": 64, "activation": "relu"},
                                                                               {"units": 10, "activation": "softmax"}]},
                                             "partitions": 4, "distribution": {"strategy": "auto"}}})
        assert net.distribution.strategy == "auto"


# --------------------------------------------------------------------------- balanced


class TestBalanced:
    def test_default_strategy_is_balanced(self):
        assert Distribution().strategy == "balanced"

    def test_exact_ranges_with_remainder(self):
        # 10 = 3*3 + 1: partition 0 gets the extra; 7 = 3*2 + 1; 3 = 3*1.
        got = distribute([10, 7, 3], 3, Distribution())
        assert got == [
            [R(0, 0, 4), R(1, 4, 7), R(2, 7, 10)],
            [R(0, 0, 3), R(1, 3, 5), R(2, 5, 7)],
            [R(0, 0, 1), R(1, 1, 2), R(2, 2, 3)],
        ]

    def test_first_units_mod_p_partitions_get_one_extra(self):
        units, P = 103, 8  # 103 = 8*12 + 7
        (ranges,) = distribute([units], P, Distribution())
        sizes = [r.size for r in ranges]
        assert sizes == [13] * 7 + [12]
        assert [r.partition for r in ranges] == list(range(P))

    def test_fewer_units_than_partitions_leaves_partitions_empty_in_that_layer(self):
        got = distribute([8, 2, 3], 4, Distribution())
        assert got[0] == [R(0, 0, 2), R(1, 2, 4), R(2, 4, 6), R(3, 6, 8)]
        assert got[1] == [R(0, 0, 1), R(1, 1, 2)]          # partitions 2, 3 own nothing here
        assert got[2] == [R(0, 0, 1), R(1, 1, 2), R(2, 2, 3)]  # partition 3 owns nothing here

    def test_single_partition_owns_everything(self):
        assert distribute([5, 6], 1, Distribution()) == [[R(0, 0, 5)], [R(0, 0, 6)]]

    def test_formula_over_many_sizes(self):
        for units in range(1, 40):
            for P in range(1, min(units, 12) + 1):
                (ranges,) = distribute([units], P, Distribution())
                base, extra = divmod(units, P)
                assert [r.size for r in ranges] == [base + (p < extra) for p in range(P)]


# --------------------------------------------------------------------------- count


class TestCount:
    def test_spans_layer_boundaries_in_layer_major_order(self):
        got = distribute([3, 4, 2], 2, Distribution("count", counts=(5, 4)))
        assert got == [
            [R(0, 0, 3)],
            [R(0, 0, 2), R(1, 2, 4)],
            [R(1, 0, 2)],
        ]

    def test_three_partitions_across_layers(self):
        got = distribute([4, 4, 4], 3, Distribution("count", counts=(1, 6, 5)))
        assert got == [
            [R(0, 0, 1), R(1, 1, 4)],
            [R(1, 0, 3), R(2, 3, 4)],
            [R(2, 0, 4)],
        ]

    def test_count_ending_exactly_on_a_layer_boundary(self):
        got = distribute([3, 3], 2, Distribution("count", counts=(3, 3)))
        assert got == [[R(0, 0, 3)], [R(1, 0, 3)]]

    def test_zero_count_partition_owns_nothing(self):
        got = distribute([3, 3], 3, Distribution("count", counts=(2, 0, 4)))
        assert got == [[R(0, 0, 2), R(2, 2, 3)], [R(2, 0, 3)]]

    def test_sum_off(self):
        with pytest.raises(DistributionError) as ei:
            distribute([3, 4], 2, Distribution("count", counts=(3, 3)))
        assert ei.value.field == "spec.distribution.counts"
        assert ei.value.value == [3, 3]

    def test_wrong_length(self):
        with pytest.raises(DistributionError) as ei:
            distribute([3, 4], 3, Distribution("count", counts=(3, 4)))
        assert ei.value.field == "spec.distribution.counts"

    def test_missing_list(self):
        with pytest.raises(DistributionError) as ei:
            distribute([3, 4], 2, Distribution("count"))
        assert ei.value.field == "spec.distribution.counts"

    @pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
    def test_bad_entry(self, bad):
        with pytest.raises(DistributionError) as ei:
            distribute([3, 4], 2, Distribution("count", counts=(bad, 7)))
        assert ei.value.field == "spec.distribution.counts[0]"
        assert ei.value.value == bad


# --------------------------------------------------------------------------- percentage


class TestPercentage:
    def test_largest_remainder_33_3(self):
        # quotas 3.33, 3.33, 3.34: floors 3,3,3, the one left goes to the largest remainder.
        assert percentages_to_counts([33.3, 33.3, 33.4], 10) == [3, 3, 4]

    def test_tie_goes_to_lower_index(self):
        # quotas 1.5 each: two left over go to partitions 0 and 1.
        assert percentages_to_counts([25, 25, 25, 25], 6) == [2, 2, 1, 1]
        assert percentages_to_counts([50, 50], 5) == [3, 2]
        # quotas 0.5, 0.5, 3.0: one left over, tie between 0 and 1.
        assert percentages_to_counts([12.5, 12.5, 75], 4) == [1, 0, 3]

    def test_tie_that_float_arithmetic_would_break_wrongly(self):
        # Exact quotas 0.34, 1.34, 2.32 tie between 0 and 1; in floats 33.5*4/100 has the
        # larger remainder (0.3400000000000001), which would wrongly favour index 1.
        assert percentages_to_counts([8.5, 33.5, 58.0], 4) == [1, 1, 2]

    def test_exact_quotas_need_no_rounding(self):
        assert percentages_to_counts([10, 20, 70], 50) == [5, 10, 35]

    def test_counts_sum_to_total(self):
        rng = np.random.default_rng(7)
        for _ in range(200):
            P = int(rng.integers(1, 8))
            cuts = np.sort(rng.integers(0, 1001, size=P - 1))
            pcts = [float(x) / 10 for x in np.diff(np.concatenate([[0], cuts, [1000]]))]
            if abs(sum(pcts) - 100) > 1e-9:
                continue
            total = int(rng.integers(1, 500))
            counts = percentages_to_counts(pcts, total)
            assert sum(counts) == total
            for c, p in zip(counts, pcts):
                assert abs(c - p * total / 100) < 1 + 1e-9, "largest remainder stays within one of the quota"

    def test_then_as_count(self):
        got = distribute([3, 4, 3], 3, Distribution("percentage", percentages=(33.3, 33.3, 33.4)))
        # counts [3, 3, 4] in global order
        assert got == [[R(0, 0, 3)], [R(1, 0, 3), R(2, 3, 4)], [R(2, 0, 3)]]

    def test_sum_off(self):
        with pytest.raises(DistributionError) as ei:
            percentages_to_counts([33.3, 33.3, 33.3], 10)
        assert ei.value.field == "spec.distribution.percentages"
        with pytest.raises(DistributionError) as ei:
            distribute([10], 2, Distribution("percentage", percentages=(60, 50)))
        assert ei.value.field == "spec.distribution.percentages"
        assert "sum is 110, must be 100" in str(ei.value)

    def test_a_sum_just_off_is_printed_as_it_is(self):
        with pytest.raises(DistributionError) as ei:
            percentages_to_counts([30, 30, 20, 19.9999999], 10)
        assert "sum is 99.9999999, must be 100" in str(ei.value)

    def test_negative(self):
        with pytest.raises(DistributionError) as ei:
            percentages_to_counts([110, -10], 10)
        assert ei.value.field == "spec.distribution.percentages[1]"
        assert ei.value.value == -10

    def test_wrong_length(self):
        with pytest.raises(DistributionError) as ei:
            distribute([10], 3, Distribution("percentage", percentages=(50, 50)))
        assert ei.value.field == "spec.distribution.percentages"


# --------------------------------------------------------------------------- ids


class TestIds:
    @pytest.mark.parametrize("text,expected", [
        ("0:5", (0, 5, 6)),
        ("2:0-3", (2, 0, 4)),
        ("1:7-7", (1, 7, 8)),
        (" 3 : 10 - 12 ", (3, 10, 13)),
    ])
    def test_parse(self, text, expected):
        assert parse_neuron_ids(text, "f") == expected

    @pytest.mark.parametrize("text", ["", "0", "0:", "a:1", "0:1-", "0:-1", "-1:0", "0:1-2-3", "0:3-1"])
    def test_parse_rejects(self, text):
        with pytest.raises(DistributionError) as ei:
            parse_neuron_ids(text, "spec.distribution.ids[0][0]")
        assert ei.value.field == "spec.distribution.ids[0][0]"
        assert ei.value.value == text

    def test_inclusive_ranges(self):
        ids = (("0:0-3", "1:0"), ("0:4-9", "1:1-2"))
        got = distribute([10, 3], 2, Distribution("ids", ids=ids))
        assert got == [[R(0, 0, 4), R(1, 4, 10)], [R(0, 0, 1), R(1, 1, 3)]]

    def test_fragmented(self):
        ids = (("0:0-1", "0:6-7", "1:2"), ("0:2-5", "0:8-9", "1:0-1"))
        got = distribute([10, 3], 2, Distribution("ids", ids=ids))
        assert got == [
            [R(0, 0, 2), R(1, 2, 6), R(0, 6, 8), R(1, 8, 10)],
            [R(1, 0, 2), R(0, 2, 3)],
        ]

    def test_adjacent_ranges_of_one_partition_are_merged(self):
        ids = (("0:0-3", "0:4-5", "0:6", "1:0"), ("0:7-9",))
        got = distribute([10, 1], 2, Distribution("ids", ids=ids))
        assert got == [[R(0, 0, 7), R(1, 7, 10)], [R(0, 0, 1)]]

    def test_listing_order_does_not_matter(self):
        a = distribute([6], 2, Distribution("ids", ids=(("0:3-5", "0:0"), ("0:1-2",))))
        b = distribute([6], 2, Distribution("ids", ids=(("0:0", "0:3-5"), ("0:1-2",))))
        assert a == b == [[R(0, 0, 1), R(1, 1, 3), R(0, 3, 6)]]

    def test_partition_with_no_ids_owns_nothing(self):
        got = distribute([4], 3, Distribution("ids", ids=(("0:0-1",), (), ("0:2-3",))))
        assert got == [[R(0, 0, 2), R(2, 2, 4)]]

    def test_overlap_between_partitions(self):
        with pytest.raises(DistributionError) as ei:
            distribute([10], 2, Distribution("ids", ids=(("0:0-5",), ("0:5-9",))))
        assert ei.value.field.startswith("spec.distribution.ids[")
        assert "0:5" in ei.value.message

    def test_overlap_within_one_partition(self):
        with pytest.raises(DistributionError) as ei:
            distribute([4], 1, Distribution("ids", ids=(("0:0-3", "0:2"),)))
        assert ei.value.field.startswith("spec.distribution.ids[0]")

    def test_gap(self):
        with pytest.raises(DistributionError) as ei:
            distribute([10, 2], 2, Distribution("ids", ids=(("0:0-3", "1:0-1"), ("0:6-9",))))
        assert ei.value.field == "spec.distribution.ids"
        assert ei.value.value == "0:4-5"

    def test_gap_at_end_of_layer(self):
        with pytest.raises(DistributionError) as ei:
            distribute([4, 2], 1, Distribution("ids", ids=(("0:0-3", "1:0"),)))
        assert ei.value.field == "spec.distribution.ids"
        assert ei.value.value == "1:1"

    def test_unknown_layer(self):
        with pytest.raises(DistributionError) as ei:
            distribute([2], 1, Distribution("ids", ids=(("0:0-1", "1:0"),)))
        assert ei.value.field == "spec.distribution.ids[0][1]"

    def test_unit_out_of_range(self):
        with pytest.raises(DistributionError) as ei:
            distribute([2], 1, Distribution("ids", ids=(("0:0-2",),)))
        assert ei.value.field == "spec.distribution.ids[0][0]"

    def test_wrong_length(self):
        with pytest.raises(DistributionError) as ei:
            distribute([2], 2, Distribution("ids", ids=(("0:0-1",),)))
        assert ei.value.field == "spec.distribution.ids"


# --------------------------------------------------------------------------- layers


class TestLayers:
    def test_whole_layers(self):
        got = distribute([5, 3, 2], 2, Distribution("layers", layers=((0, 2), (1,))))
        assert got == [[R(0, 0, 5)], [R(1, 0, 3)], [R(0, 0, 2)]]

    def test_partition_without_layers(self):
        got = distribute([5, 3], 3, Distribution("layers", layers=((), (0, 1), ())))
        assert got == [[R(1, 0, 5)], [R(1, 0, 3)]]

    def test_owned_twice(self):
        with pytest.raises(DistributionError) as ei:
            distribute([5, 3], 2, Distribution("layers", layers=((0, 1), (1,))))
        assert ei.value.field == "spec.distribution.layers[1][0]"
        assert ei.value.value == 1

    def test_owned_by_none(self):
        with pytest.raises(DistributionError) as ei:
            distribute([5, 3, 2], 2, Distribution("layers", layers=((0,), (2,))))
        assert ei.value.field == "spec.distribution.layers"
        assert ei.value.value == [1]

    @pytest.mark.parametrize("bad", [3, -1, "0", True])
    def test_bad_layer_index(self, bad):
        with pytest.raises(DistributionError) as ei:
            distribute([5, 3, 2], 2, Distribution("layers", layers=((0, 1, 2), (bad,))))
        assert ei.value.field == "spec.distribution.layers[1][0]"

    def test_wrong_length(self):
        with pytest.raises(DistributionError) as ei:
            distribute([5, 3], 3, Distribution("layers", layers=((0,), (1,))))
        assert ei.value.field == "spec.distribution.layers"


# --------------------------------------------------------------------------- common rules


@pytest.mark.parametrize("P", [0, -1, 11])
def test_partitions_out_of_range(P):
    with pytest.raises(DistributionError) as ei:
        distribute([4, 6], P, Distribution())
    assert ei.value.field == "spec.partitions"
    assert ei.value.value == P


def test_as_many_partitions_as_neurons():
    got = distribute([2, 3], 5, Distribution())
    assert_well_formed([2, 3], got, 5)


def test_unknown_strategy():
    with pytest.raises(DistributionError) as ei:
        distribute([4], 1, Distribution("random"))
    assert ei.value.field == "spec.distribution.strategy"
    assert ei.value.value == "random"


def test_error_message_names_field_and_value():
    with pytest.raises(DistributionError) as ei:
        distribute([3, 4], 2, Distribution("count", counts=(3, 3)))
    assert "spec.distribution.counts" in str(ei.value)
    assert "[3, 3]" in str(ei.value)


def test_distribution_to_dict():
    d = Distribution("ids", ids=(("0:0-1",), ("0:2",)))
    assert d.to_dict() == {"strategy": "ids", "ids": [["0:0-1"], ["0:2"]]}
    assert Distribution("count", counts=(1, 2)).to_dict() == {"strategy": "count", "counts": [1, 2]}


# --------------------------------------------------------------------------- check_coverage / helpers


class TestCheckCoverage:
    def test_exact_cover(self):
        assert check_coverage([4, 2], [[R(0, 0, 2), R(1, 2, 4)], [R(1, 0, 2)]]) == []

    def test_unsorted_input_is_fine(self):
        assert check_coverage([4], [[R(1, 2, 4), R(0, 0, 2)]]) == []

    def test_gap(self):
        problems = check_coverage([6], [[R(0, 0, 2), R(1, 4, 6)]])
        assert len(problems) == 1 and "0:2-3" in problems[0] and "no partition" in problems[0]

    def test_gap_at_end(self):
        problems = check_coverage([6], [[R(0, 0, 5)]])
        assert len(problems) == 1 and "0:5" in problems[0]

    def test_overlap(self):
        problems = check_coverage([6], [[R(0, 0, 4), R(1, 3, 6)]])
        assert len(problems) == 1 and "0:3" in problems[0] and "twice" in problems[0]

    def test_contained_overlap(self):
        problems = check_coverage([10], [[R(0, 0, 10), R(1, 2, 4)]])
        assert problems == ["neurons 0:2-3 owned twice"]

    def test_out_of_range_and_empty(self):
        assert check_coverage([4], [[R(0, 0, 5)]])
        assert check_coverage([4], [[R(0, 0, 4), R(1, 2, 2)]])
        assert check_coverage([4], [[R(0, -1, 4)]])

    def test_layer_count_mismatch(self):
        assert check_coverage([4, 4], [[R(0, 0, 4)]])


def test_normalize_sorts_and_merges():
    assert normalize([[R(0, 3, 5), R(0, 0, 3), R(1, 5, 6)]]) == [[R(0, 0, 5), R(1, 5, 6)]]


def test_shares():
    got = shares(distribute([3, 4, 2], 2, Distribution("count", counts=(5, 4))), 2)
    assert [s.neurons for s in got] == [5, 4]
    assert got[0].ranges == ["0:0-2", "1:0-1"]
    assert got[1].ranges == ["1:2-3", "2:0-1"]


# --------------------------------------------------------------------------- runs: range math


class TestRuns:
    def test_reads_as_its_ranges(self):
        runs = Runs(10, [0, 4, 7], [2, 0, 1])
        assert list(runs) == [R(2, 0, 4), R(0, 4, 7), R(1, 7, 10)]
        assert runs == [R(2, 0, 4), R(0, 4, 7), R(1, 7, 10)] and [R(2, 0, 4), R(0, 4, 7), R(1, 7, 10)] == runs
        assert runs[-1] == R(1, 7, 10) and runs[1:] == [R(0, 4, 7), R(1, 7, 10)] and len(runs) == 3
        assert runs != [R(2, 0, 4)] and runs != Runs(11, [0, 4, 7], [2, 0, 1])
        assert hash(runs) == hash(Runs(10, (0, 4, 7), (2, 0, 1)))
        with pytest.raises(IndexError):
            runs[3]

    def test_owner_by_binary_search_and_per_partition_views(self):
        runs = Runs(10, [0, 4, 7, 9], [2, 0, 1, 0])
        assert [runs.owner_of(u) for u in range(10)] == [2] * 4 + [0] * 3 + [1] * 2 + [0]
        for bad in (-1, 10):
            with pytest.raises(IndexError):
                runs.owner_of(bad)
        assert runs.spans(0) == [(4, 7), (9, 10)] and runs.spans(5) == []
        assert runs.partitions() == [0, 1, 2] and runs.sizes() == {2: 4, 0: 4, 1: 2}

    @pytest.mark.parametrize("units, starts, owners", [
        (10, [], []), (10, [1], [0]), (10, [0, 0], [0, 1]), (10, [0, 10], [0, 1]), (10, [0, 5], [1, 1]),
        (10, [0], [-1]), (10, [0, 5], [0]),
    ])
    def test_invalid_runs_are_refused(self, units, starts, owners):
        with pytest.raises(ValueError):
            Runs(units, starts, owners)

    def test_from_ranges_merges_and_checks_coverage(self):
        assert Runs.from_ranges(6, [R(1, 3, 6), R(0, 0, 2), R(0, 2, 3)]) == Runs(6, [0, 3], [0, 1])
        for ranges in ([R(0, 0, 2), R(1, 3, 6)], [R(0, 0, 4), R(1, 3, 6)], [R(0, 0, 5)], [R(0, 0, 7)]):
            with pytest.raises(ValueError):
                Runs.from_ranges(6, ranges)

    def test_even_is_balanced(self):
        assert Runs.even(10, 3) == [R(0, 0, 4), R(1, 4, 7), R(2, 7, 10)]
        assert Runs.even(2, 4) == [R(0, 0, 1), R(1, 1, 2)]


def test_identical_layers_share_one_runs_object():
    for dist, P in ((Distribution(), 7), (Distribution("layers", layers=((0, 1, 2, 3),)), 1),
                    (Distribution("count", counts=(250, 150)), 2)):
        got = distribute([100] * 4, P, dist)
        assert all(isinstance(r, Runs) for r in got)
        assert len({id(r) for r in got}) == len({r for r in got}), dist.strategy
    assert len({id(r) for r in distribute([100] * 4, 7, Distribution())}) == 1


def test_a_billion_neurons_on_a_thousand_partitions_is_one_pattern_of_runs():
    units = [1_000_000] * 1_000
    got = distribute(units, 1_000, Distribution())
    assert len({id(r) for r in got}) == 1 and len(got[0]) == 1_000
    assert check_coverage(units, got) == []
    assert got[999].owner_of(999_999) == 999 and got[0].spans(3) == [(3_000, 4_000)]
    counts = distribute(units, 1_000, Distribution("count", counts=(1_000_000,) * 1_000))
    assert all(len(r) == 1 for r in counts) and counts[5].owners == (5,)


def test_range_texts_is_one_partition_of_shares():
    got = distribute([3, 4, 2], 2, Distribution("count", counts=(5, 4)))
    assert [range_texts(got, p) for p in range(2)] == [s.ranges for s in shares(got, 2)]
    plain = [list(r) for r in got]
    assert [range_texts(plain, p) for p in range(2)] == [s.ranges for s in shares(plain, 2)]


# --------------------------------------------------------------------------- properties


def _random_distribution(rng, layer_units, P, strategy):
    total = sum(layer_units)
    if strategy == "balanced":
        return Distribution(), None
    if strategy == "count":
        cuts = np.sort(rng.integers(0, total + 1, size=P - 1))
        counts = tuple(int(x) for x in np.diff(np.concatenate([[0], cuts, [total]])))
        return Distribution("count", counts=counts), counts
    if strategy == "percentage":
        cuts = np.sort(rng.integers(0, 101, size=P - 1))
        pcts = tuple(int(x) for x in np.diff(np.concatenate([[0], cuts, [100]])))
        return Distribution("percentage", percentages=pcts), percentages_to_counts(pcts, total)
    if strategy == "ids":
        owners = []
        ids: list[list[str]] = [[] for _ in range(P)]
        for layer, units in enumerate(layer_units):
            n_cuts = int(rng.integers(0, min(units, 6)))
            cuts = sorted({int(c) for c in rng.integers(1, units, size=n_cuts)}) if units > 1 else []
            bounds = [0, *cuts, units]
            layer_owner = [0] * units
            for a, b in zip(bounds, bounds[1:]):
                p = int(rng.integers(0, P))
                ids[p].append(f"{layer}:{a}" if b - a == 1 else f"{layer}:{a}-{b - 1}")
                layer_owner[a:b] = [p] * (b - a)
            owners.append(layer_owner)
        for lst in ids:
            rng.shuffle(lst)
        return Distribution("ids", ids=tuple(tuple(x) for x in ids)), owners
    if strategy == "layers":
        per = [[] for _ in range(P)]
        owners = []
        for layer in range(len(layer_units)):
            p = int(rng.integers(0, P))
            per[p].append(layer)
            owners.append(p)
        return Distribution("layers", layers=tuple(tuple(x) for x in per)), owners
    raise AssertionError(strategy)


@pytest.mark.parametrize("strategy", ["balanced", "count", "percentage", "ids", "layers"])
def test_random_networks_are_covered_exactly_once(strategy):
    rng = np.random.default_rng({"balanced": 1, "count": 2, "percentage": 3, "ids": 4, "layers": 5}[strategy])
    for _ in range(150):
        layer_units = [int(u) for u in rng.integers(1, 40, size=int(rng.integers(1, 6)))]
        total = sum(layer_units)
        P = int(rng.integers(1, min(total, 16) + 1))
        dist, expect = _random_distribution(rng, layer_units, P, strategy)
        got = distribute(layer_units, P, dist)
        assert_well_formed(layer_units, got, P)
        assert got == distribute(list(layer_units), P, dist), "deterministic"
        owners = owner_map(layer_units, got)
        if strategy == "balanced":
            for units, ranges in zip(layer_units, got):
                base, extra = divmod(units, P)
                sizes = {r.partition: r.size for r in ranges}
                assert [sizes.get(p, 0) for p in range(P)] == [base + (p < extra) for p in range(P)]
        elif strategy in ("count", "percentage"):
            flat = [p for layer in owners for p in layer]
            expected_flat = [p for p, c in enumerate(expect) for _ in range(c)]
            assert flat == expected_flat
        elif strategy == "ids":
            assert owners == expect
        elif strategy == "layers":
            assert owners == [[p] * u for p, u in zip(expect, layer_units)]
