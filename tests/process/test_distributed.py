"""Distributed over real gRPC equals the single-process reference, for every strategy.

P ``PartitionServer`` objects run in this process on 127.0.0.1 (``tests/support/dataplane.Cluster``)
and exchange activations and gradient partials with real ``Exchange`` calls; a ``Driver``
sends the steps. Outputs, gradients (every engine's ``last_grads``, put back at their global
rows), parameters after one plain-SGD step, and parameters and optimizer state after 20
steps of SGD with momentum and of Adam must equal ``ReferenceNetwork`` from the same seed to
1e-5 (DESIGN.md, "Execution engine"). The network is tiny on purpose: inputs 10, layers
[12 relu, 7 tanh, 5 softmax], batch 9.
"""

from __future__ import annotations

import numpy as np
import pytest

from partition_server.api.distributor import Distribution
from partition_server.api.manifest import LayerSpec, ModelSpec
from partition_server.engine import OptimizerConfig
from partition_server.storage.store import ModelStore
from tests.support.dataplane import BATCH, MODEL, TOL, UNITS, Cluster, batch, reference

CASES = {
    "balanced-1": (1, Distribution("balanced")),
    "balanced-2": (2, Distribution("balanced")),
    "balanced-3": (3, Distribution("balanced")),
    "balanced-4": (4, Distribution("balanced")),
    # Uneven counts that straddle layers; partition 1 of count-4 owns nothing at all.
    "count-2": (2, Distribution("count", counts=(5, 19))),
    "count-3": (3, Distribution("count", counts=(3, 16, 5))),
    "count-4-empty": (4, Distribution("count", counts=(10, 0, 9, 5))),
    "percentage-2": (2, Distribution("percentage", percentages=(30, 70))),
    "percentage-3": (3, Distribution("percentage", percentages=(33.3, 33.3, 33.4))),
    "percentage-4": (4, Distribution("percentage", percentages=(10, 20, 30, 40))),
    # Fragmented ids: several ranges per partition per layer, holes in some layers.
    "ids-2": (2, Distribution("ids", ids=(("0:0-3", "0:8-11", "1:2", "2:0-1", "2:4"),
                                          ("0:4-7", "1:0-1", "1:3-6", "2:2-3")))),
    "ids-3": (3, Distribution("ids", ids=(("0:0-1", "0:6-8", "2:4", "2:0"),
                                          ("0:2-5", "2:1-3"),
                                          ("0:9-11", "1:0-6")))),
    "ids-4": (4, Distribution("ids", ids=(("0:0", "0:4", "0:8", "1:3", "2:2-4"),
                                          ("0:1", "0:5", "0:9", "1:0-2"),
                                          ("0:2", "0:6", "0:10", "1:4-6"),
                                          ("0:3", "0:7", "0:11", "2:0-1")))),
    "layers-1": (1, Distribution("layers", layers=((0, 1, 2),))),
    "layers-2": (2, Distribution("layers", layers=((0,), (1, 2)))),
    "layers-3": (3, Distribution("layers", layers=((2,), (0,), (1,)))),
    "layers-4-empty": (4, Distribution("layers", layers=((1,), (0,), (2,), ()))),
    # auto: here every layer is narrow (< 16 units per partition), so each stays whole.
    "auto-2": (2, Distribution("auto")),
    "auto-4": (4, Distribution("auto")),
}


def expected_traffic(table, train: bool) -> tuple[int, int]:
    """Messages and payload bytes of one pass, from the table alone (one message per
    (layer, peer, phase); a [batch, columns] float32 block each)."""
    last = table.num_layers - 1
    messages = nbytes = 0
    for k in range(table.num_layers):
        holders = table.partitions_in_layer(k if k == last else k + 1)
        for p in table.partitions_in_layer(k):
            width = sum(r.size for r in table.ranges(k, p))
            for q in holders:
                if q != p:
                    messages += 1
                    nbytes += BATCH * width * 4
        if train and k >= 1:
            for p in table.partitions_in_layer(k):
                for q in table.partitions_in_layer(k - 1):
                    if q != p:
                        messages += 1
                        nbytes += BATCH * sum(r.size for r in table.ranges(k - 1, q)) * 4
    return messages, nbytes


