"""Training and evaluation data for mpnn networks: the loaders and :func:`load_dataset`.

Every loader returns a :class:`~partition_server.data.base.Dataset`: flat
float32 features in ``[0, 1]`` and int64 class labels, already split into a
training and a test part.

Sources (``spec.training.dataset.format``, one of
:data:`partition_server.api.manifest.DATASET_FORMATS`):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits
  (``sklearn.datasets.load_digits``; 1,797 images, 64 features, 10 classes),
  no network access needed.
- ``mnist-idx``: MNIST in the IDX format of LeCun, Cortes and Burges
  (http://yann.lecun.com/exdb/mnist/), gzipped or plain, parsed here
  (:mod:`.idx`, :mod:`.mnist`).
- ``npz``: a numpy ``.npz`` archive with ``x_train, y_train, x_test, y_test``.

This module also re-exports the names of :mod:`.base`, :mod:`.idx` and :mod:`.mnist`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from partition_server.api.manifest import DATASET_FORMATS
from partition_server.data.base import Dataset, DatasetError
from partition_server.data.idx import read_idx
from partition_server.data.mnist import MNIST_FILES, MNIST_MIRRORS, download_mnist, load_mnist_idx

__all__ = [
    "MNIST_FILES",
    "MNIST_MIRRORS",
    "Dataset",
    "DatasetError",
    "download_mnist",
    "load_dataset",
    "load_digits_dataset",
    "load_mnist_idx",
    "load_npz",
    "read_idx",
]


def load_digits_dataset(*, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Load scikit-learn's bundled 8x8 digits, split deterministically.

    Source: ``sklearn.datasets.load_digits`` (UCI optical recognition of
    handwritten digits, test part; 1,797 images), shipped with scikit-learn,
    so no download happens.

    Args:
        seed: seed of the shuffle; the same seed gives the same split.
        test_fraction: share of the images that go to the test part, in (0, 1).

    Returns:
        Dataset with ``x_* [n, 64]`` float32 (pixel intensity 0..16 divided
        by 16) and ``y_* [n]`` int64 labels 0..9, ``num_classes=10``.

    Raises:
        DatasetError: if ``test_fraction`` is not in (0, 1).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < float(test_fraction) < 1.0:
        raise DatasetError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=float(test_fraction), random_state=int(seed), shuffle=True
    )
    return Dataset(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, name="digits", num_classes=10)


def load_npz(path: str | os.PathLike[str]) -> Dataset:
    """Load a dataset from a numpy ``.npz`` archive.

    The archive holds ``x_train [n, features]``, ``y_train [n]``,
    ``x_test [m, features]`` and ``y_test [m]``; features must already be in
    ``[0, 1]`` (cast to float32), labels non-negative integers (cast to
    int64). An optional scalar ``num_classes`` entry sets the class count;
    otherwise it is the largest label + 1. Object arrays are refused
    (``allow_pickle=False``).

    Args:
        path: the ``.npz`` file.

    Returns:
        Dataset named after the file's stem.

    Raises:
        DatasetError: naming the file and the array, if the file cannot be
            read, an array is missing, has the wrong rank or a non-numeric
            dtype, labels are not integers, row counts differ, or values are
            out of range.
    """
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read npz archive: {e}") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(f"{path}: not an npz archive (holds a single array)")
    with archive:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in archive.files]
        if missing:
            raise DatasetError(f"{path}: missing array(s) {', '.join(missing)} (has: {', '.join(archive.files)})")
        arrays = {}
        for key, ndim in (("x_train", 2), ("y_train", 1), ("x_test", 2), ("y_test", 1)):
            a = archive[key]
            if a.ndim != ndim:
                raise DatasetError(f"{path}: {key} must be {ndim}-D, got shape {list(a.shape)}")
            if key.startswith("y") and not np.issubdtype(a.dtype, np.integer):
                raise DatasetError(f"{path}: {key} must hold integer labels, got dtype {a.dtype}")
            if key.startswith("x") and not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
                raise DatasetError(f"{path}: {key} must be numeric, got dtype {a.dtype}")
            arrays[key] = a
        if "num_classes" in archive.files:
            nc = archive["num_classes"]
            if nc.shape != () or not np.issubdtype(nc.dtype, np.integer):
                raise DatasetError(f"{path}: num_classes must be an integer scalar, got {nc.dtype} {list(nc.shape)}")
            num_classes = int(nc)
        else:
            labels = [arrays[k] for k in ("y_train", "y_test") if arrays[k].size]
            num_classes = int(max(int(a.max()) for a in labels)) + 1 if labels else 1
    try:
        return Dataset(x_train=arrays["x_train"].astype(np.float32), y_train=arrays["y_train"].astype(np.int64),
                       x_test=arrays["x_test"].astype(np.float32), y_test=arrays["y_test"].astype(np.int64),
                       name=path.stem, num_classes=num_classes)
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}") from e


def load_dataset(format: str, path: str | os.PathLike[str] | None = None, **kwargs: object) -> Dataset:
    """Load a dataset by format name.

    Args:
        format: one of :data:`DATASET_FORMATS`: ``"digits"`` (``path``
            ignored), ``"mnist-idx"`` (``path`` = directory of IDX files) or
            ``"npz"`` (``path`` = the archive).
        path: where the data lives; required for ``mnist-idx`` and ``npz``.
        **kwargs: passed to the loader (``seed``/``test_fraction`` for
            digits, ``train_count``/``test_count`` for mnist-idx).

    Raises:
        DatasetError: if ``format`` is unknown (the message names it and the
            known formats), ``path`` is missing where required, or the
            loader fails.
    """
    if format == "digits":
        return load_digits_dataset(**kwargs)  # type: ignore[arg-type]
    if format in ("mnist-idx", "npz"):
        if path is None or str(path) == "":
            raise DatasetError(f"dataset format {format!r} needs a path")
        if format == "mnist-idx":
            return load_mnist_idx(path, **kwargs)  # type: ignore[arg-type]
        if kwargs:
            raise DatasetError(f"dataset format 'npz' takes no options, got {sorted(kwargs)}")
        return load_npz(path)
    raise DatasetError(f"unknown dataset format {format!r} (known: {', '.join(DATASET_FORMATS)})")
