"""`cleanbackdoor audit` end to end on digits with planted label flips, and its input errors."""

import json

import numpy as np
import pytest

from cleanbackdoor.audit import label_patterns, read_labels
from cleanbackdoor.cli import main
from cleanbackdoor.data import load_dataset
from cleanbackdoor.errors import DataError


@pytest.fixture(scope="module")
def train():
    return load_dataset("digits").train


def test_audit_finds_planted_flips_and_their_pattern(train, tmp_path, monkeypatch):
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))
    labels = train.labels.copy()
    nines = np.flatnonzero(labels == 9)
    planted = np.random.default_rng(0).choice(nines, 25, replace=False)
    labels[planted] = 4
    names = [train.class_names[k] for k in labels]
    (tmp_path / "labels.csv").write_text("label\n" + "\n".join(names) + "\n")  # received as class names
    out = tmp_path / "report"
    assert main(["audit", "digits", "--labels", str(tmp_path / "labels.csv"), "--out", str(out), "--quiet",
                 "--top", "20", "--set", "train.preset=digits", "--set", "train.epochs=30",
                 "--defense", "spectral", "--defense", "activation_clustering",
                 "--defense", '{name = "confident_learning", folds = 3}']) == 0
    for name in ("report.md", "report.html", "audit.json", "suspicious.png", "scores.npz"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "audit.json").read_text())
    top = [r["index"] for r in summary["most_suspicious"]]
    assert len(top) == 20 and all((out / "thumbs" / f"{i}.png").is_file() for i in top)
    assert len(set(top) & set(planted.tolist())) >= 15  # most of the top 20 are the planted flips
    # the label pattern: given 4, predicted 9, holding (nearly) all of class 4's suspected changes
    first = summary["patterns"][0]
    assert (first["given"], first["predicted"]) == ("4", "9")
    assert first["count"] >= 10 and first["share_of_given_flags"] >= 0.8
    assert set(first["members"]) <= set(planted.tolist())
    assert (out / first["grid"]).is_file()
    md = (out / "report.md").read_text()
    assert "| 4 | 9 |" in md and "thumbs/" in md
    assert "<table" in (out / "report.html").read_text()


def test_label_patterns_tell_a_tight_cluster_from_a_spread_one():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(400, 4)) * 3
    given = np.repeat(np.arange(4), 100)
    predicted = given.copy()
    suspect = np.zeros(400, bool)
    tight = np.arange(0, 12)  # class-0 examples packed together, predicted 1
    emb[tight] = 0.05 * rng.normal(size=(12, 4)) + 20
    spread = np.arange(200, 230)  # class-2 examples where they were, predicted 3
    for idx, p in ((tight, 1), (spread, 3)):
        predicted[idx] = p
        suspect[idx] = True
    pats = {(p["given"], p["predicted"]): p for p in label_patterns(given, predicted, suspect, emb, "abcd")}
    assert pats[("a", "b")]["tight_clusters"] == 1 and pats[("a", "b")]["clusters"][0]["size"] == 12
    assert pats[("c", "d")]["tight_clusters"] == 0 and pats[("c", "d")]["tightness"] > 0.6
    assert pats[("a", "b")]["share_of_given_flags"] == 1.0


def test_label_files(train, tmp_path):
    n = len(train)
    np.save(tmp_path / "ok.npy", train.labels)
    assert np.array_equal(read_labels(tmp_path / "ok.npy", train), train.labels)
    (tmp_path / "ok.json").write_text(json.dumps({"labels": [int(v) for v in train.labels]}))
    assert np.array_equal(read_labels(tmp_path / "ok.json", train), train.labels)
    multi = np.zeros((n, 10), np.uint8)
    multi[np.arange(n), train.labels] = 1
    np.save(tmp_path / "multi.npy", multi)
    assert read_labels(tmp_path / "multi.npy", train).shape == (n, 10)
    (tmp_path / "multi.json").write_text(json.dumps([[int(v), 0] for v in train.labels]))
    assert read_labels(tmp_path / "multi.json", train)[:, 0].all()
    np.save(tmp_path / "short.npy", train.labels[:-1])
    (tmp_path / "bad.csv").write_text("\n".join(["3"] * (n - 1) + ["eleven"]))
    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "labels.xml").write_text("<x/>")
    for name, message in [("short.npy", "1256 labels for 1257 images"), ("bad.csv", "no class 'eleven'"),
                          ("bad.json", "not valid JSON"), ("labels.xml", "unknown format"),
                          ("missing.npy", "does not exist")]:
        with pytest.raises(DataError, match=message):
            read_labels(tmp_path / name, train)


@pytest.mark.parametrize("argv, message", [
    (["audit", "imagenet-nowhere"], "neither a dataset name"),
    (["audit", "digits", "--defense", "strip"], "scores test inputs"),
    (["audit", "digits", "--defense", "nope"], "unknown defense 'nope'"),
    (["audit", "digits", "--top", "0"], "--top"),
])
def test_audit_input_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_two_detectors_of_one_name_both_report(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report"
    assert main(["audit", "digits", "--out", str(out), "--quiet", "--set", "train.epochs=3",
                 "--defense", "spectral", "--defense", '{name = "spectral", epsilon = 0.3}']) == 0
    detectors = json.loads((out / "audit.json").read_text())["detectors"]
    assert set(detectors) == {"spectral", "spectral-2"}
    assert detectors["spectral"] != detectors["spectral-2"]  # two settings, two results
    assert list((tmp_path / "cache" / "audit").glob("model-*.pt"))  # the audit model went into the cache
