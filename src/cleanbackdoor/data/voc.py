"""PASCAL VOC (2007/2012) as a multi-label set: one XML annotation per image, the label set is its object classes.

Layout (as distributed): ``VOC2007/Annotations/<id>.xml``, ``VOC2007/JPEGImages/<id>.jpg``,
``VOC2007/ImageSets/Main/{train,val,trainval,test}.txt`` (one image id per line). ``root`` may be the year folder,
a ``VOCdevkit`` folder holding one, or a tar archive of either. Each XML's ``<object><name>`` gives a class among
the 20 VOC classes (:data:`VOC_CLASSES`, in the standard order); ``<filename>`` names the image (else
``<id>.jpg``). As the multi-label backdoor authors' loader, objects marked ``<difficult>1</difficult>`` count
(``keep_difficult=False`` drops them). VOC images differ in size: pass ``size`` to resize them all.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from cleanbackdoor.data.folder import decode_images
from cleanbackdoor.data.imageset import ImageSet, Splits
from cleanbackdoor.data.folder import check_size
from cleanbackdoor.data.multilabel_common import label_matrix, locate, safe_xml
from cleanbackdoor.errors import DataError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def parse_voc_annotation(data: bytes, name: str = "annotation") -> tuple[str | None, list[tuple[str, bool]]]:
    """(image file name or None, [(class name, difficult)]) of one VOC XML annotation."""
    try:
        root = ET.fromstring(safe_xml(data, name))
    except ET.ParseError as e:
        raise DataError(f"{name}: not valid XML: {e}") from None
    if root.tag != "annotation":
        raise DataError(f"{name}: root element is <{root.tag}>, expected <annotation>")
    filename = root.findtext("filename")
    objects = []
    for obj in root.findall("object"):
        cls = (obj.findtext("name") or "").strip().lower()
        if not cls:
            raise DataError(f"{name}: an <object> has no <name>")
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        objects.append((cls, difficult))
    return (filename.strip() if filename else None), objects


def _is_voc_year(p: Path) -> bool:
    return (p / "Annotations").is_dir() and (p / "JPEGImages").is_dir()


def load_voc(root: str | Path, image_set: str = "trainval", *, size: int | Sequence[int] | None = None,
             keep_difficult: bool = True, classes: Sequence[str] = VOC_CLASSES, name: str = "voc") -> ImageSet:
    """The images of ``ImageSets/Main/<image_set>.txt`` (all annotated images if that file is absent).

    Raises:
        DataError: no VOC folder, a missing image or annotation, invalid XML, a class not in ``classes``.
    """
    size = check_size(size)
    base = locate(root, _is_voc_year, "VOC")
    list_file = base / "ImageSets" / "Main" / f"{image_set}.txt"
    if list_file.is_file():
        ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    elif image_set in ("trainval", "all"):
        ids = sorted(p.stem for p in (base / "Annotations").glob("*.xml"))
    else:
        raise DataError(f"VOC: {list_file} does not exist")
    if not ids:
        raise DataError(f"VOC: image set {image_set!r} in {base} is empty")
    index = {c: k for k, c in enumerate(classes)}
    items, rows = [], []
    for image_id in ids:
        xml_path = base / "Annotations" / f"{image_id}.xml"
        if not xml_path.is_file():
            raise DataError(f"VOC: annotation {xml_path} does not exist")
        filename, objects = parse_voc_annotation(xml_path.read_bytes(), str(xml_path))
        cats = []
        for cls, difficult in objects:
            if cls not in index:
                raise DataError(f"VOC: {xml_path} names class {cls!r}, not one of {', '.join(classes)}")
            if keep_difficult or not difficult:
                cats.append(index[cls])
        image_path = base / "JPEGImages" / (filename or f"{image_id}.jpg")
        if not image_path.is_file():
            raise DataError(f"VOC: image {image_path} (of {xml_path}) does not exist")
        items.append((str(image_path), image_path))
        rows.append(cats)
    images = decode_images(items, channels=3, size=size, desc=f"{name}-{image_set}")
    return ImageSet(images, label_matrix(rows, len(classes)), tuple(classes), f"{name}-{image_set}",
                    {"source": str(base), "format": "voc", "ids": ids})


def load_voc_splits(root: str | Path, train: str = "trainval", test: str = "test", *,
                    size: int | Sequence[int] | None = None, keep_difficult: bool = True) -> Splits:
    """Train and test image sets of one VOC year folder (e.g. VOC2007 trainval / test)."""
    kw = {"size": size, "keep_difficult": keep_difficult}
    return Splits(load_voc(root, train, **kw), load_voc(root, test, **kw))