def test_cases_cover_what_they_claim():
    """Guard the parametrisation: every strategy at P 1..4 where it applies, and holes."""
    from partition_server.api.distributor import distribute
    strategies = {d.strategy for _, d in CASES.values()}
    assert strategies == {"balanced", "count", "percentage", "ids", "layers", "auto"}
    assert {p for p, _ in CASES.values()} == {1, 2, 3, 4}
    holes = 0
    for p, dist in CASES.values():
        owners = distribute(UNITS, p, dist)
        holes += sum(1 for layer in owners for q in range(p) if q not in {r.partition for r in layer})
    assert holes > 10
    fragmented = distribute(UNITS, 4, CASES["ids-4"][1])[0]
    assert [r.partition for r in fragmented] == [0, 1, 2, 3] * 3


@pytest.mark.parametrize("case", list(CASES))
def test_forward_gradients_and_one_sgd_step(case, tmp_path):
    partitions, dist = CASES[case]
    lr = 0.1
    ref = reference(optimizer=OptimizerConfig("sgd", learning_rate=lr, momentum=0.0))
    with Cluster(tmp_path, partitions, dist) as cluster:
        driver = cluster.driver()
        driver.wait_ready(timeout=30)
        x, y = batch(1)
        out, loss, correct = driver.step(x)
        assert (loss, correct) == (None, None)
        assert out.dtype == np.float32 and out.shape == (BATCH, UNITS[-1])
        np.testing.assert_allclose(out, ref.forward(x), **TOL)

        x, y = batch(2)
        before = [(w.copy(), b.copy()) for w, b in ref.params]
        want = ref.train_step(x, y)
        out, loss, correct = driver.step(x, y, OptimizerConfig("sgd", learning_rate=lr, momentum=0.0))
        np.testing.assert_allclose(out, want.outputs, **TOL)
        assert loss == pytest.approx(want.loss, rel=1e-5)
        assert correct == want.correct

        grads = cluster.grads()
        for k, (dw, db) in enumerate(grads):
            np.testing.assert_allclose(dw, ref.last_grads[k][0], **TOL, err_msg=f"dW of layer {k}")
            np.testing.assert_allclose(db, ref.last_grads[k][1], **TOL, err_msg=f"db of layer {k}")
            assert np.abs(dw).max() > 1e-4, f"layer {k}: gradient is all zero, the comparison proves nothing"
        params = cluster.params()
        for k, ((w, b), (w0, b0)) in enumerate(zip(params, before)):
            # Plain SGD: params_after = params - lr * grad, and that is the reference after one step.
            np.testing.assert_allclose(w, w0 - np.float32(lr) * ref.last_grads[k][0], **TOL)
            np.testing.assert_allclose(w, ref.params[k][0], **TOL)
            np.testing.assert_allclose(b, ref.params[k][1], **TOL)

        # One message per (layer, peer, phase): traffic follows from the table alone.
        messages, nbytes = driver.traffic()
        fwd = expected_traffic(cluster.table, train=False)
        trn = expected_traffic(cluster.table, train=True)
        assert (messages, nbytes) == (fwd[0] + trn[0], fwd[1] + trn[1])
        if partitions == 1:
            assert messages == 0

        status = {r.partition: r for r in driver.status()}
        assert sum(r.neurons for r in status.values()) == sum(UNITS)
        assert sum(r.parameters for r in status.values()) == 263  # 12*11 + 7*13 + 5*8


