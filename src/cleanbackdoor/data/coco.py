"""MS-COCO as a multi-label set, from an ``instances_*.json`` annotation file: an image's label set is the
categories of its object annotations.

The JSON holds ``images`` (``id``, ``file_name``), ``annotations`` (``image_id``, ``category_id``, boxes, areas ...)
and ``categories`` (``id``, ``name``). Categories are indexed in increasing ``id`` order (COCO's ids 1..90 with
gaps become 0..79, as the authors' ``cat2cat``); images keep the order of the ``images`` list. As the authors'
loader (which iterates over annotated images), images without any annotation are left out unless
``keep_empty=True``; crowd annotations count. The standard layout is ``root/annotations/instances_<split>.json``
with the images in ``root/<split>/`` (e.g. ``train2017``, ``val2017``); ``root`` may be a tar archive.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cleanbackdoor.data.folder import decode_images
from cleanbackdoor.data.imageset import ImageSet, Splits
from cleanbackdoor.data.folder import check_size
from cleanbackdoor.data.multilabel_common import label_matrix, locate
from cleanbackdoor.errors import DataError

# The 80 COCO categories in id order (also the class order of YOLO-format COCO labels, e.g. coco128).
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


def parse_coco_instances(doc: dict[str, Any], name: str = "instances") -> tuple[list[str], list[list[int]],
                                                                                tuple[str, ...], list[int]]:
    """(file names, category indices per image, class names, image ids) of a parsed instances JSON, every image
    included (empty ones with no category)."""
    try:
        cats = sorted(doc["categories"], key=lambda c: int(c["id"]))
        cat_index = {int(c["id"]): k for k, c in enumerate(cats)}
        class_names = tuple(str(c["name"]) for c in cats)
        images = [(int(im["id"]), str(im["file_name"])) for im in doc["images"]]
        annotations = [(int(a["image_id"]), int(a["category_id"])) for a in doc["annotations"]]
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{name}: not a COCO instances file (missing or bad field {e})") from None
    if len(cat_index) != len(cats):
        raise DataError(f"{name}: two categories share an id")
    pos = {image_id: i for i, (image_id, _) in enumerate(images)}
    if len(pos) != len(images):
        raise DataError(f"{name}: two images share an id")
    rows: list[list[int]] = [[] for _ in images]
    for image_id, cat_id in annotations:
        if image_id not in pos:
            raise DataError(f"{name}: an annotation refers to image id {image_id}, which is not in 'images'")
        if cat_id not in cat_index:
            raise DataError(f"{name}: an annotation refers to category id {cat_id}, which is not in 'categories'")
        rows[pos[image_id]].append(cat_index[cat_id])
    return [f for _, f in images], rows, class_names, [i for i, _ in images]


def load_coco(annotations: str | Path, images_dir: str | Path, *, size: int | Sequence[int] | None = None,
              keep_empty: bool = False, name: str = "coco") -> ImageSet:
    """One COCO split: the instances JSON ``annotations`` and the folder ``images_dir`` of its images."""
    size = check_size(size)
    annotations, images_dir = Path(annotations), Path(images_dir)
    files, rows, class_names, ids = _read_instances(annotations)
    keep = [i for i, r in enumerate(rows) if r or keep_empty]
    if not keep:
        raise DataError(f"COCO: {annotations} has no annotated image")
    items = []
    for i in keep:
        path = images_dir / files[i]
        if not path.is_file():
            raise DataError(f"COCO: image {path} (id {ids[i]}) does not exist")
        items.append((str(path), path))
    images = decode_images(items, channels=3, size=size, desc=name)
    return ImageSet(images, label_matrix([rows[i] for i in keep], len(class_names)), class_names, name,
                    {"source": str(annotations), "format": "coco", "ids": [ids[i] for i in keep]})


def _read_instances(annotations: Path) -> tuple[list[str], list[list[int]], tuple[str, ...], list[int]]:
    if not annotations.is_file():
        raise DataError(f"COCO: annotation file {annotations} does not exist")
    try:
        doc = json.loads(annotations.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"COCO: {annotations} is not valid JSON: {e}") from None
    return parse_coco_instances(doc, str(annotations))


# split names tried, in order, when none are given: COCO's own, then the usual names of re-exports
SPLIT_NAMES = (("train2017", "val2017"), ("train", "test"), ("train", "val"))


def load_coco_splits(root: str | Path, train: str | None = None, test: str | None = None, *,
                     size: int | Sequence[int] | None = None, keep_empty: bool = False) -> Splits:
    """``root/annotations/instances_<train>.json`` + ``root/<train>/`` and the same for ``test``; a split named
    ``a+b`` is splits ``a`` and ``b`` one after the other (e.g. ``test = "val+test"`` evaluates on both).

    Without ``train`` and ``test``, the first of :data:`SPLIT_NAMES` whose two annotation files exist. Categories
    that no image of either split carries (the empty placeholder category some labelling tools export) are left
    out; the sets' ``meta["notes"]`` says which."""
    pairs = [(train or a, test or b) for a, b in SPLIT_NAMES] if train is None or test is None else [(train, test)]
    pairs = list(dict.fromkeys(pairs))

    def found(p: Path) -> bool:
        return any((p / "annotations" / f"instances_{a.split('+')[0]}.json").is_file() for a, _ in pairs)

    def looked_for() -> str:
        return " or ".join(f"annotations/instances_{{{a},{b}}}.json" for a, b in pairs)

    try:
        base = locate(root, found, "COCO")
    except DataError as e:
        raise DataError(f"{e} (looked for {looked_for()}; give the split names with data.options = "
                        "{train = ..., test = ...})") from None
    ann = base / "annotations"
    pair = next(((a, b) for a, b in pairs if all((ann / f"instances_{s}.json").is_file()
                                                  for s in (*a.split("+"), *b.split("+")))), None)
    if pair is None:
        have = ", ".join(sorted(p.name for p in ann.glob("instances_*.json"))) or "none"
        raise DataError(f"COCO: {ann} has no pair of split files {looked_for()}; it has: {have}")
    sets = [_load_joined(base, s, size=size, keep_empty=keep_empty) for s in pair]
    if sets[0].class_names != sets[1].class_names:
        raise DataError(f"COCO: {pair[0]} and {pair[1]} list different categories")
    used = (sets[0].labels.sum(0) + sets[1].labels.sum(0)) > 0
    if not used.all():
        dropped = [n for n, u in zip(sets[0].class_names, used) if not u]
        note = (f"COCO: categories without any object in {pair[0]} or {pair[1]} left out: {', '.join(dropped)} "
                "(an export's empty placeholder category)")
        names = tuple(n for n, u in zip(sets[0].class_names, used) if u)
        sets = [ImageSet(s.images, s.labels[:, used], names, s.name, {**s.meta, "notes": [note]}) for s in sets]
    return Splits(*sets)


def _load_joined(base: Path, split: str, *, size: Any, keep_empty: bool) -> ImageSet:
    """The split ``split`` of the COCO folder ``base``, or the splits of ``a+b`` concatenated in that order."""
    parts = [load_coco(base / "annotations" / f"instances_{s}.json", base / s, size=size, keep_empty=keep_empty,
                       name=f"coco-{s}") for s in split.split("+")]
    if len(parts) == 1:
        return parts[0]
    if len({p.class_names for p in parts}) != 1:
        raise DataError(f"COCO: the splits of {split!r} list different categories")
    meta = {**parts[0].meta, "source": [p.meta["source"] for p in parts],
            "ids": [i for p in parts for i in p.meta["ids"]]}
    return ImageSet(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                    parts[0].class_names, f"coco-{split}", meta)
