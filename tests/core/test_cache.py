"""``cleanbackdoor cache``: entries by kind, selection by kind and age, removal that spares what it does not know."""

import os
import re
import time
from pathlib import Path

import pytest

import cleanbackdoor
from cleanbackdoor import cache
from cleanbackdoor.cli import main
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.pretrain import pretrain_key
from cleanbackdoor.specs import ModelConfig

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
    rows = {line.split()[0]: line.split()[1:5] for line in out.splitlines()[2:]}
    assert rows["features"] == [f"v{cache.VERSIONS['features']}", "1", "400", "B"]
    assert rows["total"] == ["-", "12", "767", "B"]
    assert rows["checkpoints"] == [f"v{cache.VERSIONS['checkpoints']}", "2", "150", "B"]
    assert rows["other"] == ["-", "3", "16", "B"]
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


def test_an_entry_key_holds_its_kind_and_the_kind_s_code_version(monkeypatch):
    key = cache.entry_key("clean", "inputs", 3)
    assert key == cache.entry_key("clean", "inputs", 3) != cache.entry_key("clean", "inputs", 4)
    assert key != cache.entry_key("audit", "inputs", 3)
    monkeypatch.setitem(cache.VERSIONS, "clean", cache.VERSIONS["clean"] + 1)  # a change to the algorithm
    assert cache.entry_key("clean", "inputs", 3) != key
    with pytest.raises(ValueError, match="unknown cache kind 'victim'"):
        cache.entry_key("victim", "inputs")
    assert cache.KINDS == tuple(cache.VERSIONS)  # `cleanbackdoor cache` lists the versioned kinds


def test_every_kind_s_keys_carry_its_version():
    """Each kind's version reaches the keys of what the toolkit writes under it: some module names the kind in
    ``entry_key("KIND", ...)`` or reads ``VERSIONS["KIND"]``. A kind that no key names would let a change to its
    algorithm reuse entries of the old code."""
    source = "\n".join(p.read_text() for p in Path(cleanbackdoor.__file__).parent.rglob("*.py")
                       if p.name != "cache.py")
    named = set(re.findall(r"entry_key\(\s*\"(\w+)\"", source))
    named |= set(re.findall(r"VERSIONS\[['\"](\w+)['\"]\]", source))
    assert named == set(cache.VERSIONS)


def test_the_pretrained_key_moves_with_its_version(monkeypatch):
    model = ModelConfig(name="convnet", options={"width": 8}, pretrained={"dataset": "digits"})
    key = pretrain_key(model)
    monkeypatch.setitem(cache.VERSIONS, "pretrained", cache.VERSIONS["pretrained"] + 1)
    assert pretrain_key(model) != key
