"""Multi-label loaders on small files written here in each format (VOC XML, COCO JSON, YOLO), and on coco128."""

import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from cleanbackdoor.data import load_coco, load_dataset, load_voc, load_yolo
from cleanbackdoor.data.coco import COCO_CLASSES, parse_coco_instances
from cleanbackdoor.data.voc import VOC_CLASSES, parse_voc_annotation
from cleanbackdoor.data.yolo import parse_yolo_labels
from cleanbackdoor.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))


def write_image(path, value, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


# -- VOC ----------------------------------------------------------------------------------------------------------
def voc_xml(filename, objects):
    objs = "".join(f"<object><name>{n}</name><pose>Unspecified</pose><difficult>{int(d)}</difficult>"
                   "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
                   for n, d in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>{filename}</filename>"
            f"<size><width>12</width><height>10</height><depth>3</depth></size>{objs}</annotation>").encode()


def make_voc(root):
    base = root / "VOCdevkit" / "VOC2007"
    samples = {"000005": [("chair", False), ("chair", True), ("person", False)],
               "000007": [("car", False)],
               "000009": [("horse", False), ("person", True)],
               "000012": [("car", False), ("dog", False)]}
    for i, (image_id, objects) in enumerate(samples.items()):
        (base / "Annotations").mkdir(parents=True, exist_ok=True)
        (base / "Annotations" / f"{image_id}.xml").write_bytes(voc_xml(f"{image_id}.jpg", objects))
        write_image(base / "JPEGImages" / f"{image_id}.jpg", 40 * i)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "ImageSets" / "Main" / "trainval.txt").write_text("000005\n000007\n000009\n")
    (base / "ImageSets" / "Main" / "test.txt").write_text("000012\n")
    return base


def test_voc_parses_labels_and_difficult(tmp_path):
    make_voc(tmp_path)
    s = load_voc(tmp_path / "VOCdevkit", "trainval")
    assert s.class_names == VOC_CLASSES and s.images.shape == (3, 10, 12, 3)
    c = VOC_CLASSES.index
    assert [set(np.flatnonzero(r)) for r in s.labels] == [{c("chair"), c("person")}, {c("car")},
                                                           {c("horse"), c("person")}]
    s = load_voc(tmp_path / "VOCdevkit", "trainval", keep_difficult=False, size=8)
    assert set(np.flatnonzero(s.labels[2])) == {c("horse")} and s.images.shape == (3, 8, 8, 3)
    splits = load_dataset("voc", root=tmp_path / "VOCdevkit")
    assert len(splits.train) == 3 and len(splits.test) == 1
    assert set(np.flatnonzero(splits.test.labels[0])) == {c("car"), c("dog")}


def test_voc_from_an_archive(tmp_path):
    make_voc(tmp_path / "src")
    archive = tmp_path / "VOCtrainval.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tmp_path / "src" / "VOCdevkit", arcname="VOCdevkit")
    assert load_dataset("voc", root=archive).train.labels.shape == (3, 20)


def test_voc_errors(tmp_path):
    base = make_voc(tmp_path)
    with pytest.raises(DataError, match="DOCTYPE"):
        parse_voc_annotation(b'<!DOCTYPE x [<!ENTITY a "aaaa">]><annotation/>')
    with pytest.raises(DataError, match="not valid XML"):
        parse_voc_annotation(b"<annotation><object>")
    (base / "Annotations" / "000007.xml").write_bytes(voc_xml("000007.jpg", [("unicorn", False)]))
    with pytest.raises(DataError, match="unicorn"):
        load_voc(base, "trainval")
    (base / "Annotations" / "000007.xml").write_bytes(voc_xml("missing.jpg", [("car", False)]))
    with pytest.raises(DataError, match="missing.jpg"):
        load_voc(base, "trainval")
    with pytest.raises(DataError, match="does not exist"):
        load_voc(tmp_path / "nowhere")


