"""Where a partition server's rows come from: the lookup table, then the newest weights source.

:func:`load_partition` reads the lookup table, checks it against the network, and builds the
engine for this partition's rows of every layer from the first source that exists:

1. the latest committed checkpoint on the shared volume whose every shard matches the sha256 in
   its commit record (weights, biases, optimizer state and optimizer step), whatever the
   assignment was when it was written; a newer checkpoint with a mismatching, missing or
   resized shard is skipped with a warning naming it (``ModelStore.latest``);
2. ``model.weights``, a safetensors file in PyTorch ``nn.Linear`` layout (relative paths are
   taken from the volume, the parent of the model directory);
3. the seeded initialisation (``engine.init_partition``), a pure function of (seed, layer, row):
   only this partition's rows are generated.

Each source's rows are handed to the engine as they are (``adopt``): one copy of the rows, plus
optimizer state, is in memory, never the whole network.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path


from partition_server.api.lookup import LookupTable
from partition_server.api.manifest import ModelSpec
from partition_server.engine import OptimizerConfig, PartitionEngine, init_partition
from partition_server.storage.store import ModelStore, read_torch_rows

__all__ = ["Loaded", "load_partition"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """What a partition server currently serves: one lookup version and the engine built for it.

    Attributes:
        table: the lookup table.
        engine: this partition's rows under it.
        source: where the rows came from: ``"checkpoint"``, ``"import"`` or ``"init"``.
        checkpoint: the checkpoint's sequence number, -1 without one.
    """

    table: LookupTable
    engine: PartitionEngine
    source: str
    checkpoint: int


def load_partition(index: int, model: ModelSpec, *, lookup_path: Path, store: ModelStore) -> Loaded:
    """Partition ``index``'s rows under the table at ``lookup_path``, from the newest source.

    Args:
        index: this partition, 0..P-1 of the table.
        model: the network's shape, seed and optional import file.
        lookup_path: ``lookup.json``.
        store: the network's checkpoints (its root is the model directory on the volume).

    Raises:
        LookupTableError: the table cannot be read or is invalid.
        ValueError: the table's layers differ from ``model``'s, or ``index`` is not in it.
        StoreError, OSError: a checkpoint or the import file cannot be read.
    """
    table = LookupTable.load(lookup_path)
    if list(table.layer_units) != model.layer_units:
        raise ValueError(f"lookup {lookup_path}: layer units {list(table.layer_units)} differ "
                         f"from the network's {model.layer_units}")
    if not 0 <= index < table.num_partitions:
        raise ValueError(f"partition {index} is not in the lookup's {table.num_partitions} partitions")
    ranges = {k: [(r.start, r.end) for r in table.ranges(k, index)] for k in range(table.num_layers)}
    owned = [k for k, rs in ranges.items() if rs]

    def engine(params: dict, optimizer: OptimizerConfig | None = None) -> PartitionEngine:
        # The rows were made for this engine alone: it adopts them instead of copying.
        return PartitionEngine(index, model.inputs, model.layers, table, params, optimizer, adopt=True)

    ckpt = store.latest()
    if ckpt is not None:
        optimizer = OptimizerConfig(**ckpt.meta["optimizer"]) if "optimizer" in ckpt.meta else None
        tensors = {k: {n: ckpt.read_rows(k, n, ranges[k]) for n in ckpt.tensor_names(k)} for k in owned}
        built = engine({k: (t["weight"], t["bias"]) for k, t in tensors.items()}, optimizer)
        built.load_state(tensors, int(ckpt.meta.get("optimizer_step", 0)), adopt=True)
        log.info("partition %d loaded checkpoint %d (shards verified against %s)", index, ckpt.sequence,
                 ckpt.record_path.name)
        return Loaded(table, built, "checkpoint", ckpt.sequence)
    if model.weights:
        path = Path(model.weights)
        path = path if path.is_absolute() else store.root.parent / path
        fan_in = [model.inputs] + model.layer_units[:-1]
        params = {k: read_torch_rows(path, k, ranges[k], expect_inputs=fan_in[k], expect_units=model.layer_units[k])
                  for k in owned}
        return Loaded(table, engine(params), "import", -1)
    return Loaded(table, engine(init_partition(model.inputs, model.layers, model.seed, ranges)), "init", -1)
