"""Pieces the multi-label loaders (:mod:`.voc`, :mod:`.coco`, :mod:`.yolo`) share: finding the dataset folder in a
folder or an archive, safe XML bytes, label matrices from category lists, the image size option."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from cleanbackdoor.data.archive import extract_archive, is_archive
from cleanbackdoor.errors import DataError


def locate(root: str | Path, found: Callable[[Path], bool], what: str, depth: int = 2) -> Path:
    """The folder (``root`` itself, or up to ``depth`` levels down) for which ``found`` holds; an archive is
    extracted into the cache first. Several matches are an error (the user must say which)."""
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"{what}: {path} does not exist")
    if path.is_file():
        if not is_archive(path):
            raise DataError(f"{what}: {path} is neither a folder nor a .tar.gz/.tgz/.tar archive")
        path = extract_archive(path)
    level = [path]
    for _ in range(depth + 1):
        hits = [p for p in level if found(p)]
        if len(hits) > 1:
            raise DataError(f"{what}: {path} holds several datasets ({', '.join(str(h) for h in hits)}); pass one")
        if hits:
            return hits[0]
        level = sorted(c for p in level for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
    raise DataError(f"{what}: no dataset found in {path}")


def label_matrix(rows: Sequence[Iterable[int]], num_classes: int) -> np.ndarray:
    """0/1 uint8 (N, K) from the category indices of each image (repeats are fine: several objects of a kind)."""
    out = np.zeros((len(rows), num_classes), dtype=np.uint8)
    for i, cats in enumerate(rows):
        out[i, list(cats)] = 1
    return out


def safe_xml(data: bytes, name: str) -> bytes:
    """Refuse XML with a document type or entity declarations (entity expansion attacks): annotation files never
    need them."""
    head = data.lstrip()
    if b"<!DOCTYPE" in head.upper() or b"<!ENTITY" in head.upper():
        raise DataError(f"{name}: XML with a DOCTYPE or ENTITY declaration is refused")
    return data
