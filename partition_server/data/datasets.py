"""Training and evaluation data for mpnn networks.

Every loader returns a :class:`Dataset`: flat float32 features in ``[0, 1]``
and int64 class labels, already split into a training and a test part.

Sources:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits
  (``sklearn.datasets.load_digits``; 1,797 images, 64 features, 10 classes),
  no network access needed.
- ``mnist-idx``: MNIST in the IDX format of LeCun, Cortes and Burges
  (http://yann.lecun.com/exdb/mnist/), gzipped or plain, parsed here.
- ``npz``: a numpy ``.npz`` archive with ``x_train, y_train, x_test, y_test``.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATASET_FORMATS",
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

log = logging.getLogger(__name__)

DATASET_FORMATS = ("digits", "mnist-idx", "npz")

# File name -> MD5 of the gzipped file, as published with MNIST (the same
# values torchvision checks).
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

# Tried in order. The first is the mirror torchvision uses; the second is the
# original home of MNIST, which often refuses automated downloads.
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


class DatasetError(ValueError):
    """A data file or dataset argument is missing, malformed or inconsistent.

    The message names the file or field and what was wrong with it.
    """


@dataclass(frozen=True)
class Dataset:
    """A classification dataset split into a training and a test part.

    Attributes:
        x_train: ``[n_train, features]`` float32, every value in ``[0, 1]`` (stored C-contiguous).
        y_train: ``[n_train]`` int64 class labels in ``[0, num_classes)``.
        x_test: ``[n_test, features]`` float32, every value in ``[0, 1]``.
        y_test: ``[n_test]`` int64 class labels in ``[0, num_classes)``.
        name: short human-readable name, e.g. ``"digits"``.
        num_classes: number of classes (output units of a classifier).

    Raises:
        DatasetError: on construction, if a field has the wrong dtype, rank
            or length, a feature is outside ``[0, 1]`` or not finite, or a
            label is outside ``[0, num_classes)``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    num_classes: int

    def __post_init__(self) -> None:
        for field in ("x_train", "y_train", "x_test", "y_test"):
            value = getattr(self, field)
            if isinstance(value, np.ndarray) and not value.flags.c_contiguous:
                object.__setattr__(self, field, np.ascontiguousarray(value))
        if not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 1:
            raise DatasetError(f"{self.name}: num_classes must be a positive int, got {self.num_classes!r}")
        for part in ("train", "test"):
            x = getattr(self, f"x_{part}")
            y = getattr(self, f"y_{part}")
            if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 2:
                raise DatasetError(
                    f"{self.name}: x_{part} must be a 2-D float32 array [n, features], "
                    f"got {_describe(x)}"
                )
            if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.ndim != 1:
                raise DatasetError(
                    f"{self.name}: y_{part} must be a 1-D int64 array [n], got {_describe(y)}"
                )
            if x.shape[0] != y.shape[0]:
                raise DatasetError(
                    f"{self.name}: x_{part} has {x.shape[0]} rows but y_{part} has {y.shape[0]} labels"
                )
            if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
                raise DatasetError(f"{self.name}: x_{part} values must be finite and in [0, 1]")
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise DatasetError(
                    f"{self.name}: y_{part} labels must be in [0, {self.num_classes}), "
                    f"got range [{y.min()}, {y.max()}]"
                )
        if self.x_train.shape[1] != self.x_test.shape[1]:
            raise DatasetError(
                f"{self.name}: x_train has {self.x_train.shape[1]} features but x_test has {self.x_test.shape[1]}"
            )

    @property
    def features(self) -> int:
        """Number of input features (columns of ``x_train``)."""
        return int(self.x_train.shape[1])


def _describe(a: object) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {list(a.shape)}"
    return type(a).__name__


# --------------------------------------------------------------------------
# scikit-learn digits


def load_digits_dataset(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
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
    return Dataset(x_train, y_train, x_test, y_test, name="digits", num_classes=10)


# --------------------------------------------------------------------------
# IDX / MNIST


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse one IDX file (gzipped or plain) into an array.

    Format (http://yann.lecun.com/exdb/mnist/, "file formats"): two zero
    bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B short, 0x0C int,
    0x0D float, 0x0E double), the number of dimensions, one big-endian uint32
    per dimension, then the payload in row-major, big-endian order. Gzip is
    recognised by its magic bytes, not by the file name.

    Args:
        path: the file.

    Returns:
        Array of shape ``dims`` in native byte order; dtype uint8, int8,
        int16, int32, float32 or float64 per the type code.

    Raises:
        DatasetError: naming the file, if it cannot be read or decompressed,
            the magic bytes or type code are wrong, the header is cut short,
            or the payload length differs from what the dimensions require.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except OSError as e:  # includes gzip.BadGzipFile
        raise DatasetError(f"{path}: cannot read IDX file: {e}") from e
    except (EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: gzip stream is truncated or corrupt: {e}") from e

    if len(raw) < 4:
        raise DatasetError(f"{path}: IDX header needs 4 bytes, file has {len(raw)}")
    if raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path}: bad IDX magic: first two bytes are {raw[:2].hex()}, expected 0000")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DatasetError(
            f"{path}: unknown IDX type code 0x{code:02X} "
            f"(known: {', '.join(f'0x{c:02X}' for c in _IDX_DTYPES)})"
        )
    if ndim == 0:
        raise DatasetError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DatasetError(
            f"{path}: IDX header declares {ndim} dimensions ({header_len} header bytes) "
            f"but the file has only {len(raw)} bytes"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        raise DatasetError(
            f"{path}: IDX dims {list(dims)} of {dtype.name} need {expected} payload bytes, "
            f"file has {actual}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


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
        raise DatasetError(
            f"MNIST directory {directory} does not exist. Point at a directory holding the four "
            "IDX files (train-/t10k-images-idx3-ubyte, train-/t10k-labels-idx1-ubyte, optionally .gz): "
            "`mpnn run MANIFEST --data DIR`, or spec.training.dataset.path; to fetch them, "
            "python -c 'from partition_server.data.datasets import download_mnist; download_mnist(\"DIR\")'")
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
    return Dataset(x_train, y_train, x_test, y_test, name="mnist", num_classes=10)


def download_mnist(directory: str | os.PathLike[str], timeout: float = 60.0) -> list[Path]:
    """Download the four MNIST files into ``directory`` (network access!).

    Only runs when called explicitly; no loader calls it. Each file is
    fetched from the first of :data:`MNIST_MIRRORS` that serves it with the
    expected MD5 (:data:`MNIST_FILES`), written to a temporary file in
    ``directory`` and moved into place with ``os.replace``, so a partial
    download never appears under the real name. Files already present with
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
            _atomic_write(target, data)
            break
        else:
            raise DatasetError(f"could not download {name}: " + "; ".join(errors))
    _atomic_write(directory / "MD5SUMS", "".join(f"{m}  {n}\n" for n, m in MNIST_FILES.items()).encode())
    return paths


def _atomic_write(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------
# npz


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
        return Dataset(arrays["x_train"].astype(np.float32), arrays["y_train"].astype(np.int64),
                       arrays["x_test"].astype(np.float32), arrays["y_test"].astype(np.int64),
                       name=path.stem, num_classes=num_classes)
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}") from e


# --------------------------------------------------------------------------
# dispatch


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
