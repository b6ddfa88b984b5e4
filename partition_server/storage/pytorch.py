"""Weights in PyTorch ``nn.Linear`` layout: import rows from, and export a checkpoint to, one safetensors file.

The file holds ``layers.{k}.weight`` ``[units_k, inputs_k]`` and
``layers.{k}.bias`` ``[units_k]`` per layer ``k``, as
``safetensors.torch.save_file({f"layers.{k}.weight": lin.weight, ...})``
writes them for a stack of ``nn.Linear`` layers (``spec.model.weights``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import safe_open

from partition_server.storage.files import save_safetensors
from partition_server.storage.validation import RowRanges, StoreError, check_int, check_ranges

if TYPE_CHECKING:
    from partition_server.storage.checkpoint import Checkpoint

__all__ = ["export_torch", "read_torch_rows"]


def read_torch_rows(path: str | os.PathLike[str], layer: int, ranges: RowRanges, *, expect_inputs: int,
                    expect_units: int) -> tuple[np.ndarray, np.ndarray]:
    """Read rows of layer ``layer`` from a safetensors file in PyTorch ``nn.Linear`` layout.

    Only the requested rows are read, e.g. from a file written by
    :func:`export_torch`.

    Args:
        path: the safetensors file.
        layer: layer index ``k``.
        ranges: half-open rows to read, ascending and disjoint.
        expect_inputs: the layer's input width in the network.
        expect_units: the layer's neuron count in the network.

    Returns:
        ``(weight_rows [rows, expect_inputs], bias_rows [rows])``, float32
        (float16/float64 files are converted).

    Raises:
        StoreError: naming the file and key, if the file cannot be opened, a
            key is missing, a shape differs from the expected one (expected
            and actual are given), the dtype is not float16/32/64 (e.g. bf16),
            or ``ranges`` exceed ``expect_units``.
    """
    path = Path(path)
    layer = check_int(layer, "layer")
    expect_inputs = check_int(expect_inputs, "expect_inputs", minimum=1)
    expect_units = check_int(expect_units, "expect_units", minimum=1)
    wanted = check_ranges(ranges, f"ranges of layer {layer}", units=expect_units)
    try:
        f = safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises its own SafetensorError besides OSError
        raise StoreError(f"{path}: cannot open as safetensors: {e}") from e
    out = []
    with f:
        keys = set(f.keys())
        for name, shape in (("weight", [expect_units, expect_inputs]), ("bias", [expect_units])):
            key = f"layers.{layer}.{name}"
            if key not in keys:
                raise StoreError(f"{path}: key {key} is missing (PyTorch nn.Linear layout expected: "
                                 f"layers.{{k}}.weight, layers.{{k}}.bias)")
            tensor = f.get_slice(key)
            actual = list(tensor.get_shape())
            if actual != shape:
                raise StoreError(f"{path}: {key} has shape {actual}, the network needs {shape}")
            dtype = tensor.get_dtype()
            if dtype not in ("F16", "F32", "F64"):
                raise StoreError(f"{path}: {key} has dtype {dtype}; only F16, F32 and F64 can be imported")
            parts = [tensor[s:e] for s, e in wanted]
            trailing = shape[1:]
            rows = np.concatenate(parts) if parts else np.empty([0] + trailing)
            out.append(np.ascontiguousarray(rows, dtype=np.float32))
    return out[0], out[1]


def export_torch(checkpoint: "Checkpoint", path: str | os.PathLike[str]) -> Path:
    """Write ``checkpoint``'s whole model as one safetensors file in PyTorch ``nn.Linear`` layout.

    Keys ``layers.{k}.weight`` ``[units_k, inputs_k]`` float32 and
    ``layers.{k}.bias`` ``[units_k]`` float32; optimizer state is left out.
    The header metadata holds ``format: pt`` and ``mpnn.sequence``. Written
    atomically (temp file in the same directory, fsync, ``os.replace``);
    missing parent directories are created. Loadable with
    ``safetensors.torch.load_file`` and :func:`read_torch_rows`.

    Returns:
        The written path.

    Raises:
        StoreError: if a shard of the checkpoint cannot be read.
        OSError: if the file cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k in range(checkpoint.num_layers):
        tensors[f"layers.{k}.weight"] = np.ascontiguousarray(checkpoint.read_layer(k, "weight"), dtype=np.float32)
        tensors[f"layers.{k}.bias"] = np.ascontiguousarray(checkpoint.read_layer(k, "bias"), dtype=np.float32)
    save_safetensors(tensors, path, metadata={"format": "pt", "mpnn.sequence": str(checkpoint.sequence)})
    return path
