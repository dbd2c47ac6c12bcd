"""Readers for the standard on-disk formats of image datasets. Nothing here downloads anything.

- CIFAR-10/100 python batches, read with :class:`RestrictedUnpickler`: it accepts only the globals that numpy
  arrays need, so a malicious pickle cannot run code;
- MNIST IDX files (optionally gzipped);
- class-per-folder image trees (``root/<class>/*.png|jpg|jpeg|ppm|bmp``), decoded with Pillow.

Every problem with a file is a :class:`~cleanbackdoor.errors.DataError` that names the file.
"""

from __future__ import annotations

import gzip
import pickle
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cleanbackdoor.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".bmp"}


# -- CIFAR pickles ------------------------------------------------------------------------------------------
class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists, strings, bytes, numbers and numpy arrays: what CIFAR batches contain."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def __init__(self, file, name: str) -> None:
        super().__init__(file, encoding="bytes")
        self.name = name

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise DataError(f"{self.name}: refused to unpickle global {module}.{name} (not part of a CIFAR batch)")
        return super().find_class(module, name)


def load_pickle_batch(path: Path) -> dict:
    """A CIFAR batch as a dict with str keys."""
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f, str(path)).load()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as e:  # noqa: BLE001 - truncated or garbled pickles raise many types
        raise DataError(f"{path}: not a readable CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, found {type(obj).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def cifar_arrays(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and labels (N,) from one CIFAR batch file."""
    batch = load_pickle_batch(path)
    if "data" not in batch or label_key not in batch:
        raise DataError(f"{path}: missing 'data' or {label_key!r} (keys: {sorted(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path}: expected uint8 data (N, 3072) and N labels, got {data.dtype} {data.shape} "
                        f"and {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def cifar_names(meta_path: Path, key: str) -> list[str]:
    meta = load_pickle_batch(meta_path)
    if key not in meta:
        raise DataError(f"{meta_path}: missing {key!r}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]


# -- MNIST IDX ----------------------------------------------------------------------------------------------
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (or .gz) as a numpy array."""
    try:
        raw = gzip.open(path).read() if str(path).endswith(".gz") else Path(path).read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    need = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != need:
        raise DataError(f"{path}: IDX data holds {len(raw) - header} bytes, dims {dims} need {need} (truncated?)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


# -- image folders ------------------------------------------------------------------------------------------
def _natural_key(p: Path) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name))


def decode_image(path: Path, mode: str, size: tuple[int, int] | None = None) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            img = img.convert(mode)
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: corrupt or unreadable image ({e})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def list_class_folders(root: Path) -> tuple[list[str], list[list[Path]]]:
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class folders (expected root/<class>/<image>)")
    files = []
    for c in classes:
        found = sorted((p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_natural_key)
        if not found:
            raise DataError(f"{root / c}: class folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files.append(found)
    return classes, files


def read_image_tree(root: Path, channels: int | None = None, size: tuple[int, int] | None = None,
                    classes: list[str] | None = None, workers: int = 4) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode ``root/<class>/*``: images (N, H, W, C) uint8, labels (N,), class names (sorted folder names).

    ``channels`` 1 or 3 forces grey or RGB; None decides from the first image. All images must share one size
    unless ``size`` = (H, W) is given. ``classes`` fixes the class list (a test split must match its train split).
    """
    found, files = list_class_folders(root)
    if classes is not None and found != list(classes):
        raise DataError(f"{root}: class folders {found} differ from the expected {list(classes)}")
    paths = [p for fs in files for p in fs]
    labels = np.concatenate([np.full(len(fs), i, dtype=np.int64) for i, fs in enumerate(files)])
    if channels is None:
        with Image.open(paths[0]) as first:
            channels = 1 if first.mode in ("L", "1", "I;16", "I") else 3
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    mode = "L" if channels == 1 else "RGB"
    with ThreadPoolExecutor(max_workers=workers) as pool:
        arrays = list(pool.map(lambda p: decode_image(p, mode, size), paths, chunksize=256))
    shape = arrays[0].shape
    for p, a in zip(paths, arrays):
        if a.shape != shape:
            raise DataError(f"{p}: image of shape {a.shape[:2]} differs from {shape[:2]} (pass size=(H, W) to resize)")
    return np.stack(arrays), labels, found
