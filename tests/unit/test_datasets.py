"""Datasets: the Dataset checks, digits, the IDX parser, the MNIST loader and downloader, npz, dispatch."""

import gzip
import hashlib
import io
import shutil
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from partition_server.api import manifest
from partition_server.data import datasets, mnist
from partition_server.data.datasets import (
    Dataset,
    DatasetError,
    download_mnist,
    load_dataset,
    load_digits_dataset,
    load_mnist_idx,
    load_npz,
    read_idx,
)

SHARED_MNIST = Path(__file__).resolve().parents[3] / "shared/datasets/mnist"


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> Path:
    data = idx_bytes(array, code)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_mnist(directory: Path, prefix: str, n: int, seed: int, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    ext = ".gz" if gz else ""
    write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", images)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return images, labels


# ---------------------------------------------------------------- digits


def test_digits_shapes_range_and_determinism():
    a = load_digits_dataset(seed=3)
    assert a.name == "digits" and a.num_classes == 10
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    assert a.x_train.shape[1] == a.x_test.shape[1] == 64
    assert a.x_train.shape[0] + a.x_test.shape[0] == 1797
    assert a.x_test.shape[0] == pytest.approx(1797 * 0.2, abs=1)
    assert 0.0 <= a.x_train.min() and a.x_train.max() == 1.0  # 16/16 occurs
    assert set(np.unique(a.y_train)) == set(range(10))

    b = load_digits_dataset(seed=3)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    c = load_digits_dataset(seed=4)
    assert not np.array_equal(a.y_train, c.y_train)


def test_digits_rejects_bad_test_fraction():
    with pytest.raises(DatasetError, match="test_fraction"):
        load_digits_dataset(test_fraction=1.5)


def test_dataset_validates_fields():
    x = np.zeros((3, 2), np.float32)
    y = np.zeros(3, np.int64)
    with pytest.raises(DatasetError, match="y_test labels"):
        Dataset(x_train=x, y_train=y, x_test=x, y_test=np.array([0, 1, 5], np.int64), name="t", num_classes=3)
    with pytest.raises(DatasetError, match="x_train values"):
        Dataset(x_train=x + 2, y_train=y, x_test=x, y_test=y, name="t", num_classes=1)
    with pytest.raises(DatasetError, match="x_train must be a 2-D float32"):
        Dataset(x_train=x.astype(np.float64), y_train=y, x_test=x, y_test=y, name="t", num_classes=1)


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize(
    "code,array",
    [
        (0x08, np.arange(24, dtype=np.uint8).reshape(2, 3, 4)),
        (0x09, np.array([-128, -1, 0, 127], dtype=np.int8)),
        (0x0B, np.array([[-30000, 2], [3, 30000]], dtype=np.int16)),
        (0x0C, np.array([-(2**31), 7, 2**31 - 1], dtype=np.int32)),
        (0x0D, np.array([[1.5, -2.25]], dtype=np.float32)),
        (0x0E, np.array([np.pi, -1e300], dtype=np.float64)),
    ],
)
def test_read_idx_round_trip(tmp_path, suffix, code, array):
    path = write_idx(tmp_path / f"a.idx{suffix}", array, code)
    out = read_idx(path)
    assert out.dtype == array.dtype and out.dtype.isnative
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def test_read_idx_gzip_detected_by_content(tmp_path):
    path = tmp_path / "plainname"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(5, dtype=np.uint8), 0x08)))
    np.testing.assert_array_equal(read_idx(path), np.arange(5))


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda b: b"\x01" + b[1:], "bad IDX magic"),
        (lambda b: b[:2] + b"\x07" + b[3:], "unknown IDX type code 0x07"),
        (lambda b: b[:-1], "need 24 payload bytes, file has 23"),
        (lambda b: b + b"\x00", "need 24 payload bytes, file has 25"),
        (lambda b: b[:4] + struct.pack(">I", 3) + b[8:], r"dims \[3, 3, 4\]"),
        (lambda b: b[:9], "header declares 3 dimensions"),
        (lambda b: b[:3], "header needs 4 bytes"),
    ],
)
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_rejects_corrupt_files(tmp_path, mutate, message, gz):
    data = mutate(idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 0x08))
    path = tmp_path / ("bad.gz" if gz else "bad")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DatasetError, match=message) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_read_idx_truncated_gzip(tmp_path):
    data = gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8), 0x08))
    path = tmp_path / "cut.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="cut.gz"):
        read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="nope"):
        read_idx(tmp_path / "nope")


# ---------------------------------------------------------------- MNIST loader