# -- COCO ---------------------------------------------------------------------------------------------------------
def coco_doc():
    return {
        "images": [{"id": 42, "file_name": "a.jpg", "width": 12, "height": 10},
                   {"id": 7, "file_name": "b.jpg", "width": 12, "height": 10},
                   {"id": 9, "file_name": "c.jpg", "width": 12, "height": 10}],
        "annotations": [{"id": 1, "image_id": 42, "category_id": 18, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0},
                        {"id": 2, "image_id": 42, "category_id": 1, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0},
                        {"id": 3, "image_id": 42, "category_id": 1, "bbox": [1, 1, 2, 2], "area": 4, "iscrowd": 1},
                        {"id": 4, "image_id": 9, "category_id": 3, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0}],
        "categories": [{"id": 3, "name": "car", "supercategory": "vehicle"},
                       {"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 18, "name": "dog", "supercategory": "animal"}],
    }


def make_coco(root, doc=None):
    (root / "annotations").mkdir(parents=True)
    for split in ("train2017", "val2017"):
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc or coco_doc()))
        for i, f in enumerate(("a.jpg", "b.jpg", "c.jpg")):
            write_image(root / split / f, 60 * i)


def test_coco_instances(tmp_path):
    make_coco(tmp_path)
    s = load_coco(tmp_path / "annotations" / "instances_train2017.json", tmp_path / "train2017")
    assert s.class_names == ("person", "car", "dog")  # ordered by category id: 1, 3, 18
    assert s.meta["ids"] == [42, 9]  # image 7 has no annotation: left out, as the authors' loader
    assert s.labels.tolist() == [[1, 0, 1], [0, 1, 0]]
    s = load_coco(tmp_path / "annotations" / "instances_train2017.json", tmp_path / "train2017", keep_empty=True)
    assert s.labels.tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0]]
    splits = load_dataset("coco", root=tmp_path, size=(6, 6))
    assert splits.test.images.shape == (2, 6, 6, 3)


def test_coco_errors(tmp_path):
    doc = coco_doc()
    doc["annotations"][0]["image_id"] = 5
    with pytest.raises(DataError, match="image id 5"):
        parse_coco_instances(doc)
    doc = coco_doc()
    doc["annotations"][0]["category_id"] = 99
    with pytest.raises(DataError, match="category id 99"):
        parse_coco_instances(doc)
    with pytest.raises(DataError, match="not a COCO"):
        parse_coco_instances({"images": []})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_coco(tmp_path / "bad.json", tmp_path)


# -- YOLO ---------------------------------------------------------------------------------------------------------
def make_yolo(root, with_val=False):
    for split in ("train", "val") if with_val else ("train",):
        for i in range(5):
            write_image(root / "images" / split / f"{i:03d}.jpg", 30 * i)
        (root / "labels" / split).mkdir(parents=True)
        (root / "labels" / split / "000.txt").write_text("0 0.5 0.5 0.2 0.2\n2 0.1 0.1 0.1 0.1\n0 0.3 0.3 0.1 0.1\n")
        (root / "labels" / split / "001.txt").write_text("1 0.5 0.5 0.2 0.2\n\n")
        (root / "labels" / split / "002.txt").write_text("")  # no objects
        (root / "labels" / split / "004.txt").write_text("2 0.5 0.5 0.2 0.2 0.6 0.6\n")  # a segment line
        # 003 has no label file at all


def test_yolo_folders(tmp_path):
    make_yolo(tmp_path)
    s = load_yolo(tmp_path, "train", classes=["cat", "dog", "kite"])
    assert s.labels.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 1]]
    assert s.class_names == ("cat", "dog", "kite")
    s = load_yolo(tmp_path, "train", keep_empty=False)
    assert s.meta["files"] == ["000.jpg", "001.jpg", "004.jpg"] and s.class_names == ("0", "1", "2")
    (tmp_path / "classes.txt").write_text("cat\ndog\nkite\nemu\n")
    assert load_yolo(tmp_path).class_names == ("cat", "dog", "kite", "emu")
    splits = load_dataset("yolo", root=tmp_path, test_fraction=0.4, seed=1)
    assert len(splits.train) == 3 and len(splits.test) == 2
    with_val = tmp_path / "v"
    make_yolo(with_val, with_val=True)
    assert len(load_dataset("yolo", root=with_val).test) == 5