OPTIMIZERS = {
    "sgd-momentum": OptimizerConfig("sgd", learning_rate=0.1, momentum=0.9),
    "adam": OptimizerConfig("adam", learning_rate=0.01),
    "adam-beta-zero": OptimizerConfig("adam", learning_rate=0.01, beta1=0.0, beta2=0.0),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("case", list(CASES))
def test_twenty_steps_match_reference(case, optimizer, tmp_path):
    partitions, dist = CASES[case]
    cfg = OPTIMIZERS[optimizer]
    ref = reference(optimizer=cfg)
    with Cluster(tmp_path, partitions, dist) as cluster:
        driver = cluster.driver()
        for step in range(20):
            x, y = batch(100 + step)
            want = ref.train_step(x, y)
            _, loss, correct = driver.step(x, y, cfg)
            assert loss == pytest.approx(want.loss, rel=1e-5), f"step {step}"
            assert correct == want.correct, f"step {step}"
        # From the running engines ...
        for k in range(len(UNITS)):
            np.testing.assert_allclose(cluster.tensor(k, "weight"), ref.params[k][0], **TOL)
            np.testing.assert_allclose(cluster.tensor(k, "bias"), ref.params[k][1], **TOL)
            assert set(ref.state[k]) == {f"{n}.{b}" for n in ("weight", "bias") for b in cfg.buffer_names()}
            for buf, want_buf in ref.state[k].items():
                np.testing.assert_allclose(cluster.tensor(k, buf), want_buf, **TOL, err_msg=f"{k}.{buf}")
        assert {e.optimizer_step for e in cluster.engines().values()} == {20}
        # ... and from a committed checkpoint on the "volume".
        store = ModelStore(cluster.model_dir)
        ckpt = driver.checkpoint(store, MODEL, {"run_id": "t"})
        assert ckpt.sequence == 1 and store.latest().sequence == 1
        assert ckpt.meta["optimizer_step"] == 20
        for k in range(len(UNITS)):
            np.testing.assert_allclose(ckpt.read_layer(k, "weight"), ref.params[k][0], **TOL)
            np.testing.assert_allclose(ckpt.read_layer(k, "bias"), ref.params[k][1], **TOL)
            for buf, want_buf in ref.state[k].items():
                np.testing.assert_allclose(ckpt.read_layer(k, buf), want_buf, **TOL)
    # Learning happened, so equality is not between two untouched copies.
    init = reference().params
    assert not np.allclose(ref.params[0][0], init[0][0], atol=1e-3)



WIDE_MODEL = ModelSpec(MODEL.inputs, (LayerSpec(12, "relu"), LayerSpec(9, "tanh"), LayerSpec(5, "softmax")), seed=7)


def test_log_depth_collectives_over_grpc_at_eight_partitions(tmp_path):
    """P=8 balanced over real Exchange calls: layers 0 (12 units) and 1 (9) are owned by every
    partition, so layer 0's all-gather and the reduce-scatter into layer 0 are the log-depth
    ones (3 rounds, phases fwd.0..2 and bwd.0..2); the 5-unit layer stays direct. Outputs and
    parameters after 3 momentum steps equal the reference; bytes equal the direct exchange's."""
    ref = reference(WIDE_MODEL, optimizer=OptimizerConfig("sgd", learning_rate=0.1, momentum=0.9))
    with Cluster(tmp_path, 8, Distribution("balanced"), model=WIDE_MODEL) as cluster:
        driver = cluster.driver()
        driver.wait_ready(timeout=60)
        for step in range(3):
            x, y = batch(40 + step)
            want = ref.train_step(x, y)
            out, loss, _ = driver.step(x, y, OptimizerConfig("sgd", learning_rate=0.1, momentum=0.9))
            np.testing.assert_allclose(out, want.outputs, **TOL)
            assert loss == pytest.approx(want.loss, rel=1e-5)
        for k, (w, b) in enumerate(cluster.params()):
            np.testing.assert_allclose(w, ref.params[k][0], **TOL)
            np.testing.assert_allclose(b, ref.params[k][1], **TOL)
        messages, nbytes = driver.traffic()
        direct = expected_traffic(cluster.table, train=True)
        assert nbytes == 3 * direct[1]
        # Layer 0 forward and backward into layer 0: P log2 P messages each instead of P (P-1).
        assert messages == 3 * (direct[0] - 2 * (8 * 7 - 8 * 3))