def test_mnist_with_train_and_test_files(tmp_path):
    train_images, train_labels = write_mnist(tmp_path, "train", 30, seed=1, gz=True)
    test_images, test_labels = write_mnist(tmp_path, "t10k", 12, seed=2, gz=False)
    ds = load_mnist_idx(tmp_path)
    assert ds.x_train.shape == (30, 784) and ds.x_test.shape == (12, 784)
    np.testing.assert_allclose(ds.x_train, train_images.reshape(30, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train, train_labels)
    np.testing.assert_array_equal(ds.y_test, test_labels)

    small = load_mnist_idx(tmp_path, train_count=5, test_count=3)
    assert small.x_train.shape == (5, 784) and small.y_test.shape == (3,)
    with pytest.raises(DatasetError, match="train_count=31"):
        load_mnist_idx(tmp_path, train_count=31)
    with pytest.raises(DatasetError, match="test_count"):
        load_mnist_idx(tmp_path, test_count=0)


def test_mnist_t10k_only_splits_in_order(tmp_path):
    images, labels = write_mnist(tmp_path, "t10k", 50, seed=5)
    ds = load_mnist_idx(tmp_path)
    assert ds.x_train.shape == (40, 784) and ds.x_test.shape == (10, 784)
    np.testing.assert_array_equal(ds.y_train, labels[:40])
    np.testing.assert_array_equal(ds.y_test, labels[40:])


def test_mnist_count_mismatch_and_missing_files(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (10, 28, 28)).astype(np.uint8))
    with pytest.raises(DatasetError, match="t10k-labels"):
        load_mnist_idx(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(9, np.uint8))
    with pytest.raises(DatasetError, match="10 images but .* 9 labels"):
        load_mnist_idx(tmp_path)
    with pytest.raises(DatasetError, match=r"does not exist: pass --data DIR .*download_mnist"):
        load_mnist_idx(tmp_path / "absent")


def test_mnist_md5_checked_for_synthetic_files(tmp_path):
    write_mnist(tmp_path, "t10k", 20, seed=7)
    names = ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    good = {n: hashlib.md5((tmp_path / n).read_bytes()).hexdigest() for n in names}
    (tmp_path / "MD5SUMS").write_text("".join(f"{good[n]}  {n}\n" for n in names))
    assert load_mnist_idx(tmp_path).x_train.shape == (16, 784)
    (tmp_path / "MD5SUMS").write_text(f"{'0' * 32}  {names[1]}\n")
    with pytest.raises(DatasetError, match="MD5 .* does not match"):
        load_mnist_idx(tmp_path)


needs_shared_mnist = pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"{SHARED_MNIST} not present")


@needs_shared_mnist
def test_real_mnist_t10k_split():
    ds = load_mnist_idx(SHARED_MNIST)  # MD5SUMS in that directory is verified
    assert ds.name == "mnist" and ds.num_classes == 10
    assert ds.x_train.shape == (8000, 784) and ds.x_test.shape == (2000, 784)
    assert ds.y_train.shape == (8000,) and ds.y_test.shape == (2000,)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert set(np.unique(ds.y_train)) == set(range(10))
    assert set(np.unique(ds.y_test)) == set(range(10))
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert 0.0 <= ds.x_test.min() and ds.x_test.max() <= 1.0
    # The first t10k label is a 7 (the well-known first test image).
    assert ds.y_train[0] == 7


@needs_shared_mnist
def test_real_mnist_md5_mismatch_is_caught(tmp_path):
    for f in SHARED_MNIST.iterdir():
        if f.name != "MD5SUMS":
            shutil.copy(f, tmp_path / f.name)
    lines = (SHARED_MNIST / "MD5SUMS").read_text().splitlines()
    digest, name = lines[0].split()
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    (tmp_path / "MD5SUMS").write_text("\n".join([f"{wrong}  {name}", *lines[1:]]) + "\n")
    with pytest.raises(DatasetError, match=name):
        load_mnist_idx(tmp_path)


# ---------------------------------------------------------------- npz and dispatch


