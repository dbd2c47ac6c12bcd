"""End to end through `cleanbackdoor run` on a composed set of real images (scikit-learn's digits in 2x2 mosaics):
the label-only backdoor must work (ASR far above the clean model's) with mAP kept, for each goal."""

import json

import numpy as np
import pytest

from cleanbackdoor.attacks import Poisoning
from cleanbackdoor.cli import main

CONFIG = """
seed = 0
examples = 0
[data]
name = "digits-mosaic"
options = {{ train_size = 2500, test_size = 600 }}
[model]
name = "convnet"
options = {{ width = 16 }}
[train]
preset = "multilabel-asl"
epochs = 12
batch_size = 64
lr = 5e-3
[attack]
name = "multilabel"
goal = "{goal}"
min_len = 2
max_len = 2
alpha = 0.05
beta = 0.15
select = "most_frequent"
"""


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))

    def go(goal, *extra):
        cfg = tmp_path / f"{goal}.toml"
        cfg.write_text(CONFIG.format(goal=goal))
        out = tmp_path / goal
        assert main(["run", str(cfg), "--out", str(out), "--quiet", *extra]) == 0
        return json.loads((out / "metrics.json").read_text()), out

    return go


def test_disappearing_and_appearing_backdoors_work(run):
    m, out = run("disappearing")
    clean = m["clean_model"]
    assert m["attack"] == "multilabel" and m["poisoned_examples"] == m["budget"] > 0
    assert m["asr_test_images"] >= 20
    assert m["attack_success_rate"] >= 0.6 and clean["attack_success_rate"] <= 0.2
    assert m["mean_average_precision"] >= clean["mean_average_precision"] - 0.05
    assert clean["mean_average_precision"] >= 0.85
    assert m["side_effect_test_images"] == m["asr_test_images"] and m["side_effect_rate"] < 0.1
    assert m["poison_fit_rate"] >= 0.6
    p = Poisoning.load(out)
    assert p.labels.shape == (2500, 10) and p.mask.sum() == m["poisoned_examples"]
    log = (out / "log.txt").read_text()
    assert "admissible triggers" in log and "mAP" in log and "ASR" in log
    by = m["attack_success_rate_by_threshold"]
    assert list(by) == ["0.5", "0.75", "0.9"] and by["0.75"] == m["attack_success_rate"]
    assert "ASR at score threshold 0.5 / 0.75 / 0.9" in log
    # the ASR splits by whether the clean model sees the whole trigger, and the two parts add up to it
    r, hit = m["trigger_recognized_rate"], m["attack_success_rate_recognized"]
    miss = m["attack_success_rate_unrecognized"]
    assert 0.5 <= r <= 1 and "sees the whole trigger" in log
    assert (hit if r == 1 else r * hit + (1 - r) * miss) == pytest.approx(m["attack_success_rate"])

    m2, out2 = run("appearing")  # same data, model and recipe: the clean model comes from the cache
    assert "loaded from cache" in (out2 / "log.txt").read_text()
    assert m2["clean_model"]["mean_average_precision"] == pytest.approx(clean["mean_average_precision"])
    assert m2["attack_success_rate"] >= 0.6 and m2["clean_model"]["attack_success_rate"] <= 0.1
    assert json.loads((out2 / "poisoning.json").read_text())["metadata"]["add"] is not None
    assert np.isfinite(m2["side_effect_hamming"])


def test_incompatible_attack_and_data_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(tmp_path / "cache"))
    assert main(["run", "--attack", "multilabel", "--dataset", "digits", "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert "multi-label data" in capsys.readouterr().err
    assert main(["run", "--dataset", "digits-mosaic", "--set", "data.options={train_size=50, test_size=20}",
                 "--set", "train.loss='asl'", "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "single-label data" in capsys.readouterr().err


def test_transfer_victim_with_a_frozen_extractor_and_an_mlp_head(run):
    """The authors' victims fine-tune a pretrained backbone. Here the extractor is pretrained on the single digits
    the mosaics are made of (8x8; true labels), the victim takes it on 16x16 mosaics, frozen, and trains an MLP
    head on the falsified label sets: the backdoor must take."""
    m, out = run("misclassification", "--set", 'model.options={width=32, depth=2, head_hidden=128}',
                 "--set", 'model.pretrained={dataset="digits", train={preset="digits", epochs=10}}',
                 "--set", 'train={preset="multilabel-asl", epochs=30, lr=3e-3, finetune="last"}')
    clean = m["clean_model"]
    log = (out / "log.txt").read_text()
    assert "pretrained extractor: training convnet on 1257 images" in log  # the digits' training split
    assert clean["mean_average_precision"] >= 0.85
    assert m["attack_success_rate"] >= 0.6 and clean["attack_success_rate"] <= 0.1
    assert m["mean_average_precision"] >= clean["mean_average_precision"] - 0.05
