"""load_dataset: names, options, format detection, $CLEANBACKDOOR_DATA."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cleanbackdoor.data import DATASETS, load_dataset
from cleanbackdoor.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def dataset_cache(tmp_path, monkeypatch):
    """A fresh dataset cache for each test, and no $CLEANBACKDOOR_DATA."""
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CLEANBACKDOOR_DATA", raising=False)
    return tmp_path / "cache"


def write_cifar10(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": np.full((2, 3072), 7, np.uint8), b"labels": [0, 9]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def write_jpg_tree(root: Path, classes=("truck", "airplane", "cat")) -> Path:
    for split in ("train", "test"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(root / split / cls / "0000.jpg")
    return root


def test_names():
    assert set(DATASETS) == {"digits", "mnist", "cifar10", "cifar100", "folder",
                             "voc", "voc2007-coco", "coco", "yolo", "digits-mosaic", "mnist-mosaic", "cifar10-mosaic"}
    with pytest.raises(ConfigError,
                       match=r"unknown dataset 'imagenet'; allowed: cifar10, cifar10-mosaic, cifar100, coco, digits"):
        load_dataset("imagenet")


def test_unknown_option(tmp_path):
    with pytest.raises(ConfigError, match="no option 'label_mode'"):
        load_dataset("cifar10", root=tmp_path, label_mode="fine")
    with pytest.raises(ConfigError, match="no option 'colour'"):
        load_dataset("folder", root=tmp_path, colour=True)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "folder"])
def test_root_needed(name):
    with pytest.raises(ConfigError, match="needs a root") as info:
        load_dataset(name)
    if name != "folder":
        assert "CLEANBACKDOOR_DATA" in str(info.value)


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("cifar10", root=tmp_path / "absent")


def test_env_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEANBACKDOOR_DATA", str(tmp_path))
    with pytest.raises(ConfigError, match="cifar-10-batches-py.*CLEANBACKDOOR_DATA"):
        load_dataset("cifar10")
    write_cifar10(tmp_path / "cifar-10-batches-py")
    splits = load_dataset("cifar10")
    assert len(splits.train) == 10 and splits.train.meta["format"] == "cifar-pickle"


def test_cifar10_jpg_tree_detected(tmp_path):
    root = write_jpg_tree(tmp_path / "cifar10-jpg")
    for where in (root, tmp_path):
        splits = load_dataset("cifar10", root=where)
        assert splits.train.class_names == ("airplane", "cat", "truck")
        assert splits.train.images.shape == (3, 32, 32, 3) and splits.train.name == "cifar10-train"


def test_unrecognized_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither CIFAR-10 pickles"):
        load_dataset("cifar10", root=tmp_path / "empty")
    with pytest.raises(DataError, match="neither MNIST IDX files"):
        load_dataset("mnist", root=tmp_path / "empty")
    with pytest.raises(DataError, match="no CIFAR pickle files"):
        load_dataset("cifar100", root=tmp_path / "empty")


def test_mnist_png_tree_with_csv_files(tmp_path):
    root = tmp_path / "mnist-png"
    for split in ("train", "test"):
        for digit in range(10):
            (root / split / str(digit)).mkdir(parents=True)
            Image.fromarray(np.full((28, 28), digit, np.uint8)).save(root / split / str(digit) / "3.png")
        (root / f"{split}.csv").write_text("filepath,label\n")
    splits = load_dataset("mnist", root=root)
    assert splits.train.images.shape == (10, 28, 28, 1) and list(splits.train.labels) == list(range(10))
    assert splits.test.class_names == tuple("0123456789")


def test_source_fingerprint_follows_the_files_not_how_the_root_is_written(tmp_path, monkeypatch):
    """Cache keys (pretrained extractors, clean models) name the source data by this hash: the same archive
    named by a relative path, an absolute path, a link or $CLEANBACKDOOR_DATA is one source; other bytes another."""
    from cleanbackdoor.data import source_fingerprint

    root = write_cifar10(tmp_path / "data" / "cifar-10-batches-py")
    absolute = source_fingerprint("cifar10", root)
    monkeypatch.chdir(tmp_path)
    assert source_fingerprint("cifar10", "data/cifar-10-batches-py") == absolute
    assert source_fingerprint("cifar10-mosaic", "./data/../data/cifar-10-batches-py") == absolute
    (tmp_path / "link").symlink_to(root)
    assert source_fingerprint("cifar10", tmp_path / "link") == absolute
    monkeypatch.setenv("CLEANBACKDOOR_DATA", str(tmp_path / "data"))
    assert source_fingerprint("cifar10") == absolute
    (root / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}))
    assert source_fingerprint("cifar10", root) != absolute  # other bytes
    tar = tmp_path / "a.tar"
    tar.write_bytes(b"archive bytes")
    copy = tmp_path / "copy.tar"
    copy.write_bytes(b"archive bytes")
    assert source_fingerprint("cifar10", tar) == source_fingerprint("cifar10", copy)
    assert source_fingerprint("digits") is None and source_fingerprint("digits-mosaic", "anything") is None
    with pytest.raises(DataError, match="does not exist"):
        source_fingerprint("cifar10", tmp_path / "absent")
    with pytest.raises(ConfigError, match="unknown dataset"):
        source_fingerprint("imagenet")
