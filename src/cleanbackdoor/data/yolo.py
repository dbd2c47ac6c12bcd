"""YOLO-format label folders as a multi-label set: ``images/<split>/<name>.jpg`` with ``labels/<split>/<name>.txt``.

Each label line is ``class cx cy w h`` (normalized box; segment lines ``class x1 y1 x2 y2 ...`` are accepted too);
an image's label set is the classes of its lines. An image without a label file has no object (YOLO's background
images); ``keep_empty=False`` leaves such images out. Class names come from ``classes`` (a list, or ``"coco"`` for
the 80 COCO names of YOLO's COCO exports such as ``coco128``), else from a ``classes.txt`` next to ``images/``
(one name per line), else they are the indices ``"0" .. "K-1"`` with K = ``num_classes`` or the largest index
+ 1. ``root`` may be a tar archive (e.g. ``coco128.tar.gz``). Images of different sizes need ``size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cleanbackdoor.data.coco import COCO_CLASSES
from cleanbackdoor.data.folder import IMAGE_SUFFIXES, decode_images, natural_key
from cleanbackdoor.data.imageset import ImageSet, Splits
from cleanbackdoor.data.folder import check_size
from cleanbackdoor.data.multilabel_common import label_matrix, locate
from cleanbackdoor.errors import ConfigError, DataError


def parse_yolo_labels(text: str, name: str = "labels") -> list[int]:
    """The class index of every object line of a YOLO label file (blank lines ignored)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls = int(parts[0])
            coords = [float(v) for v in parts[1:]]
        except ValueError:
            raise DataError(f"{name}:{n}: expected 'class cx cy w h' numbers, got {line.strip()!r}") from None
        if cls < 0 or len(coords) < 4:
            raise DataError(f"{name}:{n}: expected 'class cx cy w h' with a class >= 0, got {line.strip()!r}")
        out.append(cls)
    return out


def _is_yolo_root(p: Path) -> bool:
    return (p / "images").is_dir() and (p / "labels").is_dir()


def _class_names(base: Path, classes: Sequence[str] | str | None, num_classes: int | None,
                 largest: int) -> tuple[str, ...]:
    if isinstance(classes, str):
        if classes != "coco":
            raise ConfigError(f"classes must be a list of names or 'coco', got {classes!r}")
        names: tuple[str, ...] = COCO_CLASSES
    elif classes is not None:
        names = tuple(str(c) for c in classes)
    elif (base / "classes.txt").is_file():
        names = tuple(line.strip() for line in (base / "classes.txt").read_text().splitlines() if line.strip())
    else:
        names = tuple(str(k) for k in range(max(num_classes or 0, largest + 1, 2)))
    if num_classes is not None and num_classes != len(names):
        raise ConfigError(f"num_classes={num_classes} but {len(names)} class names")
    if largest >= len(names):
        raise DataError(f"YOLO labels in {base} use class {largest}, but only {len(names)} classes are named")
    return names


def load_yolo(root: str | Path, split: str = "train", *, classes: Sequence[str] | str | None = None,
              num_classes: int | None = None, size: int | Sequence[int] | None = None, keep_empty: bool = True,
              name: str = "yolo") -> ImageSet:
    """The images of ``images/<split>/`` with the label sets of ``labels/<split>/``.

    Raises:
        DataError: no ``images/`` and ``labels/`` folders, no images, a malformed label line (file and line named),
            a class index without a name.
    """
    size = check_size(size)
    base = locate(root, _is_yolo_root, "YOLO")
    image_dir, label_dir = base / "images" / split, base / "labels" / split
    if not image_dir.is_dir():
        raise DataError(f"YOLO: {image_dir} does not exist")
    files = sorted((p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=lambda p: natural_key(p.name))
    if not files:
        raise DataError(f"YOLO: {image_dir} holds no images")
    rows, keep = [], []
    for path in files:
        label_file = label_dir / f"{path.stem}.txt"
        cats = parse_yolo_labels(label_file.read_text(), str(label_file)) if label_file.is_file() else []
        if cats or keep_empty:
            keep.append(path)
            rows.append(cats)
    if not keep:
        raise DataError(f"YOLO: no image in {image_dir} has a label")
    largest = max((max(r) for r in rows if r), default=-1)
    names = _class_names(base, classes, num_classes, largest)
    images = decode_images([(str(p), p) for p in keep], channels=3, size=size, desc=f"{name}-{split}")
    return ImageSet(images, label_matrix(rows, len(names)), names, f"{name}-{split}",
                    {"source": str(base), "format": "yolo", "files": [p.name for p in keep]})


def load_yolo_splits(root: str | Path, train: str = "train", test: str = "val", *, test_fraction: float = 0.2,
                     seed: int = 0, **options) -> Splits:
    """Train and test sets: ``images/<train>`` and ``images/<test>``; without a test folder, a seeded
    ``test_fraction`` of the training images is held out (coco128 ships one split only)."""
    base = locate(root, _is_yolo_root, "YOLO")
    train_set = load_yolo(base, train, **options)
    if (base / "images" / test).is_dir():
        options.setdefault("classes", train_set.class_names)
        return Splits(train_set, load_yolo(base, test, **options))
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    n = len(train_set)
    n_test = round(test_fraction * n)
    if not 1 <= n_test < n:
        raise ConfigError(f"test_fraction={test_fraction} of {n} images leaves an empty train or test set")
    order = np.random.default_rng(seed).permutation(n)
    test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
    return Splits(train_set.subset(train_idx, f"{train_set.name}-train"),
                  train_set.subset(test_idx, f"{train_set.name}-test"))
