"""The contenders that are not mpnn: the same neuron-split training step with mpi4py, and the
single-process numpy step. Run by ``bench/contenders.py``; one JSON line on stdout.

- ``--mode numpy``: ``ReferenceNetwork.train_step`` (whole matrices, one process). Run it with
  one BLAS thread (``OPENBLAS_NUM_THREADS=1``, set by the caller).
- ``--mode mpi`` under ``mpirun -np P``: rank ``p`` owns the ``balanced`` rows of every layer
  and their SGD-momentum state (``engine.init_partition``, ``engine.optimizers.update``: the
  same initial weights and update as mpnn); forward is ``MPI_Allgatherv`` of each layer's
  ``[batch, n_p]`` block, backward ``MPI_Reduce_scatter`` of the input-gradient partials,
  softmax cross-entropy on the gathered logits. This is the algorithm of the partition
  servers with MPI's collectives instead of the ``Exchange`` RPC.

Workloads: ``--width W`` (``inputs=W``, layers ``[W relu, W relu, 10 softmax]``, random batch)
or ``--mnist DIR`` (784-256-128-10 on MNIST's t10k set, shuffled batches).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from partition_server.api.distributor import Distribution, distribute  # noqa: E402
from partition_server.api.manifest import LayerSpec, ModelSpec  # noqa: E402
from partition_server.engine import OptimizerConfig, activate, activation_derivative, init_partition  # noqa: E402
from partition_server.engine.optimizers import update  # noqa: E402

F32 = np.float32
OPTIMIZER = OptimizerConfig("sgd", learning_rate=0.01, momentum=0.9)
MNIST_OPTIMIZER = OptimizerConfig("sgd", learning_rate=0.05, momentum=0.9)


def width_model(width: int) -> ModelSpec:
    return ModelSpec(width, (LayerSpec(width, "relu"), LayerSpec(width, "relu"), LayerSpec(10, "softmax")), seed=0)


MNIST_MODEL = ModelSpec(784, (LayerSpec(256, "relu"), LayerSpec(128, "relu"), LayerSpec(10, "softmax")), seed=0)


def mnist_data(directory: str, batch: int, steps: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``steps`` shuffled batches of MNIST's t10k set (pixels scaled to [0, 1])."""
    from partition_server.data.idx import read_idx
    d = Path(directory)
    x = read_idx(d / "t10k-images-idx3-ubyte.gz").reshape(-1, 784).astype(F32) / F32(255)
    y = read_idx(d / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(len(x)) for _ in range(steps * batch // len(x) + 1)])
    return ([x[order[s * batch:(s + 1) * batch]] for s in range(steps)],
            [y[order[s * batch:(s + 1) * batch]] for s in range(steps)])


class MPINet:
    """Rank ``rank``'s rows of every layer, trained with MPI collectives."""

    def __init__(self, comm, model: ModelSpec, optimizer: OptimizerConfig):
        self.comm, self.rank, self.size = comm, comm.Get_rank(), comm.Get_size()
        self.model, self.optimizer = model, optimizer
        self.assignment = distribute(model.layer_units, self.size, Distribution("balanced"))
        self.ranges = {k: layer.spans(self.rank) for k, layer in enumerate(self.assignment)}
        self.widths = [[sum(e - s for s, e in layer.spans(q)) for q in range(self.size)] for layer in self.assignment]
        self.params = init_partition(model.inputs, model.layers, model.seed, self.ranges)
        self.state: dict[int, dict[str, np.ndarray]] = {k: {} for k in self.params}
        self.t = 0

    def _allgather(self, k: int, mine: np.ndarray, batch: int) -> np.ndarray:
        counts = [batch * w for w in self.widths[k]]
        recv = np.empty(sum(counts), dtype=F32)
        self.comm.Allgatherv(np.ascontiguousarray(mine), [recv, counts])
        # Balanced ranges are contiguous and ascending by rank: blocks side by side.
        blocks, at = [], 0
        for c, w in zip(counts, self.widths[k]):
            blocks.append(recv[at:at + c].reshape(batch, w))
            at += c
        return np.concatenate(blocks, axis=1)

    def _reduce_scatter(self, k: int, partial: np.ndarray, batch: int) -> np.ndarray:
        widths = self.widths[k]
        send = np.concatenate([np.ascontiguousarray(b).ravel() for b in np.split(partial, np.cumsum(widths)[:-1], axis=1)])
        recv = np.empty(batch * widths[self.rank], dtype=F32)
        self.comm.Reduce_scatter(send, recv, recvcounts=[batch * w for w in widths])
        return recv.reshape(batch, widths[self.rank])

    def step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
        batch = len(x)
        layers = self.model.layers
        last = len(layers) - 1
        full, local, zs = {-1: x}, {}, {}
        for k, layer in enumerate(layers):
            w, b = self.params[k]
            z = full[k - 1] @ w.T
            z += b
            mine = z if k == last else activate(layer.activation, z)
            local[k] = mine
            full[k] = self._allgather(k, mine, batch)
        logits = full[last]
        shifted = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        probs = e / e.sum(axis=1, keepdims=True)
        loss = float(-np.log(probs[np.arange(batch), y] + 1e-12).mean())
        correct = int(np.count_nonzero(probs.argmax(axis=1) == y))
        grad = probs
        grad[np.arange(batch), y] -= 1
        (s, e_), = self.ranges[last]
        delta = np.ascontiguousarray(grad[:, s:e_] / F32(batch), dtype=F32)
        self.t += 1
        for k in range(last, -1, -1):
            w, b = self.params[k]
            dw, db = delta.T @ full[k - 1], delta.sum(axis=0)
            if k > 0:
                total = self._reduce_scatter(k - 1, delta @ w, batch)
                d = activation_derivative(layers[k - 1].activation, local[k - 1])
                next_delta = total * d if d is not None else total
            self.params[k] = (update(self.optimizer, w, dw, self.state[k], name="weight", t=self.t),
                              update(self.optimizer, b, db, self.state[k], name="bias", t=self.t))
            if k > 0:
                delta = next_delta
        return loss, correct


def numpy_net(model: ModelSpec, optimizer: OptimizerConfig):
    from partition_server.engine import init_params
    from partition_server.testing import ReferenceNetwork
    return ReferenceNetwork(model.inputs, model.layers, init_params(model.inputs, model.layers, model.seed), optimizer)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["numpy", "mpi"], required=True)
    p.add_argument("--width", type=int)
    p.add_argument("--mnist")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    args = p.parse_args(argv)
    if args.mnist:
        model, optimizer = MNIST_MODEL, MNIST_OPTIMIZER
        xs, ys = mnist_data(args.mnist, args.batch, args.steps + 1)
    else:
        model, optimizer = width_model(args.width), OPTIMIZER
        rng = np.random.default_rng(args.width)
        xs = [rng.normal(size=(args.batch, args.width)).astype(F32)] * (args.steps + 1)
        ys = [rng.integers(0, 10, size=args.batch).astype(np.int64)] * (args.steps + 1)
    comm = None
    if args.mode == "mpi":
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        net = MPINet(comm, model, optimizer)
        step = net.step
    else:
        ref = numpy_net(model, optimizer)

        def step(x, y):
            r = ref.train_step(x, y)
            return r.loss, r.correct
    times = []
    loss = None
    for i, (x, y) in enumerate(zip(xs, ys)):
        if comm is not None:
            comm.Barrier()
        t0 = time.perf_counter()
        loss, _ = step(x, y)
        if comm is not None:
            comm.Barrier()
        if i:
            times.append(time.perf_counter() - t0)
    if comm is None or comm.Get_rank() == 0:
        print(json.dumps({"mode": args.mode, "partitions": comm.Get_size() if comm else 1,
                          "s_per_step": times, "loss": loss}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
