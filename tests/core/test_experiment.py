"""End to end on real data (scikit-learn's digits): the default experiment must plant a working backdoor."""

import json
import tomllib

import numpy as np

from cleanbackdoor import cache
from cleanbackdoor.attacks import Poisoning
from cleanbackdoor.cli import main
from cleanbackdoor.config import load_config
from cleanbackdoor.experiment import finished_metrics
from cleanbackdoor.experiment.defense_table import experiment_key, reusable_run


def test_badnets_run_plants_a_backdoor(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["run", "--attack", "badnets", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "poisoned model" in printed and "clean model" in printed
    m = json.loads((out / "metrics.json").read_text())
    for key in ("attack", "dataset", "budget", "poisoned_examples", "clean_accuracy", "attack_success_rate",
                "clean_model", "seconds"):
        assert key in m
    # the acceptance: ASR >= 90% with CTA within 3 points of the clean model
    assert m["attack_success_rate"] >= 0.90
    assert m["clean_model"]["attack_success_rate"] < 0.2  # the clean model ignores the trigger
    # without the trigger the victim keeps the source images' classes: the trigger does the work
    assert m["asr_without_trigger"] < 0.05 and m["clean_model"]["asr_without_trigger"] < 0.05
    assert "ASR-noT" in printed
    assert m["clean_accuracy"] >= m["clean_model"]["clean_accuracy"] - 0.03
    assert set(m["seconds"]) >= {"data", "attack", "victim", "clean_model"}
    for name in ("config.toml", "poisoning.npz", "poisoning.json", "examples.png", "log.txt", "model.pt"):
        assert (out / name).exists(), name
    cfg = tomllib.loads((out / "config.toml").read_text())
    assert cfg["attack"]["name"] == "badnets"
    p = Poisoning.load(out, image_shape=(1, 8, 8))
    assert p.mask.sum() == m["poisoned_examples"]
    assert np.all(p.labels[p.mask] == m["target"])

    # the second run with the same recipe reuses the cached clean model and reproduces the poisoning exactly
    out2 = tmp_path / "run2"
    assert main(["run", "--attack", "badnets", "--out", str(out2), "--quiet"]) == 0
    assert "loaded from cache" in (out2 / "log.txt").read_text()
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["clean_model"] == m["clean_model"]
    assert np.array_equal(Poisoning.load(out2).labels, p.labels)


def test_a_failing_run_leaves_the_earlier_result_intact(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    fast = ["run", "--attack", "badnets", "--out", str(out), "--quiet", "--set", "train.epochs=1"]
    assert main([*fast, "--set", "examples=0"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*fast, "--set", "attack.budget=5000"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    assert main(["run", "--attack", "badnets", "--out", str(other), "--quiet", "--set", "train.epochs=1"]) == 2
    assert (other / "thesis.tex").exists()


def test_a_finished_run_is_read_back_only_under_the_code_versions_that_wrote_it(tmp_path, monkeypatch):
    """Sweeps, `reproduce` and the defense table read finished runs back instead of running them again; a run
    written before a change to an algorithm (a bumped cache version) must run again."""
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["run", "--attack", "badnets", "--out", str(out), "--quiet", "--set", "train.epochs=1",
                 "--set", "examples=0"]) == 0
    cfg = load_config(out / "config.toml")
    assert json.loads((out / "metrics.json").read_text())["code_versions"] == cache.VERSIONS
    assert finished_metrics(cfg) is not None and reusable_run(cfg) == out
    key = experiment_key(cfg)
    monkeypatch.setitem(cache.VERSIONS, "clean", cache.VERSIONS["clean"] + 1)
    assert finished_metrics(cfg) is None and reusable_run(cfg) is None
    assert experiment_key(cfg) != key
