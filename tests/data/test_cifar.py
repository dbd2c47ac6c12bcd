"""CIFAR pickles: layout, the restricted unpickler, validation, archives."""

from __future__ import annotations

import builtins
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cleanbackdoor.data import RestrictedUnpickler, load_cifar10, load_cifar100, load_dataset
from cleanbackdoor.data.cifar import CIFAR10_CLASSES, read_batch
from cleanbackdoor.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def dataset_cache(tmp_path, monkeypatch):
    """A fresh dataset cache for each test, and no $CLEANBACKDOOR_DATA."""
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CLEANBACKDOOR_DATA", raising=False)
    return tmp_path / "cache"

PER_BATCH = 4


def batch_data(n: int, offset: int) -> np.ndarray:
    """Rows of 3072 bytes; image i has R=offset+i everywhere, G=10, B=20, and one marked pixel (row 1, col 2)."""
    data = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    data[:, 0] = (offset + np.arange(n))[:, None, None]
    data[:, 1] = 10
    data[:, 2] = 20
    data[:, 1, 1, 2] = 200  # green, row 1, column 2
    return data.reshape(n, 3072)


def write_cifar10(parent: Path, protocol: int = 2) -> Path:
    """A tiny ``cifar-10-batches-py`` pickled as the real one is: dicts with bytes keys."""
    root = parent / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for i in range(1, 6):
        batch = {b"batch_label": f"training batch {i} of 5".encode(),
                 b"labels": [(i + j) % 10 for j in range(PER_BATCH)],
                 b"data": batch_data(PER_BATCH, 10 * i), b"filenames": [b"x.png"] * PER_BATCH}
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=protocol))
    test = {b"batch_label": b"testing batch 1 of 1", b"labels": list(range(PER_BATCH)),
            b"data": batch_data(PER_BATCH, 100)}
    (root / "test_batch").write_bytes(pickle.dumps(test, protocol=protocol))
    meta = {b"label_names": [n.encode() for n in CIFAR10_CLASSES], b"num_cases_per_batch": PER_BATCH, b"num_vis": 3072}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return root


