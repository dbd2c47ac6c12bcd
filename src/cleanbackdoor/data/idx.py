"""MNIST's IDX files: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-...`` (optionally ``.gz``).

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one big-endian
uint32 per dimension, then the data in big-endian order. The same format holds Fashion-MNIST and EMNIST.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from cleanbackdoor.data.imageset import ImageSet, Splits
from cleanbackdoor.errors import DataError

IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
DIGITS = tuple(str(d) for d in range(10))

# The usual file names: the original ones, the variant with a dot (train-images.idx3-ubyte), each maybe gzipped.
_PREFIX = {"train": "train", "test": "t10k"}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file {path} does not exist") from None
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read IDX file {path} (truncated or not gzip): {exc}") from None


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (or ``.gz``) as a numpy array in native byte order, with its header checked against its size."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"IDX file {path} is truncated: {len(raw)} bytes, shorter than the 4-byte magic number")
    zero, code, ndim = raw[:2], raw[2], raw[3]
    if zero != b"\0\0" or code not in IDX_TYPES or ndim == 0:
        raise DataError(f"{path} is not an IDX file: magic number {raw[:4].hex()} (expected 0000 + type code "
                        f"{'/'.join(f'{c:02x}' for c in IDX_TYPES)} + number of dimensions)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated: its header needs {header} bytes, the file has {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_TYPES[code])
    count = math.prod(dims)
    expected = count * dtype.itemsize
    got = len(raw) - header
    if got < expected:
        raise DataError(f"IDX file {path} is truncated: dimensions {dims} need {expected} bytes of data, "
                        f"the file holds {got}")
    if got > expected:
        raise DataError(f"IDX file {path} has {got - expected} bytes after the data its dimensions {dims} describe")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="))


def find_idx_files(root: str | Path) -> dict[str, Path] | None:
    """``{"train_images", "train_labels", "test_images", "test_labels"}`` -> path, or None if any is missing.

    Looks in ``root``, ``root/raw`` and ``root/MNIST/raw`` (torchvision's layout), at the usual file names.
    """
    root = Path(root)
    for folder in (root, root / "raw", root / "MNIST" / "raw"):
        found = {}
        for split, prefix in _PREFIX.items():
            for kind, idx in (("images", "idx3"), ("labels", "idx1")):
                for stem in (f"{prefix}-{kind}-{idx}-ubyte", f"{prefix}-{kind}.{idx}-ubyte"):
                    for candidate in (folder / stem, folder / f"{stem}.gz"):
                        if candidate.is_file():
                            found.setdefault(f"{split}_{kind}", candidate)
        if len(found) == 4:
            return found
    return None


def load_mnist_idx(root: str | Path, *, class_names: tuple[str, ...] = DIGITS, name: str = "mnist") -> Splits:
    """MNIST (or Fashion-MNIST, with its ``class_names``) from a folder of IDX files: (N, 28, 28, 1) uint8."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"MNIST folder {root} does not exist")
    files = find_idx_files(root)
    if files is None:
        raise DataError(f"{root} lacks the MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                        "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally .gz)")
    sets = []
    for split in ("train", "test"):
        images, labels = read_idx(files[f"{split}_images"]), read_idx(files[f"{split}_labels"])
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(f"{files[f'{split}_images']}: expected uint8 images (N, H, W), got {images.dtype} "
                            f"{images.shape}")
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{files[f'{split}_labels']}: expected integer labels (N,), got {labels.dtype} "
                            f"{labels.shape}")
        if labels.shape[0] != images.shape[0]:
            raise DataError(f"{files[f'{split}_labels']} has {labels.shape[0]} labels for the {images.shape[0]} "
                            f"images of {files[f'{split}_images']}")
        if labels.size and labels.max() >= len(class_names):
            raise DataError(f"{files[f'{split}_labels']}: label {labels.max()} but only {len(class_names)} classes")
        sets.append(ImageSet(np.ascontiguousarray(images[..., None]), labels.astype(np.int64), class_names,
                             f"{name}-{split}", {"source": str(files[f"{split}_images"]), "format": "idx"}))
    return Splits(*sets)
