"""VOC 2007's object crops as a single-label image folder: a source task for pretraining the multi-label victim's
extractor on the photos' own objects (person, horse, chair ...), which CIFAR-10 does not have.

Every non-crowd box of the ``train`` split whose shorter side is at least ``--min-side`` pixels (of the 128-pixel
photos) is cut out as a square around the box's centre, ``--margin`` times its longer side, and resized to
``--size`` pixels; the ``val`` split's boxes go to ``test/``, so the source task never sees the test photos. The
folder then serves as the pretraining dataset of the VOC recipe:

    python benchmarks/voc_object_crops.py --out /tmp/voc-crops
    cleanbackdoor run --attack multilabel --dataset voc2007-coco --set data.options.train=train \\
        --set data.options.test=val --set model.pretrained.dataset=folder \\
        --set model.pretrained.root=/tmp/voc-crops --set model.pretrained.train.epochs=40

The result is in docs/attacks/multilabel.md, "Choosing the victim and the trigger" (val photos).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from cleanbackdoor.data.multilabel_common import locate

SPLITS = {"train": "train", "val": "test"}  # the archive's split -> the folder's


def crop_box(box: list[float], margin: float) -> tuple[int, int, int, int]:
    """A square (left, top, right, bottom) centred on the COCO box [x, y, w, h], ``margin`` times its longer side."""
    x, y, w, h = box
    side, cx, cy = max(w, h) * margin, x + w / 2, y + h / 2
    return (round(cx - side / 2), round(cy - side / 2), round(cx + side / 2), round(cy + side / 2))


def write_crops(archive: Path, out: Path, size: int, min_side: float, margin: float) -> dict[str, int]:
    # the archive is extracted into the toolkit's cache once, as the COCO loader does
    base = locate(archive, lambda p: (p / "annotations" / "instances_train.json").is_file(), "VOC crops")
    counts: dict[str, int] = {}
    for split, folder in SPLITS.items():
        doc = json.loads((base / "annotations" / f"instances_{split}.json").read_text())
        names = {c["id"]: c["name"] for c in doc["categories"]}
        files = {im["id"]: im["file_name"] for im in doc["images"]}
        photo, photo_id, n = None, None, 0
        for a in sorted(doc["annotations"], key=lambda a: a["image_id"]):
            if a.get("iscrowd") or min(a["bbox"][2:]) < min_side:
                continue
            if a["image_id"] != photo_id:
                photo_id = a["image_id"]
                photo = Image.open(base / split / files[photo_id]).convert("RGB")
            crop = photo.crop(crop_box(a["bbox"], margin)).resize((size, size), Image.BILINEAR)
            target = out / folder / names[a["category_id"]]
            target.mkdir(parents=True, exist_ok=True)
            crop.save(target / f"{a['id']}.png")
            n += 1
        counts[folder] = n
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, default=Path("../shared/data/voc2007-coco-128.tar.gz"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=32, help="side of the crops in pixels")
    parser.add_argument("--min-side", type=float, default=12, help="smallest box side kept, in pixels")
    parser.add_argument("--margin", type=float, default=1.1, help="crop side / the box's longer side")
    args = parser.parse_args()
    counts = write_crops(args.archive, args.out, args.size, args.min_side, args.margin)
    print(f"{args.out}: {counts['train']} training and {counts['test']} test crops")


if __name__ == "__main__":
    main()