def write_cifar100(parent: Path) -> Path:
    root = parent / "cifar-100-python"
    root.mkdir(parents=True)
    for split, n in (("train", 6), ("test", 3)):
        batch = {"data": batch_data(n, 0), "fine_labels": [j * 17 % 100 for j in range(n)],
                 "coarse_labels": [j % 20 for j in range(n)], "filenames": ["x.png"] * n}  # str keys also work
        (root / split).write_bytes(pickle.dumps(batch, protocol=4))
    meta = {b"fine_label_names": [f"fine{k}".encode() for k in range(100)],
            b"coarse_label_names": [f"coarse{k}".encode() for k in range(20)]}
    (root / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def make_tar(src: Path, target: Path, arcname: str | None = None) -> Path:
    with tarfile.open(target, "w:gz") as tar:
        tar.add(src, arcname=arcname or src.name)
    return target


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_pickle_layout(tmp_path, protocol):
    root = write_cifar10(tmp_path, protocol)
    splits = load_cifar10(root)
    train, test = splits.train, splits.test
    assert train.images.shape == (5 * PER_BATCH, 32, 32, 3) and test.images.shape == (PER_BATCH, 32, 32, 3)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert train.class_names == CIFAR10_CLASSES
    assert train.name == "cifar10-train" and test.name == "cifar10-test"
    # CHW rows -> HWC: the marked green pixel sits at (row 1, col 2, channel 1); the planes are R, G, B.
    assert (train.images[:, 1, 2, 1] == 200).all()
    assert (train.images[:, 0, 0] == np.stack([train.images[:, 0, 0, 0], np.full(20, 10), np.full(20, 20)], 1)).all()
    # batches in order: batch 1's first image has R=10, batch 5's last R=53
    assert train.images[0, 5, 5, 0] == 10 and train.images[-1, 5, 5, 0] == 50 + PER_BATCH - 1
    assert test.images[0, 0, 0, 0] == 100
    assert list(train.labels[:PER_BATCH]) == [1, 2, 3, 4]


def test_cifar10_from_parent_folder_and_catalog(tmp_path):
    write_cifar10(tmp_path)
    a = load_cifar10(tmp_path)
    b = load_dataset("cifar10", root=tmp_path)
    c = load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py")
    assert np.array_equal(a.train.images, b.train.images) and np.array_equal(a.test.labels, c.test.labels)


def test_cifar10_from_tar_gz(tmp_path, dataset_cache):
    root = write_cifar10(tmp_path / "src")
    archive = make_tar(root, tmp_path / "cifar-10-python.tar.gz")
    splits = load_dataset("cifar10", root=archive)
    assert len(splits.train) == 5 * PER_BATCH
    assert np.array_equal(splits.train.images, load_cifar10(root).train.images)
    assert np.array_equal(load_cifar10(archive).test.images, splits.test.images)
    assert any(p.is_dir() for p in (dataset_cache / "datasets").iterdir())


def test_cifar10_missing_meta_uses_standard_names(tmp_path):
    root = write_cifar10(tmp_path)
    (root / "batches.meta").unlink()
    assert load_cifar10(root).train.class_names == CIFAR10_CLASSES


def test_cifar10_missing_batch(tmp_path):
    root = write_cifar10(tmp_path)
    (root / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10(root)


def test_cifar10_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no CIFAR pickle files"):
        load_cifar10(tmp_path)


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Eval:
    def __reduce__(self):
        return (builtins.eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("wrap", [lambda evil: evil, lambda evil: {b"data": evil, b"labels": [0]}])
def test_malicious_pickle_is_refused(tmp_path, wrap):
    root = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    (root / "data_batch_1").write_bytes(pickle.dumps(wrap(_System(f"touch {marker}")), protocol=2))
    with pytest.raises(DataError, match="data_batch_1") as info:
        load_cifar10(root)
    assert "system" in str(info.value) and "refused" in str(info.value)
    assert not marker.exists(), "the pickled command ran"


def test_pickle_calling_eval_is_refused(tmp_path):
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(_Eval()))
    with pytest.raises(DataError, match=r"test_batch.*builtins\.eval"):
        read_batch(path)


def test_restricted_unpickler_reads_plain_data(tmp_path):
    obj = {b"a": [1, 2, "x", b"y"], "arr": np.arange(6, dtype=np.int16).reshape(2, 3)}
    path = tmp_path / "plain"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    with open(path, "rb") as f:
        out = RestrictedUnpickler(f, encoding="bytes").load()
    assert out[b"a"] == [1, 2, "x", b"y"] and np.array_equal(out["arr"], obj["arr"])


@pytest.mark.parametrize("keep", [0, 1, 40, 0.5])
def test_truncated_pickle(tmp_path, keep):
    root = write_cifar10(tmp_path)
    path = root / "data_batch_2"
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(DataError, match="data_batch_2"):
        load_cifar10(root)


@pytest.mark.parametrize("batch, message", [
    ({b"data": np.zeros((3, 3000), np.uint8), b"labels": [0, 1, 2]}, "3072"),
    ({b"data": np.zeros((3, 3072), np.float32), b"labels": [0, 1, 2]}, "uint8"),
    ({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}, "3 images but 2"),
    ({b"data": np.zeros((3, 3072), np.uint8)}, "no 'labels'"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"\[0, 10\)"),
    ([1, 2, 3], "not a CIFAR batch dict"),
])
def test_bad_batch_contents(tmp_path, batch, message):
    root = write_cifar10(tmp_path)
    (root / "data_batch_4").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=message) as info:
        load_cifar10(root)
    assert "data_batch_4" in str(info.value)


@pytest.mark.parametrize("mode, k", [("fine", 100), ("coarse", 20)])
def test_cifar100(tmp_path, mode, k):
    root = write_cifar100(tmp_path)
    splits = load_dataset("cifar100", root=tmp_path, label_mode=mode)
    assert splits.train.num_classes == k and splits.train.class_names[1] == f"{mode}1"
    assert splits.train.images.shape == (6, 32, 32, 3) and len(splits.test) == 3
    assert (splits.train.images[:, 1, 2, 1] == 200).all()
    key = "fine_labels" if mode == "fine" else "coarse_labels"
    assert list(splits.train.labels) == [j * 17 % 100 if mode == "fine" else j % 20 for j in range(6)], key
    assert load_cifar100(make_tar(root, tmp_path / "cifar-100-python.tar.gz"), label_mode=mode).train.num_classes == k


def test_cifar100_bad_label_mode(tmp_path):
    write_cifar100(tmp_path)
    with pytest.raises(ConfigError, match="label_mode.*coarse, fine"):
        load_dataset("cifar100", root=tmp_path, label_mode="medium")
