"""The audit's input: a dataset by name or as an image folder, and the labels a labeller gave it (a file)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from cleanbackdoor.data import DATASETS, ImageSet, load_dataset, load_folder_splits, load_image_folder
from cleanbackdoor.data.archive import is_archive
from cleanbackdoor.data.folder import find_split_root
from cleanbackdoor.errors import ConfigError, DataError


def load_audit_data(dataset: str, root: str | None = None) -> tuple[ImageSet, str]:
    """The labelled images to audit and the catalog name whose defaults (model, recipe) apply: a catalog dataset's
    training split, or an image folder tree (``<class>/<image>``, or ``train/<class>/<image>``, or an archive)."""
    if dataset in DATASETS:
        return load_dataset(dataset, root=root).train, dataset
    path = Path(dataset).expanduser()
    if not path.exists():
        raise ConfigError(f"audit: {dataset!r} is neither a dataset name ({', '.join(sorted(DATASETS))}) nor an "
                          "existing image folder")
    if (path.is_file() and is_archive(path)) or find_split_root(path) is not None:
        return load_folder_splits(path, name=path.name).train, "folder"
    return load_image_folder(path, name=path.name), "folder"


def _label_value(v: Any, data: ImageSet, where: str) -> int:
    if isinstance(v, (bool, np.bool_)):
        raise DataError(f"{where}: label {v!r} is not a class")
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        v = int(v)
    if isinstance(v, str):
        v = v.strip()
    try:
        return data.class_index(v)
    except ConfigError as e:
        raise DataError(f"{where}: {e}") from None


def read_labels(path: str | Path, data: ImageSet) -> np.ndarray:
    """Labels from a file, in the dataset's order: ``.npy`` ((N,) class indices, or (N, K) 0/1 for label sets),
    ``.json`` (a list of classes or of class lists, or ``{"labels": [...]}``), ``.csv``/``.txt`` (one row per
    image; the label in the last column, as a class name or index; a header row is skipped; label sets as names
    separated by ``;`` or ``|``). Classes may be given by name or index."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labels file {path} does not exist")
    suffix = path.suffix.lower()
    where = f"labels file {path}"
    if suffix == ".npy":
        try:
            raw: Any = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise DataError(f"{where}: not a plain numeric .npy array ({e})") from None
        if raw.ndim == 2:
            if raw.shape[1] != data.num_classes or not np.isin(raw, (0, 1)).all():
                raise DataError(f"{where}: a (N, K) label matrix must be 0/1 with K = {data.num_classes} columns, "
                                f"got shape {raw.shape}")
            labels = raw.astype(np.uint8)
        elif raw.ndim == 1:
            labels = np.array([_label_value(v, data, where) for v in raw.tolist()], dtype=np.int64)
        else:
            raise DataError(f"{where}: labels must be (N,) or (N, classes), got shape {raw.shape}")
    elif suffix == ".json":
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        if isinstance(raw, dict):
            raw = raw.get("labels")
        if not isinstance(raw, list):
            raise DataError(f"{where}: expected a list of labels or {{\"labels\": [...]}}")
        labels = _from_items(raw, data, where)
    elif suffix in (".csv", ".txt", ".tsv"):
        with path.open(newline="") as f:
            rows = [r for r in csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",") if r]
        items = [r[-1].strip() for r in rows]
        if items and not _is_label(items[0], data):
            items = items[1:]  # a header
        items = [[s for s in (x.replace("|", ";").split(";")) if s.strip()] if (";" in x or "|" in x) else x
                 for x in items]
        labels = _from_items(items, data, where)
    else:
        raise DataError(f"{where}: unknown format {suffix!r}; use .csv, .json or .npy")
    if len(labels) != len(data):
        raise DataError(f"{where} has {len(labels)} labels for {len(data)} images")
    return labels


def _is_label(text: str, data: ImageSet) -> bool:
    try:
        _label_value(text.split(";")[0].split("|")[0], data, "")
        return True
    except DataError:
        return False


def _from_items(items: list, data: ImageSet, where: str) -> np.ndarray:
    if any(isinstance(x, list) for x in items):
        out = np.zeros((len(items), data.num_classes), dtype=np.uint8)
        for i, x in enumerate(items):
            for v in (x if isinstance(x, list) else [x]):
                out[i, _label_value(v, data, f"{where}, row {i}")] = 1
        return out
    return np.array([_label_value(v, data, f"{where}, row {i}") for i, v in enumerate(items)], dtype=np.int64)