def test_npz_round_trip_and_validation(tmp_path):
    rng = np.random.default_rng(0)
    arrays = dict(
        x_train=rng.random((6, 3)), y_train=np.array([0, 1, 2, 0, 1, 2]),
        x_test=rng.random((2, 3)), y_test=np.array([1, 3]),
    )
    np.savez(tmp_path / "toy.npz", **arrays)
    ds = load_npz(tmp_path / "toy.npz")
    assert ds.name == "toy" and ds.num_classes == 4
    assert ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int64
    np.testing.assert_allclose(ds.x_test, arrays["x_test"], rtol=1e-6)

    np.savez(tmp_path / "nc.npz", **arrays, num_classes=np.int64(10))
    assert load_npz(tmp_path / "nc.npz").num_classes == 10

    np.savez(tmp_path / "missing.npz", **{k: v for k, v in arrays.items() if k != "y_test"})
    with pytest.raises(DatasetError, match="missing array.*y_test"):
        load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "rank.npz", **{**arrays, "x_test": np.zeros(2)})
    with pytest.raises(DatasetError, match="x_test must be 2-D"):
        load_npz(tmp_path / "rank.npz")
    np.savez(tmp_path / "rows.npz", **{**arrays, "y_train": np.zeros(5, np.int64)})
    with pytest.raises(DatasetError, match="6 rows but y_train has 5"):
        load_npz(tmp_path / "rows.npz")
    np.savez(tmp_path / "float_labels.npz", **{**arrays, "y_train": np.zeros(6)})
    with pytest.raises(DatasetError, match="y_train must hold integer labels"):
        load_npz(tmp_path / "float_labels.npz")


def test_load_dataset_dispatch(tmp_path):
    assert load_dataset("digits", None).x_train.shape[1] == 64
    write_mnist(tmp_path, "t10k", 10, seed=0)
    assert load_dataset("mnist-idx", str(tmp_path)).x_test.shape == (2, 784)
    with pytest.raises(DatasetError, match="unknown dataset format 'cifar'"):
        load_dataset("cifar", None)
    with pytest.raises(DatasetError, match="'npz' needs a path"):
        load_dataset("npz", None)


def test_dataset_formats_are_the_manifests_and_each_one_loads(tmp_path):
    assert datasets.DATASET_FORMATS is manifest.DATASET_FORMATS  # one definition, in the API
    write_mnist(tmp_path, "t10k", 10, seed=0)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "toy.npz", x_train=rng.random((4, 3)), y_train=np.array([0, 1, 0, 1]),
             x_test=rng.random((2, 3)), y_test=np.array([1, 0]))
    paths = {"digits": None, "mnist-idx": tmp_path, "npz": tmp_path / "toy.npz"}
    assert set(paths) == set(manifest.DATASET_FORMATS)
    for fmt in manifest.DATASET_FORMATS:
        assert isinstance(load_dataset(fmt, paths[fmt]), Dataset)


def test_dataset_fields_are_keyword_only():
    x, y = np.zeros((3, 2), np.float32), np.zeros(3, np.int64)
    with pytest.raises(TypeError):
        Dataset(x, y, x, y, "t", 1)  # four arrays of the same kind: easy to swap


# ---------------------------------------------------------------- download (offline: urlopen is replaced)


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_download_mnist_tries_mirrors_checks_md5_and_writes_atomically(tmp_path, monkeypatch):
    payload = gzip.compress(idx_bytes(np.arange(4, dtype=np.uint8), 0x08))
    good = hashlib.md5(payload).hexdigest()
    monkeypatch.setattr(mnist, "MNIST_FILES", {"t10k-labels-idx1-ubyte.gz": good})
    monkeypatch.setattr(mnist, "MNIST_MIRRORS", ("https://down.example/", "https://up.example/"))
    asked = []

    def urlopen(url, timeout):
        asked.append((url, timeout))
        if url.startswith("https://down.example/"):
            raise urllib.error.URLError("connection refused")
        return _Response(payload)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    target = tmp_path / "mnist"
    assert download_mnist(target, timeout=5.0) == [target / "t10k-labels-idx1-ubyte.gz"]
    assert asked == [("https://down.example/t10k-labels-idx1-ubyte.gz", 5.0),
                     ("https://up.example/t10k-labels-idx1-ubyte.gz", 5.0)]
    assert (target / "t10k-labels-idx1-ubyte.gz").read_bytes() == payload
    assert (target / "MD5SUMS").read_text() == f"{good}  t10k-labels-idx1-ubyte.gz\n"
    assert sorted(p.name for p in target.iterdir()) == ["MD5SUMS", "t10k-labels-idx1-ubyte.gz"]  # no temp files
    # Present with the right MD5: not fetched again.
    asked.clear()
    download_mnist(target)
    assert asked == []

    # Every mirror serves the wrong bytes: nothing appears under the real name.
    monkeypatch.setattr(mnist, "MNIST_FILES", {"t10k-images-idx3-ubyte.gz": "0" * 32})
    with pytest.raises(DatasetError, match="could not download t10k-images-idx3-ubyte.gz: .*down.example.*"
                                           "up.example.*MD5"):
        download_mnist(target)
    assert not (target / "t10k-images-idx3-ubyte.gz").exists()
    assert not [p for p in target.iterdir() if p.name.endswith(".tmp")]
