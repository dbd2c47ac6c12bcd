"""The dataset catalog: a name (``digits``, ``mnist``, ``cifar10``, ``cifar100``, ``folder``) -> train/test splits.

:func:`load_dataset` is what configs and the CLI call. It finds the data (the ``root`` given, or the usual file
names in ``$CLEANBACKDOOR_DATA``), recognizes its format (pickled CIFAR batches, IDX files, a class-per-folder
tree, or a tar archive of any of these) and hands it to the loader for that format. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from cleanbackdoor.data.archive import extract_archive, file_hash, is_archive, peek_archive
from cleanbackdoor.data.cifar import CIFAR10_DIR, CIFAR100_DIR, load_cifar10, load_cifar100
from cleanbackdoor.data.coco import load_coco_splits
from cleanbackdoor.data.digits import load_digits
from cleanbackdoor.data.folder import IMAGE_SUFFIXES, SPLITS, find_split_root, load_folder_splits
from cleanbackdoor.data.idx import find_idx_files, load_mnist_idx
from cleanbackdoor.data.imageset import Splits
from cleanbackdoor.data.mosaic import mosaic_options, mosaic_splits
from cleanbackdoor.data.voc import load_voc_splits
from cleanbackdoor.data.yolo import load_yolo_splits
from cleanbackdoor.errors import ConfigError, DataError, unknown_name

DATA_ENV = "CLEANBACKDOOR_DATA"

# Where to look in $CLEANBACKDOOR_DATA when no root is given, best first (lossless formats before JPEG).
SEARCH_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": ("mnist", "MNIST", "mnist-png", "mnist-png.tar.gz", "mnist.tar.gz"),
    "cifar10": (CIFAR10_DIR, "cifar-10-python.tar.gz", "cifar10-jpg", "cifar10-jpg.tar.gz", "cifar10"),
    "cifar100": (CIFAR100_DIR, "cifar-100-python.tar.gz", "cifar100"),
    "voc2007-coco": ("voc2007-coco-128", "voc2007-coco-128.tar.gz"),
}


def _resolve_root(name: str, root: str | Path | None) -> Path:
    if root is not None:
        path = Path(root).expanduser()
        if not path.exists():
            raise DataError(f"dataset {name!r}: root {path} does not exist")
        return path
    names = SEARCH_NAMES.get(name, ())
    env = os.environ.get(DATA_ENV)
    if env and names:
        for candidate in names:
            if (Path(env).expanduser() / candidate).exists():
                return Path(env).expanduser() / candidate
        raise ConfigError(f"dataset {name!r}: none of {', '.join(names)} is in {DATA_ENV}={env}; "
                          "pass a root (a folder or an archive)")
    where = f", or set {DATA_ENV} to a folder holding one of: {', '.join(names)}" if names else ""
    raise ConfigError(f"dataset {name!r} needs a root: pass root= (a folder or an archive){where}")


def _archive_format(path: Path, pickle_markers: tuple[str, ...] = ()) -> str:
    """``"pickle"``, ``"idx"`` or ``"tree"``, from the first files of an archive (read only that far)."""
    for member in peek_archive(path):
        parts = PurePosixPath(member).parts
        base = parts[-1] if parts else ""
        if base in pickle_markers:
            return "pickle"
        if "idx1-ubyte" in base or "idx3-ubyte" in base:
            return "idx"
        if len(parts) >= 3 and parts[-3] in SPLITS and base.lower().endswith(IMAGE_SUFFIXES):
            return "tree"
    raise DataError(f"archive {path} holds neither a known dataset format nor a train/<class>/<image> tree")


def _check_options(name: str, options: dict, allowed: tuple[str, ...]) -> None:
    for key in options:
        if key not in allowed:
            raise ConfigError(f"dataset {name!r} takes no option {key!r}; allowed: {', '.join(allowed) or 'none'}")


# -- one loader per catalog name --------------------------------------------------------------------------------
def _digits(root: str | Path | None = None, **options) -> Splits:
    if root is not None:
        raise ConfigError("dataset 'digits' ships with scikit-learn and takes no root")
    _check_options("digits", options, ("test_fraction", "seed"))
    return load_digits(**options)


def _mnist(root: str | Path | None = None, **options) -> Splits:
    _check_options("mnist", options, ())
    path = _resolve_root("mnist", root)
    if path.is_file() and is_archive(path):
        if _archive_format(path) == "tree":
            return load_folder_splits(path, channels=1, name="mnist")
        extracted = extract_archive(path)
        inner = [extracted, *(p for p in sorted(extracted.iterdir()) if p.is_dir())]
        for folder in inner:
            if find_idx_files(folder) is not None:
                return load_mnist_idx(folder)
        raise DataError(f"archive {path} holds no complete set of MNIST IDX files")
    if path.is_dir() and find_idx_files(path) is not None:
        return load_mnist_idx(path)
    if find_split_root(path) is not None:
        return load_folder_splits(path, channels=1, name="mnist")
    raise DataError(f"{path} holds neither MNIST IDX files (train-images-idx3-ubyte ...) nor train/ and test/ "
                    "class folders")


def _cifar10(root: str | Path | None = None, **options) -> Splits:
    _check_options("cifar10", options, ())
    path = _resolve_root("cifar10", root)
    if path.is_file() and is_archive(path):
        markers = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                   "batches.meta")
        if _archive_format(path, markers) == "tree":
            return load_folder_splits(path, channels=3, name="cifar10")
        extracted = extract_archive(path)
        inner = [extracted, *(p for p in sorted(extracted.iterdir()) if p.is_dir())]
        for folder in inner:
            if (folder / "data_batch_1").is_file():
                return load_cifar10(folder)
        raise DataError(f"archive {path} holds no {CIFAR10_DIR}/data_batch_1")
    if path.is_dir() and ((path / "data_batch_1").is_file() or (path / CIFAR10_DIR).is_dir()):
        return load_cifar10(path)
    if find_split_root(path) is not None:
        return load_folder_splits(path, channels=3, name="cifar10")
    raise DataError(f"{path} holds neither CIFAR-10 pickles ({CIFAR10_DIR}/data_batch_1 ...) nor train/ and test/ "
                    "class folders")


def _cifar100(root: str | Path | None = None, **options) -> Splits:
    _check_options("cifar100", options, ("label_mode",))
    return load_cifar100(_resolve_root("cifar100", root), **options)


def _folder(root: str | Path | None = None, **options) -> Splits:
    _check_options("folder", options, ("channels", "size"))
    if root is None:
        raise ConfigError("dataset 'folder' needs a root: a folder (or archive) with train/<class>/ and test/<class>/")
    path = _resolve_root("folder", root)
    return load_folder_splits(path, name="folder", **options)


def _voc(root: str | Path | None = None, **options) -> Splits:
    _check_options("voc", options, ("train", "test", "size", "keep_difficult"))
    return load_voc_splits(_resolve_root("voc", root), **options)


def _coco(root: str | Path | None = None, **options) -> Splits:
    _check_options("coco", options, ("train", "test", "size", "keep_empty"))
    return load_coco_splits(_resolve_root("coco", root), **options)


def _voc2007_coco(root: str | Path | None = None, **options) -> Splits:
    """PASCAL VOC 2007 re-exported in COCO format (the workplace's ``voc2007-coco-128.tar.gz``): the ``coco`` loader
    with its split names found and the photos resized to 64x64 unless ``size`` says otherwise."""
    _check_options("voc2007-coco", options, ("train", "test", "size", "keep_empty"))
    return load_coco_splits(_resolve_root("voc2007-coco", root), **{"size": (64, 64), **options})


def _yolo(root: str | Path | None = None, **options) -> Splits:
    _check_options("yolo", options, ("train", "test", "test_fraction", "seed", "classes", "num_classes", "size",
                                     "keep_empty"))
    return load_yolo_splits(_resolve_root("yolo", root), **options)


def _mosaic(source: str) -> Callable[..., Splits]:
    """A composed multi-label set: mosaics of ``source``'s images (options: :class:`.mosaic.MosaicOptions`)."""

    def load(root: str | Path | None = None, **options) -> Splits:
        opts = mosaic_options(**options)  # checked before the (slow) source is loaded
        return mosaic_splits(DATASETS[source](root), opts, name=f"{source}-mosaic")

    return load


DATASETS: dict[str, Callable[..., Splits]] = {
    "digits": _digits,
    "mnist": _mnist,
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "folder": _folder,
    "voc": _voc,
    "coco": _coco,
    "voc2007-coco": _voc2007_coco,
    "yolo": _yolo,
    "digits-mosaic": _mosaic("digits"),
    "mnist-mosaic": _mosaic("mnist"),
    "cifar10-mosaic": _mosaic("cifar10"),
}


def load_dataset(name: str, root: str | Path | None = None, **options) -> Splits:
    """The train and test sets of a catalog dataset.

    Args:
        name: one of :data:`DATASETS`: ``digits`` (no root), ``mnist``, ``cifar10``, ``cifar100``, ``folder``;
            multi-label: ``voc``, ``coco``, ``yolo`` (real formats), ``voc2007-coco`` (VOC 2007 in COCO format,
            64x64 by default) and ``digits-mosaic``, ``mnist-mosaic``,
            ``cifar10-mosaic`` (composed, see :mod:`.mosaic`; the root is the source dataset's).
        root: a folder or a ``.tar.gz``/``.tgz``/``.tar`` archive; its format is recognized. None looks for the
            usual names (``cifar-10-batches-py``, ``cifar-10-python.tar.gz``, ``cifar10-jpg.tar.gz``,
            ``mnist-png.tar.gz`` ...) in ``$CLEANBACKDOOR_DATA``.
        options: per dataset: ``digits``: test_fraction, seed; ``cifar100``: label_mode ("fine" or "coarse");
            ``folder``: channels (1, 3 or None), size ((H, W) to resize to); ``voc``: train, test (image set
            names), size, keep_difficult; ``coco``: train, test (split names), size, keep_empty; ``yolo``: train,
            test, test_fraction, seed, classes (names or "coco"), num_classes, size, keep_empty; ``*-mosaic``:
            grid, tile, train_size, test_size, objects, skew, themes, theme_rates, seed.

    Raises:
        ConfigError: an unknown name or option, or no root and nothing found.
        DataError: a missing, incomplete or corrupt file or folder.
    """
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    return DATASETS[name](root, **options)


def source_fingerprint(name: str, root: str | Path | None = None) -> str | None:
    """A hash of the files catalog dataset ``name`` is read from (the resolved ``root``; a mosaic set's source),
    for cache keys that must not change with how the root is written (relative or absolute, a link, another copy
    of the same archive). None for a dataset that ships with a library (``digits``)."""
    if name not in DATASETS:
        raise unknown_name("dataset", name, DATASETS)
    source = name.removesuffix("-mosaic")
    if source == "digits":
        return None
    path = _resolve_root(source, root).resolve()
    if path.is_file():
        return file_hash(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}:{file_hash(f)}\n".encode())
    return h.hexdigest()[:16]