def test_yolo_errors(tmp_path):
    assert parse_yolo_labels("3 0.1 0.2 0.3 0.4\n") == [3]
    with pytest.raises(DataError, match="f.txt:2"):
        parse_yolo_labels("0 0.1 0.1 0.1 0.1\ncat 0.1 0.1 0.1 0.1\n", "f.txt")
    with pytest.raises(DataError, match="cx cy"):
        parse_yolo_labels("0 0.1 0.1\n")
    make_yolo(tmp_path)
    with pytest.raises(DataError, match="class 2"):
        load_yolo(tmp_path, classes=["cat", "dog"])
    with pytest.raises(ConfigError, match="coco"):
        load_yolo(tmp_path, classes="voc")
    with pytest.raises(ConfigError, match="no option"):
        load_dataset("yolo", root=tmp_path, colour=1)


def test_coco128_real(shared_data):
    path = shared_data / "coco128.tar.gz"
    if not path.is_file():
        pytest.skip("coco128.tar.gz is not in the shared data")
    s = load_yolo(path, "train", classes="coco", size=32)
    assert s.images.shape == (128, 32, 32, 3) and s.class_names == COCO_CLASSES
    counts = s.labels.sum(axis=1)
    assert (counts >= 2).sum() == 101  # the archive's README: 101 images with 2+ classes
    assert (s.labels.sum(axis=0) > 0).sum() == 71  # 71 of the 80 classes present
    assert s.labels[:, COCO_CLASSES.index("person")].sum() > 30
    splits = load_dataset("yolo", root=path, classes="coco", size=32)
    assert len(splits.train) + len(splits.test) == 128


def test_coco_finds_other_split_names_and_drops_an_empty_placeholder_category(tmp_path):
    """A labelling tool's export: splits named train/test, and an empty category with id 0 that no image carries."""
    doc = coco_doc()
    doc["categories"].insert(0, {"id": 0, "name": "objects", "supercategory": "none"})
    (tmp_path / "annotations").mkdir()
    for split in ("train", "test"):
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
        for i, f in enumerate(("a.jpg", "b.jpg", "c.jpg")):
            write_image(tmp_path / split / f, 60 * i)
    splits = load_dataset("coco", root=tmp_path, size=(6, 6))
    assert splits.train.class_names == ("person", "car", "dog")
    assert splits.train.labels.tolist() == [[1, 0, 1], [0, 1, 0]]
    assert "left out: objects" in splits.train.meta["notes"][0]
    assert load_dataset("voc2007-coco", root=tmp_path).train.images.shape == (2, 64, 64, 3)
    # split names that are not there: the error names the files it looked for and those it found
    with pytest.raises(DataError, match=r"looked for annotations/instances_\{trn,tst\}.json"):
        load_dataset("coco", root=tmp_path, train="trn", test="tst", size=(6, 6))
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match=r"instances_\{train2017,val2017\}.json or .*instances_\{train,test\}"):
        load_dataset("coco", root=tmp_path / "other", size=(6, 6))
    (tmp_path / "annotations" / "instances_test.json").unlink()
    with pytest.raises(DataError, match="it has: instances_train.json"):
        load_dataset("coco", root=tmp_path, size=(6, 6))


def test_coco_joins_splits_named_with_a_plus(tmp_path):
    """test = "val+test": both splits, val's images first, with their image ids; a missing part is named."""
    doc = coco_doc()
    (tmp_path / "annotations").mkdir()
    for split, value in (("train", 0), ("val", 100), ("test", 200)):
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
        for i, f in enumerate(("a.jpg", "b.jpg", "c.jpg")):
            write_image(tmp_path / split / f, value + 20 * i)
    splits = load_dataset("coco", root=tmp_path, train="train", test="val+test", size=(6, 6))
    assert len(splits.train) == 2 and len(splits.test) == 4
    assert splits.test.labels.tolist() == splits.train.labels.tolist() * 2
    assert splits.test.images[:, 0, 0, 0].tolist() == [100, 140, 200, 240]  # b.jpg has no object
    assert len(splits.test.meta["ids"]) == 4
    with pytest.raises(DataError, match=r"instances_\{train,val\+tst\}.json; it has: instances_test.json"):
        load_dataset("coco", root=tmp_path, train="train", test="val+tst", size=(6, 6))
