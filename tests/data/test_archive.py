"""Archives: safe, atomic, cached extraction; image trees decoded from archives and cached as arrays."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cleanbackdoor.data import extract_archive, load_dataset, load_folder_splits
from cleanbackdoor.data import folder as folder_mod
from cleanbackdoor.errors import DataError


@pytest.fixture(autouse=True)
def dataset_cache(tmp_path, monkeypatch):
    """A fresh dataset cache for each test, and no $CLEANBACKDOOR_DATA."""
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CLEANBACKDOOR_DATA", raising=False)
    return tmp_path / "cache"


def png_bytes(value: int, size=(4, 4), mode="RGB") -> bytes:
    buf = io.BytesIO()
    shape = (*size, 3) if mode == "RGB" else size
    Image.fromarray(np.full(shape, value, np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    tar.addfile(info)


def tree_archive(path: Path, prefix: str = "", classes=("b", "a"), per_class=3, extra=None) -> Path:
    """train/<class>/<i>.png and test/<class>/<i>.png; value = 50 * class + i (+ 100 for test)."""
    with tarfile.open(path, "w:gz") as tar:
        add_bytes(tar, f"{prefix}README.md", b"hello")
        for split, offset in (("train", 0), ("test", 100)):
            add_dir(tar, f"{prefix}{split}/")
            for k, cls in enumerate(classes):
                add_dir(tar, f"{prefix}{split}/{cls}/")
                for i in (10, 2, 1)[:per_class]:
                    add_bytes(tar, f"{prefix}{split}/{cls}/{i}.png", png_bytes(offset + 20 * k + i))
        for name, data in (extra or {}).items():
            if data is None:
                add_dir(tar, name)
            else:
                add_bytes(tar, name, data)
    return path


def test_extract_is_cached_and_reused(tmp_path, dataset_cache, monkeypatch):
    src = tmp_path / "src"
    (src / "inner").mkdir(parents=True)
    (src / "inner" / "f.txt").write_text("content")
    archive = tmp_path / "thing.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "inner", arcname="inner")
    first = extract_archive(archive)
    assert first.parent == dataset_cache / "datasets" and first.name.startswith("thing-")
    assert (first / "inner" / "f.txt").read_text() == "content"

    def no_open(*args, **kwargs):
        raise AssertionError("the archive was read again")

    monkeypatch.setattr(tarfile, "open", no_open)
    assert extract_archive(archive) == first
    monkeypatch.undo()
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(dataset_cache))
    # the entry follows the archive's bytes: a copy elsewhere, with a fresh modification time, finds it ...
    copy = tmp_path / "elsewhere" / "thing.tgz"
    copy.parent.mkdir()
    shutil.copyfile(archive, copy)
    os.utime(copy, ns=(1, 1))
    monkeypatch.setattr(tarfile, "open", no_open)
    assert extract_archive(copy) == first
    monkeypatch.undo()
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(dataset_cache))
    # ... and an archive whose content changed gets a new entry
    (src / "inner" / "f.txt").write_text("other content")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "inner", arcname="inner")
    second = extract_archive(archive)
    assert second != first and (second / "inner" / "f.txt").read_text() == "other content"
    assert not [p for p in second.parent.iterdir() if "partial" in p.name]


def test_interrupted_extraction_is_not_taken_as_complete(tmp_path, dataset_cache, monkeypatch):
    archive = tree_archive(tmp_path / "t.tar.gz")
    real = tarfile.TarFile.extractall

    def interrupted(self, path, *args, **kwargs):
        (Path(path) / "half-written").write_text("x")
        raise KeyboardInterrupt

    monkeypatch.setattr(tarfile.TarFile, "extractall", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_archive(archive)
    assert not list((dataset_cache / "datasets").iterdir()), "nothing, not even the partial folder, is left"
    monkeypatch.setattr(tarfile.TarFile, "extractall", real)
    out = extract_archive(archive)
    assert (out / "train" / "a" / "1.png").is_file() and not (out / "half-written").exists()


def test_corrupt_archive(tmp_path, dataset_cache):
    archive = tree_archive(tmp_path / "t.tar.gz")
    archive.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(DataError, match=r"t\.tar\.gz"):
        extract_archive(archive)
    assert not list((dataset_cache / "datasets").iterdir())
    with pytest.raises(DataError, match=r"t\.tar\.gz"):
        load_folder_splits(archive)
    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive at all")
    with pytest.raises(DataError, match="junk.tar.gz"):
        extract_archive(tmp_path / "junk.tar.gz")
    with pytest.raises(DataError, match="does not exist"):
        extract_archive(tmp_path / "absent.tar.gz")


@pytest.mark.parametrize("member", ["../escape.txt", "link"])
def test_unsafe_members_are_refused(tmp_path, member):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        if member == "link":
            info = tarfile.TarInfo("link")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        else:
            add_bytes(tar, member, b"x")
    with pytest.raises(DataError, match="evil.tar.*unsafe"):
        extract_archive(archive)
    assert not (tmp_path / "escape.txt").exists()


def test_absolute_member_stays_inside(tmp_path):
    archive = tmp_path / "abs.tar"
    with tarfile.open(archive, "w") as tar:
        add_bytes(tar, "/cleanbackdoor-abs-test.txt", b"x")
    out = extract_archive(archive)
    assert (out / "cleanbackdoor-abs-test.txt").is_file() and not Path("/cleanbackdoor-abs-test.txt").exists()


@pytest.mark.parametrize("prefix", ["", "top/"])
def test_tree_archive_decoded_once_then_cached(tmp_path, dataset_cache, monkeypatch, prefix):
    archive = tree_archive(tmp_path / "toy.tar.gz", prefix)
    splits = load_folder_splits(archive, name="toy")
    assert splits.train.class_names == ("a", "b")
    assert splits.train.images.shape == (6, 4, 4, 3) and splits.test.images.shape == (6, 4, 4, 3)
    assert list(splits.train.images[:, 0, 0, 0]) == [21, 22, 30, 1, 2, 10]  # natural order, sorted classes
    assert list(splits.test.images[:, 0, 0, 0]) == [121, 122, 130, 101, 102, 110]
    assert splits.train.name == "toy-train"
    assert len(list((dataset_cache / "datasets").glob("toy-*.npz"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(folder_mod, "_open", no_decoding)
    monkeypatch.setattr(folder_mod, "iter_archive_files", no_decoding)
    again = load_folder_splits(archive, name="toy")
    assert np.array_equal(again.train.images, splits.train.images)
    assert np.array_equal(again.test.labels, splits.test.labels) and again.test.class_names == ("a", "b")
    with pytest.raises(AssertionError, match="decoded again"):  # other options are another cache entry
        load_folder_splits(archive, name="toy", size=(2, 2))


def test_unreadable_cache_is_rebuilt(tmp_path, dataset_cache):
    archive = tree_archive(tmp_path / "toy.tar.gz")
    first = load_folder_splits(archive)
    (cached,) = (dataset_cache / "datasets").glob("*.npz")
    cached.write_bytes(b"garbage")
    assert np.array_equal(load_folder_splits(archive).train.images, first.train.images)


def test_tree_archive_problems(tmp_path):
    bad = tree_archive(tmp_path / "bad.tar.gz", extra={"test/a/5.png": b"not a png"})
    with pytest.raises(DataError, match=r"bad\.tar\.gz:test/a/5\.png"):
        load_folder_splits(bad)
    empty = tree_archive(tmp_path / "empty.tar.gz", extra={"train/c/": None})
    with pytest.raises(DataError, match="train/c.*holds no images"):
        load_folder_splits(empty)
    uneven = tree_archive(tmp_path / "uneven.tar.gz", extra={"train/c/1.png": png_bytes(0)})
    with pytest.raises(DataError, match=r"only in train: \['c'\]"):
        load_folder_splits(uneven)
    sizes = tree_archive(tmp_path / "sizes.tar.gz", extra={"train/a/50.png": png_bytes(0, (5, 5))})
    with pytest.raises(DataError, match=r"train/a/50\.png.*5x5"):
        load_folder_splits(sizes)
    with tarfile.open(tmp_path / "flat.tar.gz", "w:gz") as tar:
        add_bytes(tar, "x/1.png", png_bytes(0))
    with pytest.raises(DataError, match="no train/<class>/<image>"):
        load_folder_splits(tmp_path / "flat.tar.gz")


def test_grayscale_tree_archive_through_catalog(tmp_path):
    archive = tmp_path / "digits-png.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("train", "test"):
            for cls in ("0", "1"):
                add_bytes(tar, f"mnist_png/{split}/{cls}/7.png", png_bytes(int(cls) * 9, (28, 28), "L"))
        add_bytes(tar, "mnist_png/train.csv", b"filepath,label\n")
    splits = load_dataset("mnist", root=archive)
    assert splits.train.images.shape == (2, 28, 28, 1) and splits.train.name == "mnist-train"
    folder = load_dataset("folder", root=archive, channels=3)
    assert folder.train.images.shape == (2, 28, 28, 3) and folder.train.name == "folder-train"
