"""``cleanbackdoor cache``: entries by kind, selection by kind and age, removal that spares what it does not know."""

import os
import time

import pytest

from cleanbackdoor import cache
from cleanbackdoor.cli import main
from cleanbackdoor.errors import ConfigError

LAYOUT = {
    "datasets/cifar10-jpg-0123.arrays-ab.npz": 100,
    "models/pretrained-aa.pt": 10,
    "models/pretrained-bb.ckpt": 20,
    "models/clean-cc.pt": 30,
    "models/notes.txt": 1,
    "features/features-dd.pt": 400,
    "flip/expert-ee.pt": 50,
    "flip/expert-ff.work/epoch-1.pt": 60,
    "flip/expert-ff.work/epoch-2.pt": 70,
    "defenses/spectral-gg.npz": 5,
    "audit/model-hh.pt": 6,
    "mine/keep.bin": 7,
    "README": 8,
}


@pytest.fixture
def root(tmp_path):
    for rel, size in LAYOUT.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
    old = time.time() - 10 * 86400
    os.utime(tmp_path / "features/features-dd.pt", (old, old))
    return tmp_path


def test_entries_have_the_kind_size_and_age_of_what_the_toolkit_wrote(root):
    found = {e.path.relative_to(root).as_posix(): e for e in cache.entries(root)}
    kinds = {rel: e.kind for rel, e in found.items()}
    assert kinds == {
        "datasets/cifar10-jpg-0123.arrays-ab.npz": "datasets", "models/pretrained-aa.pt": "pretrained",
        "models/pretrained-bb.ckpt": "checkpoints", "models/clean-cc.pt": "clean", "models/notes.txt": "other",
        "features/features-dd.pt": "features", "flip/expert-ee.pt": "flip", "flip/expert-ff.work": "checkpoints",
        "defenses/spectral-gg.npz": "defenses", "audit/model-hh.pt": "audit", "mine/keep.bin": "other",
        "README": "other"}
    assert found["flip/expert-ff.work"].size == 130  # a folder: its files summed
    assert cache.entries(root)[0].path.name == "features-dd.pt"  # oldest first
    assert cache.entries(root / "absent") == []


def test_select_by_kind_and_age_never_takes_other(root):
    found = cache.entries(root)
    assert {e.path.name for e in cache.select(found, ["checkpoints"])} == {"pretrained-bb.ckpt", "expert-ff.work"}
    assert len(cache.select(found, ["all"])) == len(found) - 3
    assert [e.path.name for e in cache.select(found, ["all"], older_than_days=5)] == ["features-dd.pt"]
    assert cache.select(found, ["datasets"], older_than_days=5) == []
    with pytest.raises(ConfigError, match="unknown cache kind 'zebra'"):
        cache.select(found, ["zebra"])
    with pytest.raises(ConfigError, match="days"):
        cache.select(found, ["all"], older_than_days=-1)


def test_cli_summarizes_and_clears(root, capsys):
    assert main(["cache", "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:4] for line in out.splitlines()[2:]}
    assert rows["features"] == ["1", "400", "B"] and rows["total"] == ["12", "767", "B"]
    assert rows["checkpoints"] == ["2", "150", "B"] and rows["other"] == ["3", "16", "B"]
    assert main(["cache", "--dir", str(root), "--clear", "features", "--clear", "checkpoints", "--dry-run"]) == 0
    assert "would remove 3 entries (550 B)" in capsys.readouterr().out
    assert (root / "flip/expert-ff.work").is_dir()  # a dry run removes nothing
    assert main(["cache", "--dir", str(root), "--clear", "all"]) == 0
    assert "removed 9 entries" in capsys.readouterr().out
    left = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert left == ["README", "mine/keep.bin", "models/notes.txt"]
    assert main(["cache", "--dir", str(root), "--clear", "zebra"]) == 2


def test_human_sizes():
    assert [cache.human(n) for n in (0, 1023, 1536, 5 * 1024**2, 3 * 1024**3)] == ["0 B", "1023 B", "1.5 KB",
                                                                                     "5.0 MB", "3.0 GB"]


def test_what_the_writers_name_is_what_the_cache_classifies(tmp_path):
    """The writers take their paths from this module's layout: a model file, its checkpoint and each folder are
    classified as the kind that wrote them."""
    for kind in ("pretrained", "clean"):
        path = cache.model_file(tmp_path, kind, "0123")
        assert cache.classify(path.parent.name, path.name) == kind
        assert cache.classify(path.parent.name, path.with_suffix(".ckpt").name) == "checkpoints"
    for folder in (cache.DATASETS, cache.FEATURES, cache.FLIP, cache.DEFENSES, cache.AUDIT):
        assert cache.classify(folder, "x-0123.pt") == folder
    with pytest.raises(ValueError, match="pretrained or clean"):
        cache.model_file(tmp_path, "victim", "0123")
