"""CIFAR-10 and CIFAR-100 in their standard Python-pickle format, read with a restricted unpickler.

Layouts (as distributed in ``cifar-10-python.tar.gz`` and ``cifar-100-python.tar.gz``)::

    cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch, batches.meta
    cifar-100-python/train, test, meta

Each batch is a pickled dict with ``data`` (N, 3072) uint8 (each row three 32x32 planes: R, G, B) and ``labels``
(CIFAR-10) or ``fine_labels``/``coarse_labels`` (CIFAR-100). Pickle runs whatever functions a file names, so these
files are read with :class:`RestrictedUnpickler`, which resolves only the numpy globals that rebuild an array;
anything else (``os.system``, ``builtins.eval`` ...) is refused with a :class:`DataError` naming the file.
"""

from __future__ import annotations

import codecs
import importlib
import pickle
from pathlib import Path

import numpy as np

from cleanbackdoor.data.archive import extract_archive, is_archive
from cleanbackdoor.data.imageset import ImageSet, Splits
from cleanbackdoor.errors import DataError, unknown_name

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"
LABEL_MODES = ("fine", "coarse")


def _numpy_global(name: str, *modules: str):
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None


def _allowed_globals() -> dict[tuple[str, str], object]:
    """The globals an array pickle needs, under both numpy 1.x (``numpy.core``) and 2.x (``numpy._core``) names."""
    reconstruct = _numpy_global("_reconstruct", "numpy._core.multiarray", "numpy.core.multiarray")
    frombuffer = _numpy_global("_frombuffer", "numpy._core.numeric", "numpy.core.numeric")  # pickle protocol 5
    # _codecs.encode is how Python 3 writes bytes at pickle protocol 2 (a re-pickled batch); it only converts text.
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                              ("_codecs", "encode"): codecs.encode}
    for module in ("numpy.core", "numpy._core"):
        if reconstruct is not None:
            allowed[(f"{module}.multiarray", "_reconstruct")] = reconstruct
        if frombuffer is not None:
            allowed[(f"{module}.numeric", "_frombuffer")] = frombuffer
    return allowed


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global the restricted unpickler does not allow."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain containers, strings, numbers and numpy arrays.

    Dicts, lists, bytes, str and ints need no globals; numpy arrays need ``_reconstruct`` (``_frombuffer`` at
    protocol 5), ``ndarray`` and ``dtype``; Python 3 writes bytes at protocol 2 as ``_codecs.encode``. ``find_class``
    refuses every other global, so a pickle cannot call anything else.
    """

    _allowed: dict[tuple[str, str], object] | None = None

    def find_class(self, module: str, name: str):  # noqa: D102
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _allowed_globals()
        try:
            return RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"{module}.{name}") from None


def load_pickle(path: str | Path) -> object:
    """Unpickle a CIFAR file with :class:`RestrictedUnpickler` (``encoding="bytes"``, as written by Python 2)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"CIFAR file {path} does not exist") from None
    except RefusedGlobal as exc:
        raise DataError(f"refused to load {path}: the pickle calls {exc}, which is not a numpy array constructor "
                        "(the file is not a CIFAR batch and may be malicious)") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # EOFError, UnpicklingError, ValueError ...: a truncated or garbled file
        raise DataError(f"{path} is not a readable CIFAR pickle (truncated or corrupt): "
                        f"{type(exc).__name__}: {exc}") from exc


def _entry(batch: dict, key: str, path: Path):
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise DataError(f"{path} has no {key!r} entry; found {sorted(str(k) for k in batch)}")


def _load_dict(path: Path) -> dict:
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not a CIFAR batch dict")
    return obj


def read_batch(path: str | Path, label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file as images (N, 32, 32, 3) uint8 and labels (N,) int64, validated."""
    path = Path(path)
    batch = _load_dict(path)
    data = _entry(batch, "data", path)
    labels = _entry(batch, label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = (getattr(data, "dtype", type(data).__name__), getattr(data, "shape", None))
        raise DataError(f"{path}: 'data' must be a uint8 array (N, 3072), got {got}")
    try:
        labels = np.asarray(labels)
    except Exception as exc:
        raise DataError(f"{path}: {label_key!r} is not a list of integers") from exc
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise DataError(f"{path}: {label_key!r} must be a list of integers, got {labels.dtype} {labels.shape}")
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {data.shape[0]} images but {labels.shape[0]} {label_key!r}")
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels.astype(np.int64)


def _names(path: Path, key: str) -> tuple[str, ...]:
    names = _entry(_load_dict(path), key, path)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataError(f"{path}: {key!r} must be a list of names")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)


def _check_labels(labels: np.ndarray, k: int, path: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise DataError(f"{path}: labels must lie in [0, {k}), got [{labels.min()}, {labels.max()}]")


def _locate(root: str | Path, folder: str, marker: str) -> Path:
    """The folder holding ``marker``: ``root`` itself, ``root/folder``, or either inside an extracted archive."""
    root = Path(root).expanduser()
    if root.is_file() and is_archive(root):
        root = extract_archive(root)
    if not root.exists():
        raise DataError(f"CIFAR folder {root} does not exist")
    for candidate in (root, root / folder):
        if (candidate / marker).is_file():
            return candidate
    raise DataError(f"{root} holds no CIFAR pickle files (expected {folder}/{marker} or {marker} directly in it)")


def load_cifar10(root: str | Path, *, name: str = "cifar10") -> Splits:
    """CIFAR-10 from the pickle folder ``cifar-10-batches-py``, a folder containing it, or ``cifar-10-python.tar.gz``.

    Returns 50,000 training images (``data_batch_1`` .. ``_5`` in order) and 10,000 test images, (N, 32, 32, 3)
    uint8, with the class names from ``batches.meta`` (the standard names if that file is missing).
    """
    base = _locate(root, CIFAR10_DIR, "data_batch_1")
    meta = base / "batches.meta"
    classes = _names(meta, "label_names") if meta.exists() else CIFAR10_CLASSES
    parts = [read_batch(base / f"data_batch_{i}") for i in range(1, 6)]
    for i, (_, labels) in enumerate(parts, start=1):
        _check_labels(labels, len(classes), base / f"data_batch_{i}")
    test_images, test_labels = read_batch(base / "test_batch")
    _check_labels(test_labels, len(classes), base / "test_batch")
    info = {"source": str(base), "format": "cifar-pickle"}
    train = ImageSet(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), classes,
                     f"{name}-train", dict(info))
    return Splits(train, ImageSet(test_images, test_labels, classes, f"{name}-test", dict(info)))


def load_cifar100(root: str | Path, *, label_mode: str = "fine", name: str = "cifar100") -> Splits:
    """CIFAR-100 from ``cifar-100-python`` (``train``, ``test``, ``meta``), a folder containing it, or its archive.

    ``label_mode`` ``"fine"`` gives the 100 classes, ``"coarse"`` the 20 superclasses.
    """
    if label_mode not in LABEL_MODES:
        raise unknown_name("label_mode", label_mode, LABEL_MODES)
    base = _locate(root, CIFAR100_DIR, "train")
    key = f"{label_mode}_labels"
    classes = _names(base / "meta", f"{label_mode}_label_names")
    info = {"source": str(base), "format": "cifar-pickle", "label_mode": label_mode}
    sets = []
    for split in ("train", "test"):
        images, labels = read_batch(base / split, key)
        _check_labels(labels, len(classes), base / split)
        sets.append(ImageSet(images, labels, classes, f"{name}-{split}", dict(info)))
    return Splits(*sets)
