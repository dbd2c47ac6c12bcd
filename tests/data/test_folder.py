"""Class-per-folder image trees: decoding, ordering, channels, sizes, and every way a tree can be bad."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cleanbackdoor.data import load_dataset, load_folder_splits, load_image_folder
from cleanbackdoor.data.folder import natural_key
from cleanbackdoor.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def dataset_cache(tmp_path, monkeypatch):
    """A fresh dataset cache for each test, and no $CLEANBACKDOOR_DATA."""
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CLEANBACKDOOR_DATA", raising=False)
    return tmp_path / "cache"


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)
    return path


def gray(value: int, h: int = 6, w: int = 5) -> np.ndarray:
    return np.full((h, w), value, dtype=np.uint8)


def rgb(value: int, h: int = 6, w: int = 5) -> np.ndarray:
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = value, 255 - value, 7
    return img


def write_tree(root: Path, classes=("cat", "ant", "dog"), stems=(10, 2, 1), make=gray, ext=".png") -> Path:
    """Image value = 10 * class position (in the order given) + stem, so the order can be read back."""
    for k, cls in enumerate(classes):
        for stem in stems:
            save(root / cls / f"{stem}{ext}", make(10 * k + stem))
    return root


def test_grayscale_tree(tmp_path):
    s = load_image_folder(write_tree(tmp_path / "tree"))
    assert s.images.shape == (9, 6, 5, 1) and s.images.dtype == np.uint8
    assert s.class_names == ("ant", "cat", "dog")  # sorted folder names
    assert list(s.labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # natural order inside a class: 1, 2, 10; "ant" was written second (k=1), "cat" first (k=0)
    assert list(s.images[:, 0, 0, 0]) == [11, 12, 20, 1, 2, 10, 21, 22, 30]
    assert s.name == "tree"


def test_rgb_tree_and_forced_channels(tmp_path):
    root = write_tree(tmp_path / "tree", make=rgb, ext=".bmp")
    s = load_image_folder(root)
    assert s.images.shape == (9, 6, 5, 3)
    assert tuple(s.images[0, 0, 0]) == (11, 244, 7)
    g = load_image_folder(root, channels=1)
    assert g.images.shape == (9, 6, 5, 1)
    c3 = load_image_folder(write_tree(tmp_path / "gray"), channels=3)
    assert c3.images.shape == (9, 6, 5, 3) and (c3.images[..., 0] == c3.images[..., 2]).all()


@pytest.mark.parametrize("ext", [".png", ".jpg", ".jpeg", ".ppm", ".bmp"])
def test_extensions(tmp_path, ext):
    s = load_image_folder(write_tree(tmp_path / "t", make=rgb, ext=ext))
    assert s.images.shape == (9, 6, 5, 3)


@pytest.mark.parametrize("palette, channels", [([v for i in range(256) for v in (i, i, i)], 1),
                                                ([v for i in range(256) for v in (i, 0, 255 - i)], 3)])
def test_palette_images(tmp_path, palette, channels):
    root = tmp_path / "tree"
    for cls in ("a", "b"):
        img = Image.frombytes("P", (5, 6), np.arange(30, dtype=np.uint8).tobytes())
        img.putpalette(palette)
        (root / cls).mkdir(parents=True)
        img.save(root / cls / "1.png")
    s = load_image_folder(root)
    assert s.images.shape == (2, 6, 5, channels)
    if channels == 3:
        assert tuple(s.images[0, 0, 1]) == (1, 0, 254)


def test_other_files_and_hidden_entries_are_ignored(tmp_path):
    root = write_tree(tmp_path / "tree")
    (root / "notes.txt").write_text("not a class")
    (root / "cat" / "labels.csv").write_text("x")
    (root / "cat" / ".hidden.png").write_bytes(b"junk")
    (root / ".cache").mkdir()
    assert len(load_image_folder(root)) == 9


def test_natural_key():
    names = ["10.png", "2.png", "1.png", "a10.png", "a9.png", "B.png"]
    assert sorted(names, key=natural_key) == ["1.png", "2.png", "10.png", "a9.png", "a10.png", "B.png"]


@pytest.mark.parametrize("corrupt", ["random", "truncated", "empty"])
def test_corrupt_image_is_named(tmp_path, corrupt):
    root = write_tree(tmp_path / "tree")
    bad = root / "dog" / "5.png"
    if corrupt == "random":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    elif corrupt == "truncated":
        noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        save(tmp_path / "full.png", noise)
        raw = (tmp_path / "full.png").read_bytes()
        bad.write_bytes(raw[: len(raw) // 2])
    else:
        bad.write_bytes(b"")
    with pytest.raises(DataError, match="5.png"):
        load_image_folder(root)


def test_mixed_sizes_name_the_first_offender_and_size_resizes(tmp_path):
    root = write_tree(tmp_path / "tree")
    save(root / "cat" / "50.png", gray(1, 8, 8))
    save(root / "dog" / "3.png", gray(1, 9, 9))
    with pytest.raises(DataError, match=r"cat/50\.png.*8x8"):
        load_image_folder(root)
    s = load_image_folder(root, size=(4, 3))
    assert s.images.shape == (11, 4, 3, 1)


def test_many_images_use_threads_in_order(tmp_path):
    root = tmp_path / "tree"
    for cls in ("a", "b"):
        for i in range(700):
            save(root / cls / f"{i}.png", np.full((2, 2), i % 256, np.uint8))
    s = load_image_folder(root)
    assert len(s) == 1400 and list(s.images[:700, 0, 0, 0]) == [i % 256 for i in range(700)]


def test_first_bad_file_is_reported_among_many(tmp_path):
    root = tmp_path / "tree"
    for cls in ("a", "b"):
        for i in range(700):
            save(root / cls / f"{i}.png", np.zeros((2, 2), np.uint8))
    (root / "b" / "650.png").write_bytes(b"bad")
    (root / "a" / "600.png").write_bytes(b"bad")
    with pytest.raises(DataError, match=r"a/600\.png"):
        load_image_folder(root)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    save(tmp_path / "flat" / "1.png", gray(0))
    with pytest.raises(DataError, match="no class folders"):
        load_image_folder(tmp_path / "flat")
    root = write_tree(tmp_path / "tree")
    (root / "eel").mkdir()
    (root / "eel" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"eel.*holds no images"):
        load_image_folder(root)


@pytest.mark.parametrize("options", [{"channels": 2}, {"size": (0, 4)}, {"size": "big"}])
def test_bad_options(tmp_path, options):
    with pytest.raises(ConfigError):
        load_image_folder(write_tree(tmp_path / "t"), **options)


def test_split_tree(tmp_path):
    root = tmp_path / "data" / "inner"
    write_tree(root / "train", make=rgb)
    write_tree(root / "test", stems=(4,), make=rgb)
    (tmp_path / "data" / "train.csv").write_text("filepath,label\n")
    for where in (root, tmp_path / "data"):  # the tree, or a folder holding it one level down
        splits = load_folder_splits(where, name="toy")
        assert splits.train.images.shape == (9, 6, 5, 3) and splits.test.images.shape == (3, 6, 5, 3)
        assert splits.train.name == "toy-train" and splits.test.name == "toy-test"
        assert splits.test.class_names == ("ant", "cat", "dog")
    s = load_dataset("folder", root=root, channels=1, size=(3, 3))
    assert s.train.images.shape == (9, 3, 3, 1) and s.test.images.shape == (3, 3, 3, 1)


def test_split_tree_problems(tmp_path):
    with pytest.raises(DataError, match="no train/ and test/"):
        load_folder_splits(write_tree(tmp_path / "plain"))
    with pytest.raises(DataError, match="does not exist"):
        load_folder_splits(tmp_path / "nowhere")
    root = tmp_path / "split"
    write_tree(root / "train")
    write_tree(root / "test", classes=("cat", "ant", "emu"))
    with pytest.raises(DataError, match=r"only in train: \['dog'\].*only in test: \['emu'\]"):
        load_folder_splits(root)
    other = tmp_path / "sizes"
    write_tree(other / "train")
    for cls in ("cat", "ant", "dog"):
        save(other / "test" / cls / "1.png", gray(0, 7, 7))
    with pytest.raises(DataError, match="test images"):
        load_folder_splits(other)
    assert load_folder_splits(other, size=(7, 7)).test.images.shape == (3, 7, 7, 1)
