"""MNIST in IDX files: the loader (with MD5 checks) and an explicit downloader.

The four files of LeCun, Cortes and Burges (http://yann.lecun.com/exdb/mnist/),
gzipped or plain, are parsed by :func:`~partition_server.data.idx.read_idx`.
Nothing here touches the network except :func:`download_mnist`, which only an
explicit call runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from pathlib import Path

import numpy as np

from partition_server.data.base import Dataset, DatasetError
from partition_server.data.idx import read_idx
from partition_server.storage.atomic import write_atomically

__all__ = ["MNIST_FILES", "MNIST_MIRRORS", "download_mnist", "load_mnist_idx"]

log = logging.getLogger(__name__)

MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
"""File name -> MD5 of the gzipped file, as published with MNIST (the same values torchvision checks)."""

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
"""Tried in order. The first is the mirror torchvision uses; the second is the
original home of MNIST, which often refuses automated downloads."""


def _find(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _read_md5sums(path: Path) -> dict[str, str]:
    """Parse ``md5sum`` output: ``<hex>  <name>`` (``*<name>`` in binary mode)."""
    sums: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 32:
            raise DatasetError(f"{path}:{lineno}: not an md5sum line: {line!r}")
        sums[parts[1].strip().lstrip("*")] = parts[0].lower()
    return sums


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _mnist_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DatasetError(
            f"{images_path}: MNIST images must be 3-D ubyte [n, rows, cols], "
            f"got {images.dtype} with dims {list(images.shape)}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetError(
            f"{labels_path}: MNIST labels must be 1-D ubyte [n], "
            f"got {labels.dtype} with dims {list(labels.shape)}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels"
        )
    if labels.size and labels.max() > 9:
        raise DatasetError(f"{labels_path}: label {int(labels.max())} is outside 0..9")
    x = images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0)
    return x, labels.astype(np.int64)


def _take(x: np.ndarray, y: np.ndarray, count: int | None, field: str) -> tuple[np.ndarray, np.ndarray]:
    if count is None:
        return x, y
    if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 1:
        raise DatasetError(f"{field} must be a positive int or None, got {count!r}")
    if count > x.shape[0]:
        raise DatasetError(f"{field}={count} exceeds the {x.shape[0]} examples available")
    return x[:count], y[:count]


def load_mnist_idx(
    directory: str | os.PathLike[str],
    *,
    train_count: int | None = None,
    test_count: int | None = None,
) -> Dataset:
    """Load MNIST from IDX files in ``directory``.

    Looks for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each with or
    without ``.gz`` (the ``.gz`` file wins when both exist).

    - Train and t10k files present: train trains, t10k evaluates.
    - Only t10k files present: t10k is split in order; the first 80% train
      and the last 20% evaluate (8,000 / 2,000 for the standard 10,000).

    When ``directory/MD5SUMS`` exists (``md5sum`` output), every file that is
    read and listed there is checked against it before parsing; files it
    does not list are not checked.

    Args:
        directory: folder holding the files.
        train_count: keep only the first ``train_count`` training examples.
        test_count: keep only the first ``test_count`` test examples.

    Returns:
        Dataset with ``x_* [n, 784]`` float32 (pixel / 255) and ``y_* [n]``
        int64 labels 0..9, ``num_classes=10``, ``name="mnist"``.

    Raises:
        DatasetError: if the directory or the t10k files are missing, only one
            of the two train files exists, an MD5 does not match, a file is
            malformed (see :func:`read_idx`), image and label counts differ,
            or a count argument is not a positive int within range.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"MNIST directory {directory} does not exist: pass --data DIR with the IDX files "
                           "(t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz], optionally the train "
                           "files), or fetch them once with partition_server.data.mnist.download_mnist(DIR)")
    train_images = _find(directory, "train-images-idx3-ubyte")
    train_labels = _find(directory, "train-labels-idx1-ubyte")
    test_images = _find(directory, "t10k-images-idx3-ubyte")
    test_labels = _find(directory, "t10k-labels-idx1-ubyte")
    if test_images is None or test_labels is None:
        missing = [n for n, p in (("t10k-images-idx3-ubyte[.gz]", test_images),
                                  ("t10k-labels-idx1-ubyte[.gz]", test_labels)) if p is None]
        raise DatasetError(f"{directory}: missing MNIST file(s): {', '.join(missing)}")
    if (train_images is None) != (train_labels is None):
        present = train_images or train_labels
        raise DatasetError(f"{directory}: found {present.name} but not its train images/labels counterpart")
    have_train = train_images is not None

    used = [p for p in (train_images, train_labels, test_images, test_labels) if p is not None]
    md5sums_path = directory / "MD5SUMS"
    if md5sums_path.is_file():
        sums = _read_md5sums(md5sums_path)
        for p in used:
            want = sums.get(p.name)
            if want is None:
                continue
            got = _md5(p)
            if got != want:
                raise DatasetError(f"{p}: MD5 {got} does not match {want} listed in {md5sums_path}")

    x_test, y_test = _mnist_pair(test_images, test_labels)
    if have_train:
        x_train, y_train = _mnist_pair(train_images, train_labels)  # type: ignore[arg-type]
    else:
        n_test = x_test.shape[0] // 5
        cut = x_test.shape[0] - n_test
        if cut < 1 or n_test < 1:
            raise DatasetError(
                f"{test_images}: {x_test.shape[0]} images are too few to split into train and test"
            )
        x_train, y_train = x_test[:cut], y_test[:cut]
        x_test, y_test = x_test[cut:], y_test[cut:]
    x_train, y_train = _take(x_train, y_train, train_count, "train_count")
    x_test, y_test = _take(x_test, y_test, test_count, "test_count")
    return Dataset(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, name="mnist", num_classes=10)


def download_mnist(directory: str | os.PathLike[str], *, timeout: float = 60.0) -> list[Path]:
    """Download the four MNIST files into ``directory`` (network access!).

    Only runs when called explicitly; no loader calls it. Each file is
    fetched from the first of :data:`MNIST_MIRRORS` that serves it with the
    expected MD5 (:data:`MNIST_FILES`) and written with
    :func:`~partition_server.storage.atomic.write_atomically` (temporary file,
    fsync, ``os.replace``), so a partial download never appears under the
    real name. Files already present with
    the right MD5 are kept. Also writes ``MD5SUMS``.

    Args:
        directory: target folder; created if missing.
        timeout: per-request timeout in seconds.

    Returns:
        Paths of the four ``.gz`` files.

    Raises:
        DatasetError: if a file cannot be fetched with the right MD5 from
            any mirror (the message lists each mirror's failure).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, md5 in MNIST_FILES.items():
        target = directory / name
        paths.append(target)
        if target.is_file() and _md5(target) == md5:
            continue
        errors = []
        for mirror in MNIST_MIRRORS:
            url = mirror + name
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    data = response.read()
            except OSError as e:  # URLError, HTTPError, timeouts
                errors.append(f"{url}: {e}")
                continue
            got = hashlib.md5(data).hexdigest()
            if got != md5:
                errors.append(f"{url}: MD5 {got}, expected {md5}")
                continue
            log.info("downloaded %s (%d bytes)", url, len(data))
            write_atomically(target, data)
            break
        else:
            raise DatasetError(f"could not download {name}: " + "; ".join(errors))
    write_atomically(directory / "MD5SUMS", "".join(f"{m}  {n}\n" for n, m in MNIST_FILES.items()))
    return paths
