"""Class-per-folder image trees ``root/<class>/<image>``, and split trees ``root/{train,test}/<class>/<image>``.

Class names are the sorted folder names (the ImageFolder convention: for CIFAR-10's class folders the alphabetical
order is the standard label order). Files are taken in natural order (``2.png`` before ``10.png``), so the order of
the returned arrays is deterministic. Images are decoded with Pillow into ``"L"`` (C=1) or ``"RGB"`` (C=3); every
image must have the size of the first one, unless ``size=(H, W)`` asks for resizing.

A split tree may also be a ``.tar.gz``/``.tgz``/``.tar`` archive (with ``train/`` and ``test/`` at its top or one
folder down). It is decoded straight from the archive stream, without writing tens of thousands of small files to
disk, and the decoded arrays are cached (see :mod:`.archive`), so a second load reads a single ``.npz``.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from cleanbackdoor.data.archive import arrays_path, is_archive, iter_archive_files, load_arrays, save_arrays
from cleanbackdoor.data.imageset import ImageSet, Splits
from cleanbackdoor.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".bmp")
SPLITS = ("train", "test")

_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_CHUNK = 512  # images per decoding task
_PROGRESS_MIN = 20_000  # show a progress bar (on a terminal) only for trees at least this big

# One image to decode: a name for messages, and either a file path or the file's bytes.
Item = tuple[str, "Path | bytes"]


def natural_key(name: str) -> tuple:
    """Sort key putting ``2.png`` before ``10.png``: digit runs compare as numbers."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def check_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``size`` as (H, W), or None (every image must then have the first one's size)."""
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ConfigError(f"size must be (height, width) in pixels, got {size!r}") from None
    if h < 1 or w < 1:
        raise ConfigError(f"size must be positive (height, width), got {size!r}")
    return h, w


