"""MNIST IDX files: header parsing, gzip, validation."""

from __future__ import annotations

import gzip
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cleanbackdoor.data import load_dataset, load_mnist_idx, read_idx
from cleanbackdoor.errors import DataError


@pytest.fixture(autouse=True)
def dataset_cache(tmp_path, monkeypatch):
    """A fresh dataset cache for each test, and no $CLEANBACKDOOR_DATA."""
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CLEANBACKDOOR_DATA", raising=False)
    return tmp_path / "cache"


CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
         np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    dtype = array.dtype if array.dtype.itemsize == 1 else array.dtype.newbyteorder(">")
    header = bytes([0, 0, CODES[dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(dtype).tobytes()


def write(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def write_mnist(folder: Path, gz: bool = False, dot_names: bool = False) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {"train-images": rng.integers(0, 256, (6, 4, 3), dtype=np.uint8),
              "train-labels": np.array([0, 1, 2, 3, 9, 9], np.uint8),
              "t10k-images": rng.integers(0, 256, (3, 4, 3), dtype=np.uint8),
              "t10k-labels": np.array([5, 6, 7], np.uint8)}
    for stem, array in arrays.items():
        idx = "idx3" if "images" in stem else "idx1"
        name = f"{stem}.{idx}-ubyte" if dot_names else f"{stem}-{idx}-ubyte"
        write(folder / (name + (".gz" if gz else "")), array)
    return arrays


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_types(tmp_path, dtype):
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    out = read_idx(write(tmp_path / "x-idx3-ubyte", array))
    assert out.shape == (2, 3, 4) and np.array_equal(out, array) and out.dtype.isnative


@pytest.mark.parametrize("gz, dot_names", [(False, False), (True, False), (False, True)])
def test_load_mnist_idx(tmp_path, gz, dot_names):
    arrays = write_mnist(tmp_path / "mnist", gz=gz, dot_names=dot_names)
    splits = load_mnist_idx(tmp_path / "mnist")
    assert splits.train.images.shape == (6, 4, 3, 1) and splits.test.images.shape == (3, 4, 3, 1)
    assert np.array_equal(splits.train.images[..., 0], arrays["train-images"])
    assert splits.train.labels.dtype == np.int64 and list(splits.test.labels) == [5, 6, 7]
    assert splits.train.class_names == tuple("0123456789") and splits.train.name == "mnist-train"


def test_mnist_idx_through_catalog(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw")
    assert len(load_dataset("mnist", root=tmp_path).train) == 6


@pytest.mark.parametrize("cut", [0, 3, 6, 20, -1])
def test_truncated_idx(tmp_path, cut):
    raw = idx_bytes(np.zeros((2, 4, 4), np.uint8))
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(raw[:cut])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        read_idx(path)


@pytest.mark.parametrize("raw, message", [
    (b"\x01\x00\x08\x01\x00\x00\x00\x01\x00", "not an IDX file"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "not an IDX file"),
    (b"\x00\x00\x08\x00", "not an IDX file"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x01\x00\x00", "bytes after the data"),
])
def test_garbled_idx(tmp_path, raw, message):
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=message):
        read_idx(path)


def test_truncated_gzip(tmp_path):
    path = write(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(1000, np.uint8))
    path.write_bytes(path.read_bytes()[:15])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        read_idx(path)


def test_mismatched_counts_and_missing_files(tmp_path):
    write_mnist(tmp_path)
    write(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2], np.uint8))
    with pytest.raises(DataError, match="2 labels for the 3 images"):
        load_mnist_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="lacks the MNIST IDX files"):
        load_mnist_idx(tmp_path)


def test_mnist_idx_archive_through_catalog(tmp_path):
    write_mnist(tmp_path / "src" / "mnist", gz=True)
    archive = tmp_path / "mnist.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "mnist", arcname="mnist")
    splits = load_dataset("mnist", root=archive)
    assert splits.train.images.shape == (6, 4, 3, 1) and list(splits.test.labels) == [5, 6, 7]
