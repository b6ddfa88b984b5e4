"""The distributed engine against the single-process reference, over real threads.

Every partition runs its ``PartitionEngine`` in its own thread over ``LocalTransport``;
outputs, gradients and trained parameters, assembled from all partitions, must equal
``ReferenceNetwork`` to 1e-5 for every kind of assignment (DESIGN.md, "Execution engine").
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest

from partition_server.engine import (ACTIVATION_TABLE, ExchangeError, Mailbox, OptimizerConfig, PartitionEngine,
                                     StepAborted, WeightsChanged, activate, activation_derivative, init_params,
                                     init_partition, init_rows, validate_batch)
from partition_server.api.distributor import Distribution, Range, distribute
from partition_server.api.lookup import LookupTable
from partition_server.api.manifest import ACTIVATIONS, LayerSpec
from partition_server.testing import LocalTransport, ReferenceNetwork, gather_rows, slice_params

TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- tables from the real contracts

Layer = LayerSpec


def Table(partitions: int, layers: list[list[tuple[int, int, int]]]) -> LookupTable:
    """A lookup table from per-layer ``(partition, start, end)`` triples."""
    owners = [[Range(*r) for r in rs] for rs in layers]
    units = [max(r.end for r in rs) for rs in owners]
    return LookupTable.build("test", units, owners, [f"p{i}" for i in range(partitions)])


def balanced(units: list[int], parts: int) -> LookupTable:
    return LookupTable.build("test", units, distribute(units, parts, Distribution()),
                             [f"p{i}" for i in range(parts)])


def round_robin(units: list[int], parts: int, block: int) -> Table:
    return Table(parts, [[(i % parts, s, min(s + block, n)) for i, s in enumerate(range(0, n, block))]
                         for n in units])


def whole_layers(units: list[int], parts: int, owner_of_layer: list[int]) -> Table:
    return Table(parts, [[(owner_of_layer[k], 0, n)] for k, n in enumerate(units)])


# ---------------------------------------------------------------- the network under test

INPUTS = 7
LAYERS = [Layer(13, "relu"), Layer(9, "tanh"), Layer(6, "sigmoid"), Layer(5, "softmax")]
UNITS = [layer.units for layer in LAYERS]
BATCH = 11

ASSIGNMENTS = {
    "balanced-1": balanced(UNITS, 1),
    "balanced-2": balanced(UNITS, 2),
    "balanced-3": balanced(UNITS, 3),
    "balanced-4": balanced(UNITS, 4),
    "uneven": Table(3, [[(0, 0, 1), (1, 1, 11), (2, 11, 13)],
                        [(2, 0, 7), (0, 7, 8), (1, 8, 9)],
                        [(1, 0, 1), (0, 1, 6)],
                        [(0, 0, 4), (2, 4, 5)]]),
    "fragmented": round_robin(UNITS, 3, 2),
    "fragmented-singletons": round_robin(UNITS, 4, 1),
    # p1 owns nothing of layer 0, p0 nothing of layer 1, p2 nothing of layers 1 and 2.
    "holes": Table(3, [[(0, 0, 4), (2, 4, 9), (0, 9, 13)],
                       [(1, 0, 9)],
                       [(0, 0, 3), (1, 3, 6)],
                       [(2, 0, 2), (0, 2, 3), (2, 3, 5)]]),
    # partition 3 owns nothing at all.
    "idle-partition": Table(4, [[(0, 0, 5), (1, 5, 13)], [(2, 0, 9)], [(1, 0, 2), (0, 2, 6)], [(2, 0, 5)]]),
    "whole-layers": whole_layers(UNITS, 3, [0, 0, 1, 2]),
    "whole-layers-alternating": whole_layers(UNITS, 2, [0, 1, 0, 1]),
}


def batch(seed: int, inputs: int = INPUTS, classes: int = UNITS[-1], size: int = BATCH):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((size, inputs)).astype(np.float32),
            rng.integers(0, classes, size=size, dtype=np.int64))


def build(table, inputs=INPUTS, layers=LAYERS, optimizer=None, seed=3, **engine_kw):
    params = init_params(inputs, layers, seed)
    # Non-zero biases, so a bias mistake cannot hide behind zeros.
    rng = np.random.default_rng(99)
    params = [(w, rng.uniform(-0.5, 0.5, size=b.shape).astype(np.float32)) for w, b in params]
    ref = ReferenceNetwork(inputs, layers, params, optimizer)
    engines = [PartitionEngine(p, inputs, layers, table, slice_params(params, table, p), optimizer, **engine_kw)
               for p in range(table.num_partitions)]
    return ref, engines, LocalTransport.group(table.num_partitions)


def run_all(fns, timeout=60.0):
    """Run one callable per partition in its own thread; return results, re-raise the first error."""
    results, errors = [None] * len(fns), [None] * len(fns)

    def target(i):
        try:
            results[i] = fns[i]()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors[i] = exc

    threads = [threading.Thread(target=target, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a partition thread hung"
    for exc in errors:
        if exc is not None:
            raise exc
    return results


def forward_all(engines, transports, step, x, timeout=30.0):
    return run_all([lambda e=e, t=t: e.forward(step, x, t, timeout) for e, t in zip(engines, transports)])


def train_all(engines, transports, step, x, y, apply=True, timeout=30.0):
    return run_all([lambda e=e, t=t: e.train_step(step, x, y, t, timeout, apply=apply)
                    for e, t in zip(engines, transports)])


def assembled(table, engines, layer, pick):
    """Global tensor of ``layer`` put together from each owner's local rows; ``pick(engine)``
    gives the local rows."""
    return gather_rows(table, layer, {p: pick(engines[p]) for p in table.partitions_in_layer(layer)})


def expected_messages(table, training: bool) -> dict[tuple[str, int], int]:
    """One message per (layer, peer, phase): fwd layer k from each owner of k to every other
    partition that needs a_k; bwd into layer k from each owner of k+1 to every other owner of k."""
    owners = [set(table.partitions_in_layer(k)) for k in range(len(table.layer_units))]
    last = len(owners) - 1
    counts = {}
    for k in range(len(owners)):
        holders = owners[k] if k == last else owners[k + 1]
        counts[("fwd", k)] = sum(len(holders - {p}) for p in owners[k])
        if training and k < last:
            counts[("bwd", k)] = sum(len(owners[k] - {p}) for p in owners[k + 1])
    return {key: n for key, n in counts.items() if n}


# ---------------------------------------------------------------- equivalence with the reference

@pytest.mark.parametrize("name", list(ASSIGNMENTS))
def test_forward_matches_reference(name):
    table = ASSIGNMENTS[name]
    ref, engines, transports = build(table)
    x, _ = batch(1)
    outs = forward_all(engines, transports, "s1", x)
    want = ref.forward(x)
    last_owners = table.partitions_in_layer(len(UNITS) - 1)
    for p, out in enumerate(outs):
        if p in last_owners:
            assert out.dtype == np.float32 and out.shape == (BATCH, UNITS[-1])
            np.testing.assert_allclose(out, want, **TOL)
        else:
            assert out is None
    assert sum(t.messages_sent for t in transports) == sum(expected_messages(table, False).values())


@pytest.mark.parametrize("name", list(ASSIGNMENTS))
def test_gradients_match_reference(name):
    table = ASSIGNMENTS[name]
    ref, engines, transports = build(table)
    x, y = batch(2)
    results = train_all(engines, transports, "s1", x, y, apply=False)
    want = ref.train_step(x, y, apply=False)
    last_owners = table.partitions_in_layer(len(UNITS) - 1)
    for p, res in enumerate(results):
        if p in last_owners:
            assert res.loss == pytest.approx(want.loss, rel=1e-5)
            assert res.correct == want.correct
            np.testing.assert_allclose(res.outputs, want.outputs, **TOL)
        else:
            assert res.loss is None and res.outputs is None and res.correct is None
    for k in range(len(UNITS)):
        dw = assembled(table, engines, k, lambda e, k=k: e.last_grads[k][0])
        db = assembled(table, engines, k, lambda e, k=k: e.last_grads[k][1])
        np.testing.assert_allclose(dw, ref.last_grads[k][0], **TOL)
        np.testing.assert_allclose(db, ref.last_grads[k][1], **TOL)
        delta = assembled(table, engines, k, lambda e, k=k: e.last_deltas[k].T).T
        np.testing.assert_allclose(delta, ref.last_deltas[k], **TOL)
    # apply=False leaves the parameters alone.
    for p, e in enumerate(engines):
        for k, tensors in e.state_tensors().items():
            np.testing.assert_array_equal(tensors["weight"], slice_params(ref.params, table, p)[k][0])


@pytest.mark.parametrize("name", list(ASSIGNMENTS))
def test_one_message_per_layer_peer_phase(name):
    table = ASSIGNMENTS[name]
    _, engines, transports = build(table)
    x, y = batch(3)
    train_all(engines, transports, "s1", x, y)
    sent = sum((t.sent_by for t in transports), start=Counter())
    assert dict(sent) == expected_messages(table, True)
    assert sum(t.messages_sent for t in transports) == sum(e.messages_per_pass()["fwd"] + e.messages_per_pass()["bwd"]
                                                         for e in engines)
    # Nothing left undelivered.
    assert all(not box.pending() for box in transports[0].mailboxes.values())


def test_message_count_formula_for_balanced_four():
    # Spelled out: every partition owns part of every layer, so each of the 4 owners sends to
    # the 3 others in each of the 4 forward layers and the 3 backward exchanges.
    table = ASSIGNMENTS["balanced-4"]
    _, engines, transports = build(table)
    x, y = batch(4)
    train_all(engines, transports, "s1", x, y)
    assert sum(t.messages_sent for t in transports) == 4 * 3 * (4 + 3)
    # Payload: every activation/partial column crosses to 3 peers, B float32 each.
    fwd_cols = sum(UNITS)
    bwd_cols = sum(UNITS[:-1])
    assert sum(t.bytes_sent for t in transports) == 3 * BATCH * 4 * (fwd_cols + bwd_cols)


@pytest.mark.parametrize("optimizer", [
    OptimizerConfig("sgd", learning_rate=0.1, momentum=0.9),
    OptimizerConfig("sgd", learning_rate=0.05, momentum=0.0, weight_decay=0.01),
    OptimizerConfig("adam", learning_rate=0.01),
    OptimizerConfig("adam", learning_rate=0.003, beta1=0.8, beta2=0.99, weight_decay=0.001),
], ids=["sgd-momentum", "sgd-plain-wd", "adam", "adam-wd"])
@pytest.mark.parametrize("name", ["fragmented", "holes", "whole-layers-alternating", "balanced-3"])
def test_training_matches_reference(name, optimizer):
    table = ASSIGNMENTS[name]
    ref, engines, transports = build(table, optimizer=optimizer)
    for step in range(20):
        x, y = batch(100 + step)
        results = train_all(engines, transports, f"step-{step}", x, y)
        want = ref.train_step(x, y)
        losses = {r.loss for r in results if r.loss is not None}
        assert len(losses) == 1 and losses.pop() == pytest.approx(want.loss, rel=1e-5)
    for k in range(len(UNITS)):
        state = {p: e.state_tensors()[k] for p, e in enumerate(engines) if k in e.owned_layers}
        for name_ in ("weight", "bias"):
            got = gather_rows(table, k, {p: s[name_] for p, s in state.items()})
            np.testing.assert_allclose(got, ref.params[k][0 if name_ == "weight" else 1], **TOL)
        for buf, want_buf in ref.state[k].items():
            got = gather_rows(table, k, {p: s[buf] for p, s in state.items()})
            np.testing.assert_allclose(got, want_buf, **TOL)
    assert all(e.optimizer_step == 20 for e in engines)
    # Learning happened at all (so equality is not between two untouched copies).
    assert not np.allclose(ref.params[0][0], init_params(INPUTS, LAYERS, 3)[0][0])


# ---------------------------------------------------------------- log-depth collectives (P >= 8)

WIDE = [Layer(21, "relu"), Layer(17, "tanh"), Layer(10, "softmax")]  # every layer >= 8 units
LOG_CASES = {
    # (table, layers, log_from): P=8 by default; smaller P force Bruck's non-power-of-two rounds.
    "balanced-8-wide": (balanced([21, 17, 10], 8), WIDE, 8),
    "balanced-8-mixed": (balanced(UNITS, 8), LAYERS, 8),  # layers of 6 and 5 units stay direct
    "fragmented-8": (round_robin([21, 17, 10], 8, 1), WIDE, 8),
    "balanced-3-bruck": (balanced([21, 17, 10], 3), WIDE, 2),
    "balanced-5-bruck": (balanced([21, 17, 10], 5), WIDE, 2),
    "fragmented-6-bruck": (round_robin([21, 17, 10], 6, 2), WIDE, 2),
}


@pytest.mark.parametrize("name", list(LOG_CASES))
def test_log_depth_collectives_match_reference(name):
    """Outputs, gradients and 20 Adam steps equal the reference; fewer messages, same bytes."""
    table, layers, log_from = LOG_CASES[name]
    P = table.num_partitions
    optimizer = OptimizerConfig("adam", learning_rate=0.01)
    ref, engines, transports = build(table, layers=layers, optimizer=optimizer, log_from=log_from)
    _, direct, direct_t = build(table, layers=layers, optimizer=optimizer, log_from=10**6)
    units = [layer.units for layer in layers]
    x, y = batch(7, classes=units[-1])
    outs = forward_all(engines, transports, "f", x)
    want = ref.forward(x)
    for p in table.partitions_in_layer(len(units) - 1):
        np.testing.assert_allclose(outs[p], want, **TOL)
    for t in transports:
        t.reset_counters()
    results = train_all(engines, transports, "g", x, y, apply=False)
    train_all(direct, direct_t, "g", x, y, apply=False)
    got = ref.train_step(x, y, apply=False)
    assert all(r.loss == pytest.approx(got.loss, rel=1e-5) for r in results if r.loss is not None)
    for k in range(len(units)):
        np.testing.assert_allclose(assembled(table, engines, k, lambda e, k=k: e.last_grads[k][0]),
                                   ref.last_grads[k][0], **TOL)
        np.testing.assert_allclose(assembled(table, engines, k, lambda e, k=k: e.last_deltas[k].T).T,
                                   ref.last_deltas[k], **TOL)
    sent = sum(t.messages_sent for t in transports)
    assert sent == sum(sum(e.messages_per_pass().values()) for e in engines)
    direct_sent = sum(t.messages_sent for t in direct_t)
    assert sent < direct_sent if P >= 5 else sent == direct_sent  # ceil(log2 3) == 3 - 1
    assert sum(t.bytes_sent for t in transports) == sum(t.bytes_sent for t in direct_t)
    if name == "balanced-8-wide":
        assert sent == 5 * 8 * 3  # 5 collectives (3 fwd, 2 bwd) of P log2 P messages
    assert all(not box.pending() for box in transports[0].mailboxes.values())
    for step in range(20):
        x, y = batch(500 + step, classes=units[-1])
        train_all(engines, transports, f"t{step}", x, y)
        ref.train_step(x, y)
    for k in range(len(units)):
        for i, name_ in enumerate(("weight", "bias")):
            np.testing.assert_allclose(assembled(table, engines, k, lambda e, k=k: e.state_tensors()[k][name_]),
                                       ref.params[k][i], **TOL)
    assert P >= 3


def test_log_depth_phases_are_named_by_round():
    from partition_server.engine.plan import bruck_rounds, is_phase

    assert bruck_rounds(8) == [(1, 1), (2, 2), (4, 4)]
    assert bruck_rounds(5) == [(1, 1), (2, 2), (4, 1)]
    assert bruck_rounds(1) == []
    assert all(is_phase(p) for p in ("fwd", "bwd", "fwd.0", "bwd.12"))
    assert not any(is_phase(p) for p in ("", "fwd.", "fwd.01", "fwd.64", "xyz", "bwd.-1", "fwd.1.2"))


@pytest.mark.parametrize("last", ["identity", "sigmoid", "tanh"])
def test_identity_layers_and_squared_error_loss(last):
    layers = [Layer(8, "identity"), Layer(4, "relu"), Layer(3, last)]
    units = [layer.units for layer in layers]
    table = round_robin(units, 3, 1)
    optimizer = OptimizerConfig("sgd", learning_rate=0.1, momentum=0.5)
    ref, engines, transports = build(table, inputs=5, layers=layers, optimizer=optimizer)
    for step in range(5):
        x, y = batch(200 + step, inputs=5, classes=3)
        results = train_all(engines, transports, f"step-{step}", x, y)
        want = ref.train_step(x, y)
        for r in results:
            if r.outputs is not None:
                np.testing.assert_allclose(r.outputs, want.outputs, **TOL)
                assert r.loss == pytest.approx(want.loss, rel=1e-5)
    for k in range(len(layers)):
        got = assembled(table, engines, k, lambda e, k=k: e.state_tensors()[k]["weight"])
        np.testing.assert_allclose(got, ref.params[k][0], **TOL)


# ---------------------------------------------------------------- the reference itself

def test_reference_gradients_match_finite_differences():
    layers = [Layer(6, "tanh"), Layer(5, "sigmoid"), Layer(4, "softmax")]
    params = init_params(3, layers, 5)
    x, y = batch(7, inputs=3, classes=4, size=6)
    ref = ReferenceNetwork(3, layers, params)
    ref.train_step(x, y, apply=False)
    rng = np.random.default_rng(0)
    eps = 1e-2
    for k, (w, _) in enumerate(params):
        for _ in range(4):
            i, j = rng.integers(w.shape[0]), rng.integers(w.shape[1])
            losses = []
            for sign in (1, -1):
                moved = [(a.copy(), b.copy()) for a, b in params]
                moved[k][0][i, j] += sign * eps
                losses.append(ReferenceNetwork(3, layers, moved).train_step(x, y, apply=False).loss)
            numeric = (losses[0] - losses[1]) / (2 * eps)
            assert ref.last_grads[k][0][i, j] == pytest.approx(numeric, abs=2e-4)


def test_reference_optimizer_first_steps():
    layers = [Layer(3, "softmax")]
    params = init_params(2, layers, 0)
    x, y = batch(8, inputs=2, classes=3, size=4)
    sgd = ReferenceNetwork(2, layers, params, OptimizerConfig("sgd", learning_rate=0.5, momentum=0.9))
    sgd.train_step(x, y)
    g1 = sgd.last_grads[0][0]
    np.testing.assert_allclose(sgd.params[0][0], params[0][0] - 0.5 * g1, **TOL)
    w1 = sgd.params[0][0]
    sgd.train_step(x, y)
    np.testing.assert_allclose(sgd.params[0][0], w1 - 0.5 * (0.9 * g1 + sgd.last_grads[0][0]), **TOL)
    adam = ReferenceNetwork(2, layers, params, OptimizerConfig("adam", learning_rate=0.01))
    adam.train_step(x, y)
    g = adam.last_grads[0][0]
    # Bias correction makes Adam's first step lr * g / (|g| + eps) ~ lr * sign(g).
    np.testing.assert_allclose(adam.params[0][0], params[0][0] - 0.01 * g / (np.abs(g) + 1e-8), rtol=1e-5, atol=1e-7)


def test_init_params_deterministic_and_sliceable():
    a = init_params(INPUTS, LAYERS, 11)
    b = init_params(INPUTS, LAYERS, 11)
    c = init_params(INPUTS, LAYERS, 12)
    for (wa, ba), (wb, _), (wc, _), layer, fan_in in zip(a, b, c, LAYERS, [INPUTS] + UNITS[:-1]):
        assert wa.dtype == np.float32 and wa.shape == (layer.units, fan_in)
        np.testing.assert_array_equal(wa, wb)
        assert not np.array_equal(wa, wc)
        limit = np.sqrt(6 / fan_in) if layer.activation == "relu" else np.sqrt(6 / (fan_in + layer.units))
        assert np.abs(wa).max() <= limit
        assert not ba.any()
    table = ASSIGNMENTS["fragmented"]
    for k in range(len(LAYERS)):
        parts = {p: slice_params(a, table, p)[k][0] for p in table.partitions_in_layer(k)}
        np.testing.assert_array_equal(gather_rows(table, k, parts), a[k][0])


@pytest.mark.parametrize("name", ["fragmented", "fragmented-singletons", "uneven", "holes", "balanced-4"])
def test_row_local_init_equals_single_partition(name):
    """Each partition generates only its own rows (seed, layer, row): any P and any ``ids``
    split yields bit-identical initial weights to P=1."""
    table = ASSIGNMENTS[name]
    whole = init_partition(INPUTS, LAYERS, 5, {k: [(0, u)] for k, u in enumerate(UNITS)})
    for p in range(table.num_partitions):
        ranges = {k: [(r.start, r.end) for r in table.ranges(k, p)] for k in range(len(UNITS))}
        mine = init_partition(INPUTS, LAYERS, 5, ranges)
        assert set(mine) == {k for k, rs in ranges.items() if rs}
        for k, (w, b) in mine.items():
            rows = np.concatenate([np.arange(s, e) for s, e in ranges[k]])
            np.testing.assert_array_equal(w, whole[k][0][rows])
            assert not b.any()
    # Same rows in another order, one at a time: still the same values.
    w3, _ = init_rows(INPUTS, LAYERS, 5, 0, [(12, 13), (3, 4)])
    np.testing.assert_array_equal(w3, whole[0][0][[12, 3]])
    assert len({row.tobytes() for row in whole[0][0]}) == UNITS[0]  # every row its own stream


def test_engine_adopts_handed_over_rows_without_copying():
    table = ASSIGNMENTS["balanced-2"]
    ranges = {k: [(r.start, r.end) for r in table.ranges(k, 0)] for k in range(len(UNITS))}
    rows = init_partition(INPUTS, LAYERS, 5, ranges)
    e = PartitionEngine(0, INPUTS, LAYERS, table, rows, adopt=True)
    tensors = e.state_tensors()
    for k, (w, b) in rows.items():
        assert tensors[k]["weight"] is w and not w.flags.writeable
    copied = PartitionEngine(0, INPUTS, LAYERS, table, init_partition(INPUTS, LAYERS, 5, ranges))
    assert all(copied.state_tensors()[k]["weight"] is not w for k, (w, _) in rows.items())


# ---------------------------------------------------------------- state and checkpoints

def test_state_roundtrip_resumes_training_exactly():
    table = ASSIGNMENTS["fragmented"]
    optimizer = OptimizerConfig("adam", learning_rate=0.01)
    ref, engines, transports = build(table, optimizer=optimizer)
    for step in range(3):
        x, y = batch(300 + step)
        train_all(engines, transports, f"a{step}", x, y)
        ref.train_step(x, y)
    saved = [e.state_snapshot() for e in engines]
    # Fresh engines from another initialisation, then the checkpoint on top.
    other = init_params(INPUTS, LAYERS, 77)
    resumed = [PartitionEngine(p, INPUTS, LAYERS, table, slice_params(other, table, p), optimizer)
               for p in range(table.num_partitions)]
    for e, (tensors, step) in zip(resumed, saved):
        assert set(tensors[e.owned_layers[0]]) == {"weight", "bias", "weight.adam_m", "weight.adam_v",
                                                   "bias.adam_m", "bias.adam_v"}
        e.load_state(tensors, step)
    for step in range(3, 6):
        x, y = batch(300 + step)
        train_all(resumed, transports, f"b{step}", x, y)
        ref.train_step(x, y)
    for k in range(len(UNITS)):
        got = assembled(table, resumed, k, lambda e, k=k: e.state_tensors()[k]["weight"])
        np.testing.assert_allclose(got, ref.params[k][0], **TOL)


def test_forward_computes_with_the_requested_weights_version():
    table = ASSIGNMENTS["holes"]  # partitions owning nothing in some layers count every step too
    optimizer = OptimizerConfig("sgd", learning_rate=0.5, momentum=0.9)
    ref, engines, transports = build(table, optimizer=optimizer)
    probe, _ = batch(77)
    expected = [ref.forward(probe)]
    for step in range(5):
        x, y = batch(500 + step)
        train_all(engines, transports, f"t{step}", x, y)
        ref.train_step(x, y)
        expected.append(ref.forward(probe))
    assert {e.optimizer_step for e in engines} == {5}
    # The last four versions (2..5) are kept, on every partition.
    for version in (2, 3, 4, 5):
        outs = run_all([lambda e=e, t=t, v=version: e.forward(f"v{v}", probe, t, 30.0, v)
                        for e, t in zip(engines, transports)])
        got = next(o for o in outs if o is not None)
        np.testing.assert_allclose(got, expected[version], **TOL)
        assert not np.allclose(got, expected[version - 1], atol=1e-4)
    # A dropped version, and one ahead while no training step runs, fail before any traffic.
    for version in (1, 6):
        with pytest.raises(WeightsChanged, match="weights changed during the pass; retry"):
            engines[0].forward("gone", probe, transports[0], 30.0, version)
    # A checkpoint restores the counter; older versions are gone.
    tensors, step = engines[1].state_snapshot()
    engines[1].load_state(tensors, step)
    assert engines[1].params_at(5, 0.0) is engines[1].params_at(None, 0.0)
    with pytest.raises(WeightsChanged):
        engines[1].params_at(4, 0.0)


def test_forward_waits_for_a_version_a_running_training_step_applies():
    table = ASSIGNMENTS["balanced-2"]
    _, engines, transports = build(table, optimizer=OptimizerConfig("sgd", learning_rate=0.5))
    x, y = batch(9)
    got: dict = {}
    # Partition 1 starts training step 1 and waits for partition 0's messages.
    trainer1 = threading.Thread(target=lambda: engines[1].train_step("t", x, y, transports[1], 30.0))
    trainer1.start()
    for _ in range(1000):
        if engines[1]._train_lock.locked():
            break
        threading.Event().wait(0.01)
    assert engines[1]._train_lock.locked()
    # A pass asking partition 1 for step 1 (partition 0 would be there first) waits for it.
    waiter = threading.Thread(target=lambda: got.update(params=engines[1].params_at(1, time.monotonic() + 30)))
    waiter.start()
    engines[0].train_step("t", x, y, transports[0], 30.0)
    trainer1.join(30)
    waiter.join(30)
    assert engines[1].optimizer_step == 1
    assert got["params"] is engines[1].params_at(None, 0.0)


def test_state_tensors_are_snapshots():
    table = ASSIGNMENTS["balanced-2"]
    _, engines, transports = build(table)
    before = [e.state_tensors() for e in engines]
    copies = [{k: t["weight"].copy() for k, t in s.items()} for s in before]
    x, y = batch(5)
    train_all(engines, transports, "s", x, y)
    for s, c in zip(before, copies):
        for k in s:
            np.testing.assert_array_equal(s[k]["weight"], c[k])
            with pytest.raises(ValueError):
                s[k]["weight"][0, 0] = 1.0  # read-only
    after_one = [e.state_tensors() for e in engines]
    assert after_one[0][0]["weight.momentum"].any()
    momenta = [{k: t["weight.momentum"].copy() for k, t in s.items()} for s in after_one]
    train_all(engines, transports, "s2", x, y)  # updates the live buffers in place
    for s, c in zip(after_one, momenta):
        for k in s:
            np.testing.assert_array_equal(s[k]["weight.momentum"], c[k])
            assert not s[k]["weight.momentum"].flags.writeable
    assert not np.array_equal(engines[0].state_tensors()[0]["weight.momentum"], momenta[0][0])


def test_load_state_rejects_bad_tensors():
    table = ASSIGNMENTS["balanced-2"]
    _, engines, _ = build(table)
    e = engines[0]
    good = e.state_tensors()
    with pytest.raises(ValueError, match=r"params\[0\]\.weight"):
        e.load_state({**good, 0: {**good[0], "weight": good[0]["weight"][:, :-1]}})
    with pytest.raises(ValueError, match="weight.nonsense"):
        e.load_state({**good, 0: {**good[0], "weight.nonsense": good[0]["weight"]}})
    with pytest.raises(ValueError, match=r"state\[1\]\.bias\.momentum"):
        e.load_state({**good, 1: {**good[1], "bias.momentum": np.zeros(2, np.float32)}})
    with pytest.raises(ValueError, match="missing layer"):
        e.load_state({k: v for k, v in good.items() if k != 2})
    with pytest.raises(ValueError, match="optimizer_step"):
        e.load_state(good, -1)


def test_engine_rejects_params_of_wrong_layers_or_shapes():
    table = ASSIGNMENTS["holes"]
    params = init_params(INPUTS, LAYERS, 0)
    mine = slice_params(params, table, 1)  # owns layers 1, 2 only
    with pytest.raises(ValueError, match=r"owns no neurons of layer\(s\) \[0\]"):
        PartitionEngine(1, INPUTS, LAYERS, table, {**mine, 0: params[0]})
    with pytest.raises(ValueError, match=r"missing layer\(s\) \[2\]"):
        PartitionEngine(1, INPUTS, LAYERS, table, {1: mine[1]})
    with pytest.raises(ValueError, match=r"params\[1\]\.bias"):
        PartitionEngine(1, INPUTS, LAYERS, table, {**mine, 1: (mine[1][0], mine[1][1][:-1])})
    with pytest.raises(ValueError, match="softmax"):
        PartitionEngine(1, INPUTS, [Layer(13, "softmax")] + LAYERS[1:], table, mine)
    with pytest.raises(ValueError, match="units"):
        PartitionEngine(1, INPUTS, LAYERS[:-1] + [Layer(4, "softmax")], table, mine)
    assert PartitionEngine(1, INPUTS, LAYERS, table, mine).local_rows(1) == [(0, 9)]
    assert PartitionEngine(1, INPUTS, LAYERS, table, mine).local_rows(0) == []


def test_local_rows_of_fragmented_partition():
    table = ASSIGNMENTS["fragmented"]
    params = init_params(INPUTS, LAYERS, 0)
    e = PartitionEngine(1, INPUTS, LAYERS, table, slice_params(params, table, 1))
    assert e.local_rows(0) == [(2, 4), (8, 10)]
    assert e.owned_layers == [0, 1, 2, 3]


# ---------------------------------------------------------------- input validation

@pytest.mark.parametrize("x, y, field, detail", [
    (np.zeros((4, INPUTS), np.float64), np.zeros(4, np.int64), "x", "float64"),
    (np.zeros((4, INPUTS + 1), np.float32), np.zeros(4, np.int64), "x", r"\[4, 8\]"),
    (np.zeros(INPUTS, np.float32), np.zeros(1, np.int64), "x", r"\[7\]"),
    (np.zeros((0, INPUTS), np.float32), np.zeros(0, np.int64), "x", r"\[0, 7\]"),
    ([[0.0] * INPUTS], np.zeros(1, np.int64), "x", "list"),
    (np.zeros((4, INPUTS), np.float32), np.zeros(4, np.int32), "y", "int32"),
    (np.zeros((4, INPUTS), np.float32), np.zeros(5, np.int64), "y", r"\[5\]"),
    (np.zeros((4, INPUTS), np.float32), np.zeros((4, 1), np.int64), "y", r"\[4, 1\]"),
    (np.zeros((4, INPUTS), np.float32), np.array([0, 1, 5, 2], np.int64), "y", "5"),
    (np.zeros((4, INPUTS), np.float32), np.array([0, -1, 2, 2], np.int64), "y", "-1"),
])
def test_bad_batches_raise_value_error_naming_the_field(x, y, field, detail):
    table = ASSIGNMENTS["balanced-2"]
    _, engines, transports = build(table)
    with pytest.raises(ValueError, match=rf"^{field}: .*{detail}"):
        engines[0].train_step("s", x, y, transports[0], timeout=5)
    if field == "x":
        with pytest.raises(ValueError, match=rf"^x: .*{detail}"):
            engines[0].forward("s", x, transports[0], timeout=5)
    assert transports[0].messages_sent == 0


def test_validate_batch_accepts_good_batch():
    x, y = batch(0)
    assert validate_batch(INPUTS, UNITS[-1], x, y) == BATCH
    assert validate_batch(INPUTS, UNITS[-1], x) == BATCH


def test_peer_batch_size_mismatch_is_an_exchange_error():
    table = ASSIGNMENTS["balanced-2"]
    _, engines, transports = build(table)
    x, _ = batch(0)
    with pytest.raises(ExchangeError, match="from partition"):
        run_all([lambda: engines[0].forward("s", x, transports[0], 10),
                 lambda: engines[1].forward("s", x[:5], transports[1], 10)])


# ---------------------------------------------------------------- timeouts and the mailbox

def test_engine_times_out_naming_the_missing_peer():
    table = ASSIGNMENTS["balanced-3"]
    _, engines, transports = build(table)
    x, _ = batch(0)
    # Partition 1 answers, partition 2 never runs.
    with pytest.raises(TimeoutError, match=r"partition\(s\) 2$"):
        run_all([lambda: engines[0].forward("s", x, transports[0], 0.5),
                 lambda: engines[1].forward("s", x, transports[1], 0.5)])


def test_mailbox_take_times_out_naming_key_and_src():
    box = Mailbox()
    box.put(("s", "fwd", 0), 1, np.zeros(1, np.float32))
    with pytest.raises(TimeoutError, match=r"\('s', 'fwd', 0\) from partition\(s\) 2"):
        box.take(("s", "fwd", 0), 2, timeout=0.05)
    with pytest.raises(TimeoutError, match=r"partition\(s\) 2, 3"):
        box.take_many(("s", "fwd", 0), [1, 2, 3], timeout=0.05)
    # The message that did arrive is still there.
    assert box.take(("s", "fwd", 0), 1, timeout=0.05).shape == (1,)


def test_mailbox_take_waits_for_a_later_put():
    box = Mailbox()
    arr = np.arange(3, dtype=np.float32)
    t = threading.Timer(0.05, lambda: box.put(("s", "bwd", 1), 4, arr))
    t.start()
    assert box.take(("s", "bwd", 1), 4, timeout=30) is arr
    t.join()


def test_mailbox_wakes_a_taker_when_its_last_message_arrives_whatever_the_other_takers_wait_for():
    """Two takers of one key (two RunPass calls with one pass id) each wait for their own sources;
    one leaving must not stop the other from being woken."""
    box = Mailbox()
    key = ("s", "fwd", 0)
    with pytest.raises(TimeoutError):
        box.take_many(key, [1, 2], timeout=0.05)  # a taker that gave up
    got = []
    began = time.monotonic()
    waiter = threading.Thread(target=lambda: got.append(box.take_many(key, [3, 4], timeout=30)))
    waiter.start()
    timed_out = []

    def leaves():
        try:
            box.take_many(key, [5], timeout=0.2)
        except TimeoutError as exc:
            timed_out.append(exc)

    other = threading.Thread(target=leaves)
    other.start()
    other.join(5)
    assert timed_out
    box.put(key, 3, np.zeros(1, np.float32))
    box.put(key, 4, np.ones(1, np.float32))
    waiter.join(30)
    assert got and sorted(got[0]) == [3, 4]
    assert time.monotonic() - began < 20  # woken by the last put, not by its 30 s timeout


def test_mailbox_rejects_duplicates_and_discards_steps():
    box = Mailbox()
    key = ("s1", "fwd", 0)
    box.put(key, 1, np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="duplicate"):
        box.put(key, 1, np.zeros(1, np.float32))
    box.put(("s2", "fwd", 0), 1, np.zeros(1, np.float32))
    assert box.discard("s1") == 1
    assert box.pending() == [(("s2", "fwd", 0), 1)]
    assert box.put(key, 2, np.zeros(1, np.float32)) is False  # late message of a discarded step
    assert box.pending() == [(("s2", "fwd", 0), 1)]
    with pytest.raises(StepAborted):
        box.take(key, 2, timeout=5)


def test_mailbox_discard_wakes_a_waiting_taker():
    box = Mailbox()
    caught = []

    def wait():
        try:
            box.take(("s", "fwd", 0), 1, timeout=30)
        except StepAborted as exc:
            caught.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    # Whether the discard lands before or during the wait, the taker must end with StepAborted
    # (a missed wake-up would surface as a TimeoutError instead).
    box.discard("s")
    t.join(30)
    assert not t.is_alive() and len(caught) == 1


def test_mailbox_drops_messages_nobody_takes_once_they_expire():
    now = [0.0]
    box = Mailbox(expire_after=10.0, clock=lambda: now[0])
    a = np.zeros(3, np.float32)
    box.put(("ghost", "fwd", 0), 1, a)                # its step never runs here
    box.put(("short", "fwd", 0), 1, a, ttl=2.0)
    now[0] = 5.0
    box.put(("live", "fwd", 0), 2, a)
    assert box.pending() == [(("ghost", "fwd", 0), 1), (("live", "fwd", 0), 2)]
    now[0] = 12.0
    box.put(("next", "fwd", 0), 2, a)
    assert box.pending() == [(("live", "fwd", 0), 2), (("next", "fwd", 0), 2)]
    now[0] = 15.0
    with pytest.raises(TimeoutError):
        box.take(("live", "fwd", 0), 2, timeout=0.0)  # expired before the (late) take
    assert box.take(("next", "fwd", 0), 2, timeout=0.0) is a
    assert box.pending() == []


def test_local_transport_copies_and_rejects_self():
    transports = LocalTransport.group(2)
    arr = np.ones((2, 2), np.float32)
    transports[0].exchange(("s", "fwd", 0), {1: arr}, [], 1)
    arr[:] = 5
    got = transports[1].exchange(("s", "fwd", 0), {}, [0], 1)[0]
    np.testing.assert_array_equal(got, np.ones((2, 2)))
    with pytest.raises(ValueError, match="peer"):
        transports[0].exchange(("s", "fwd", 1), {0: arr}, [], 1)


# ---------------------------------------------------------------- activations and layering


def test_activation_table_covers_exactly_the_api_names():
    assert set(ACTIVATION_TABLE) == set(ACTIVATIONS)
    assert all(name == act.name for name, act in ACTIVATION_TABLE.items())


@pytest.mark.parametrize("name", [n for n in ACTIVATIONS if n != "softmax"])
def test_activation_derivatives_match_finite_differences(name):
    z = np.linspace(-3, 3, 41, dtype=np.float64).reshape(1, -1) + 0.013  # no kink of relu at 0
    h = 1e-4
    numeric = (activate(name, (z + h).astype(np.float32)).astype(np.float64)
               - activate(name, (z - h).astype(np.float32)).astype(np.float64)) / (2 * h)
    d = activation_derivative(name, activate(name, z.astype(np.float32)))
    np.testing.assert_allclose(np.ones_like(z) if d is None else d, numeric, atol=2e-2)


def test_softmax_and_unknown_activations_are_refused():
    z = np.zeros((2, 3), np.float32)
    np.testing.assert_allclose(activate("softmax", z), np.full((2, 3), 1 / 3), rtol=1e-6)
    with pytest.raises(ValueError, match="no elementwise derivative for 'softmax'"):
        activation_derivative("softmax", z)
    with pytest.raises(ValueError, match="unknown 'gelu'"):
        activate("gelu", z)


def test_engine_imports_no_grpc_and_no_test_aids():
    code = ("import sys, partition_server.engine; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'grpc' or m.startswith('partition_server.testing')); "
            "print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("cfg, arrays", [
    (OptimizerConfig("sgd", learning_rate=0.1, momentum=0.0), 1),
    (OptimizerConfig("sgd", learning_rate=0.1, momentum=0.9), 1),
    (OptimizerConfig("sgd", learning_rate=0.1, momentum=0.9, weight_decay=0.01), 1),
    (OptimizerConfig("adam", learning_rate=0.01), 1),
    (OptimizerConfig("adam", learning_rate=0.01, weight_decay=0.01), 2),
])
def test_update_allocates_at_most_two_arrays_and_never_modifies_the_parameter(cfg, arrays):
    """The new parameter (plus Adam's scratch with weight decay) are the only full-size
    allocations; the buffers are updated in place to the same values a fresh computation gives,
    and neither the parameter nor the gradient changes (versioned inference reads old ones)."""
    import tracemalloc

    from partition_server.engine.optimizers import update

    rng = np.random.default_rng(0)
    p, g = (rng.standard_normal((500, 400)).astype(np.float32) for _ in range(2))
    state = {f"weight.{b}": np.abs(rng.standard_normal(p.shape)).astype(np.float32) for b in cfg.buffer_names()}
    update(cfg, p, g, state, name="weight", t=1)  # warm-up
    p0, g0 = p.copy(), g.copy()
    # The same step from read-only copies of the buffers: replaced by new arrays, not written.
    frozen_state = {n: a.copy() for n, a in state.items()}
    for a in frozen_state.values():
        a.flags.writeable = False
    expected_p = update(cfg, p, g, frozen_state, name="weight", t=2)
    buffers = {n: id(a) for n, a in state.items()}
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        new = update(cfg, p, g, state, name="weight", t=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= arrays * p.nbytes + 64 * 1024, (peak / p.nbytes)
    np.testing.assert_array_equal(p, p0)
    np.testing.assert_array_equal(g, g0)
    np.testing.assert_array_equal(new, expected_p)
    for n, a in state.items():
        assert id(a) == buffers[n], f"{n} was replaced instead of updated in place"
        np.testing.assert_array_equal(a, frozen_state[n])
    assert new is not p and new.shape == p.shape and new.dtype == np.float32