def _check_options(channels: int | None, size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if channels not in (None, 1, 3):
        raise ConfigError(f"channels must be 1, 3 or None (decide from the first image), got {channels!r}")
    return check_size(size)


# -- scanning ---------------------------------------------------------------------------------------------------
def scan_class_tree(root: str | Path) -> dict[str, list[Path]]:
    """``{class name: image files}`` of a class-per-folder tree, classes sorted, files in natural order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist" if not root.exists() else f"{root} is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"image folder {root} has no class folders (expected {root}/<class>/<image>)")
    tree: dict[str, list[Path]] = {}
    for d in class_dirs:
        files = [p for p in d.iterdir() if _is_image_name(p.name) and p.is_file()]
        if not files:
            raise DataError(f"class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        tree[d.name] = sorted(files, key=lambda p: natural_key(p.name))
    return tree


def find_split_root(root: str | Path) -> Path | None:
    """The folder holding ``train/`` and ``test/``: ``root`` itself or one of its sub-folders; None if neither."""
    root = Path(root)
    if all((root / s).is_dir() for s in SPLITS):
        return root
    if not root.is_dir():
        return None
    found = sorted(p for p in root.iterdir()
                   if p.is_dir() and not p.name.startswith(".") and all((p / s).is_dir() for s in SPLITS))
    if len(found) > 1:
        raise DataError(f"{root} holds several train/test trees ({', '.join(p.name for p in found)}); "
                        "pass the one to load")
    return found[0] if found else None


def _scan_archive(path: Path) -> tuple[dict[str, dict[str, list[Item]]], str]:
    """``{split: {class: [(name, bytes)]}}`` of the train/test tree in an archive, and the tree's prefix in it."""
    # member parts -> (prefix, split, class, file); folders are recorded to catch empty class folders.
    files: dict[tuple[str, ...], dict[str, dict[str, list[Item]]]] = {}
    folders: dict[tuple[str, ...], dict[str, set[str]]] = {}
    for name, data in iter_archive_files(path):
        parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
        if any(p.startswith(".") for p in parts):
            continue
        if data is None:  # a folder: <prefix>/<split>/<class>/
            if len(parts) >= 2 and parts[-2] in SPLITS and len(parts) <= 3:
                folders.setdefault(parts[:-2], {}).setdefault(parts[-2], set()).add(parts[-1])
            continue
        if len(parts) < 3 or len(parts) > 4 or parts[-3] not in SPLITS or not _is_image_name(parts[-1]):
            continue
        prefix, split, cls = parts[:-3], parts[-3], parts[-2]
        files.setdefault(prefix, {}).setdefault(split, {}).setdefault(cls, []).append((f"{path}:{name}", data))
    candidates = sorted((p for p, splits in files.items() if all(s in splits for s in SPLITS)), key=len)
    if not candidates:
        raise DataError(f"archive {path} holds no train/<class>/<image> and test/<class>/<image> tree "
                        "(at its top or one folder down)")
    prefix = candidates[0]
    trees = files[prefix]
    for split in SPLITS:
        for cls in sorted(folders.get(prefix, {}).get(split, set()) - set(trees[split])):
            where = "/".join((*prefix, split, cls))
            raise DataError(f"class folder {where} in archive {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    out = {}
    for split in SPLITS:
        out[split] = {cls: sorted(items, key=lambda it: natural_key(it[0].rsplit("/", 1)[-1]))
                      for cls, items in sorted(trees[split].items())}
    return out, "/".join(prefix)


# -- decoding ---------------------------------------------------------------------------------------------------
def _open(name: str, source: Path | bytes) -> Image.Image:
    """Open and fully decode one image (``load()`` forces decoding, so truncation is caught here)."""
    img = None
    try:
        img = Image.open(source if isinstance(source, Path) else io.BytesIO(source))
        img.load()
        return img
    except Exception as exc:  # Pillow raises many types for bad files: OSError, SyntaxError, ValueError ...
        if img is not None:
            img.close()
        raise DataError(f"cannot decode image {name}: {exc}") from exc


def _target_mode(img: Image.Image) -> str:
    if img.mode in _GRAY_MODES:
        return "L"
    if img.mode == "P":
        palette = np.asarray(img.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
        used = np.unique(np.asarray(img))
        colours = palette[used[used < len(palette)]]
        return "L" if (colours == colours[:, :1]).all() else "RGB"  # gray when every used entry has R = G = B
    return "RGB"


def _to_array(img: Image.Image, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    if img.mode != mode:
        img = img.convert(mode)
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _decode_one(name: str, source: Path | bytes, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    img = _open(name, source)
    try:
        return _to_array(img, mode, size)
    except Exception as exc:
        raise DataError(f"cannot decode image {name}: {exc}") from exc
    finally:
        img.close()


def decode_images(items: Sequence[Item], channels: int | None = None, size: tuple[int, int] | None = None,
                  desc: str = "decoding") -> np.ndarray:
    """Decode images (paths or bytes) into one uint8 array (N, H, W, C), in order, with a few threads.

    ``channels`` None takes 1 or 3 from the first image. Every image must have the first one's size (unless
    ``size`` resizes them all); the first one that does not, or that cannot be decoded, is named in a DataError.
    """
    if not items:
        raise DataError(f"{desc}: no images to decode")
    first_name, first_source = items[0]
    first = _open(first_name, first_source)
    try:
        mode = {1: "L", 3: "RGB"}.get(channels) or _target_mode(first)
        arr0 = _to_array(first, mode, size)
    finally:
        first.close()
    h, w, c = arr0.shape
    out = np.empty((len(items), h, w, c), dtype=np.uint8)
    out[0] = arr0

    def work(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            name, source = items[i]
            arr = _decode_one(name, source, mode, size)
            if arr.shape[:2] != (h, w):
                raise DataError(f"image {name} is {arr.shape[0]}x{arr.shape[1]} (HxW) but {first_name} is {h}x{w}; "
                                "all images must have one size, or pass size=(H, W) to resize them")
            out[i] = arr

    bounds = [(lo, min(lo + _CHUNK, len(items))) for lo in range(1, len(items), _CHUNK)]
    workers = min(4, os.cpu_count() or 1, len(bounds))
    if workers <= 1:
        for lo, hi in bounds:
            work(lo, hi)
        return out
    progress = None
    if len(items) >= _PROGRESS_MIN:
        from tqdm.auto import tqdm

        progress = tqdm(total=len(items), desc=desc, unit="img", disable=None, leave=False)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(work, lo, hi) for lo, hi in bounds]
        try:
            for (lo, hi), fut in zip(bounds, futures):
                fut.result()  # in order, so the first failure raised is the earliest bad file
                if progress is not None:
                    progress.update(hi - lo)
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
        finally:
            if progress is not None:
                progress.close()
    return out


def _decode_tree(tree: dict[str, list[Item]], channels: int | None, size: tuple[int, int] | None,
                 name: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    classes = tuple(tree)
    items = [item for cls in classes for item in tree[cls]]
    labels = np.concatenate([np.full(len(tree[cls]), k, dtype=np.int64) for k, cls in enumerate(classes)])
    return decode_images(items, channels, size, desc=name), labels, classes


def _check_same_classes(train: Sequence[str], test: Sequence[str], where: str) -> None:
    if tuple(train) != tuple(test):
        only_train = sorted(set(train) - set(test))
        only_test = sorted(set(test) - set(train))
        raise DataError(f"{where}: train and test class folders differ (only in train: {only_train or 'none'}; "
                        f"only in test: {only_test or 'none'})")


# -- public loaders ---------------------------------------------------------------------------------------------
def load_image_folder(root: str | Path, *, channels: int | None = None, size: int | Sequence[int] | None = None,
                      name: str = "") -> ImageSet:
    """Load one class-per-folder tree ``root/<class>/<image>`` into an :class:`ImageSet`.

    Args:
        root: the folder whose sub-folders are the classes (sorted names become the class names).
        channels: 1 (``"L"``), 3 (``"RGB"``) or None to follow the first image (grayscale or palette-gray -> 1).
        size: (H, W) to resize every image to; by default all images must share the first image's size.
        name: the ImageSet's name (default: the folder's name).

    Raises:
        DataError: missing folder, no class folders, a class folder without images, an undecodable image,
            or images of different sizes (naming the first offending file).
    """
    size = _check_options(channels, size)
    root = Path(root).expanduser()
    tree = scan_class_tree(root)
    items = {cls: [(str(p), p) for p in files] for cls, files in tree.items()}
    images, labels, classes = _decode_tree(items, channels, size, name or root.name)
    return ImageSet(images, labels, classes, name or root.name, {"source": str(root), "format": "folder"})


def load_folder_splits(root: str | Path, *, channels: int | None = None, size: int | Sequence[int] | None = None,
                       name: str = "folder") -> Splits:
    """Load ``root/train/<class>/<image>`` and ``root/test/<class>/<image>`` as :class:`Splits`.

    ``root`` is a folder (holding ``train/`` and ``test/``, or one sub-folder that does) or a ``.tar.gz``/``.tgz``/
    ``.tar`` archive of such a tree; an archive's decoded arrays are cached, keyed by the archive and the options.
    The sets are named ``<name>-train`` and ``<name>-test``. Train and test must have the same class folders.
    """
    size = _check_options(channels, size)
    root = Path(root).expanduser()
    if root.is_file() and is_archive(root):
        return _load_archive_splits(root, channels, size, name)
    if not root.exists():
        raise DataError(f"dataset folder {root} does not exist")
    base = find_split_root(root)
    if base is None:
        raise DataError(f"{root} has no train/ and test/ class folders (expected {root}/train/<class>/<image>)")
    _check_same_classes(tuple(scan_class_tree(base / "train")), tuple(scan_class_tree(base / "test")), str(base))
    train = load_image_folder(base / "train", channels=channels, size=size, name=f"{name}-train")
    # The test set follows the training set's channels (when they were decided from the first image).
    test = load_image_folder(base / "test", channels=train.images.shape[-1], size=size, name=f"{name}-test")
    if test.images.shape[1:3] != train.images.shape[1:3]:
        raise DataError(f"test images in {base / 'test'} are {test.images.shape[1]}x{test.images.shape[2]} (HxW) but "
                        f"training images are {train.images.shape[1]}x{train.images.shape[2]}; "
                        "pass size=(H, W) to resize both")
    return Splits(train, test)


def _load_archive_splits(path: Path, channels: int | None, size: tuple[int, int] | None, name: str) -> Splits:
    cached = arrays_path(path, format="folder-splits", channels=channels, size=size)
    arrays = load_arrays(cached)
    if arrays is None:
        trees, prefix = _scan_archive(path)
        _check_same_classes(tuple(trees["train"]), tuple(trees["test"]), str(path))
        train_images, train_labels, classes = _decode_tree(trees["train"], channels, size, f"{name}-train")
        del trees["train"]
        if channels is None:
            channels = train_images.shape[-1]
        test_images, test_labels, _ = _decode_tree(trees["test"], channels, size, f"{name}-test")
        if test_images.shape[1:] != train_images.shape[1:]:
            raise DataError(f"archive {path}: test images are {test_images.shape[1:3]} (HxW) but training images are "
                            f"{train_images.shape[1:3]}; pass size=(H, W) to resize both")
        arrays = {"train_images": train_images, "train_labels": train_labels, "test_images": test_images,
                  "test_labels": test_labels, "class_names": np.array(classes, dtype=str),
                  "prefix": np.array(prefix, dtype=str)}
        try:
            save_arrays(cached, arrays)
        except OSError as exc:  # a read-only cache slows the next load down but must not fail this one
            warnings.warn(f"could not cache the decoded arrays of {path} at {cached}: {exc}", stacklevel=3)
    classes = tuple(str(c) for c in arrays["class_names"])
    meta = {"source": str(path), "format": "folder", "cache": str(cached)}
    return Splits(ImageSet(arrays["train_images"], arrays["train_labels"], classes, f"{name}-train", dict(meta)),
                  ImageSet(arrays["test_images"], arrays["test_labels"], classes, f"{name}-test", dict(meta)))
