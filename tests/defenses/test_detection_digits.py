"""Every detector on real data (digits) with a blatant planted poisoning, and on clean data.

One victim per poisoning is trained once for the module (the `digits` recipe shortened to 15 epochs, ~4 s each).
"""

import numpy as np
import pytest

from cleanbackdoor.attacks import build_attack
from cleanbackdoor.config import load_config
from cleanbackdoor.data import ImageSet, load_dataset
from cleanbackdoor.defenses import DefenseContext, build_defense, detection_metrics
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.experiment import train_model


@pytest.fixture(scope="module")
def digits():
    cfg = load_config(None, ["progress=false"], **{"train.preset": "digits", "train.epochs": 15})
    return cfg, load_dataset("digits")


def _victim(cfg, train, attack, params):
    poisoning = build_attack(attack, params).poison(train, seed=0)
    images, targets = poisoning.apply(train)
    model = train_model(cfg, train, images, targets, desc="victim")
    return ImageSet(images, targets, train.class_names), model, poisoning


@pytest.fixture(scope="module")
def flipped(digits):
    """A third of the nines relabelled 4 (random flips at a high rate)."""
    cfg, splits = digits
    return _victim(cfg, splits.train, "random_flip", {"target": 4, "sources": [9], "budget": 40})


@pytest.fixture(scope="module")
def badnets(digits):
    cfg, splits = digits
    return _victim(cfg, splits.train, "badnets", {"budget": 0.1})


def _context(cfg, splits, tmp_path):
    return DefenseContext(model=cfg.model, train=cfg.train, reference=splits.test.images[:250],
                          cache_dir=tmp_path)


@pytest.mark.parametrize("name, params", [
    ("spectral", {}),
    ("activation_clustering", {}),
])
def test_training_set_detectors_find_planted_label_flips(name, params, digits, flipped, tmp_path):
    cfg, splits = digits
    data, model, poisoning = flipped
    det = build_defense(name, params).detect(data, model, seed=0, context=_context(cfg, splits, tmp_path))
    m = detection_metrics(det.scores, det.flagged, poisoning.mask)
    assert det.scores.shape == (len(data),) and np.isfinite(det.scores).all()
    assert m["roc_auc"] > 0.8, m
    assert m["true_positives"] > 0


def test_confident_learning_finds_planted_label_flips(digits, tmp_path):
    """Cross-validation only: no victim needed. 15 nines relabelled 4 (a rate a cross-validated model does not
    learn as a rule: at a third of the class it starts predicting 4 for those nines, see
    docs/attacks/flip_history.md)."""
    cfg, splits = digits
    train = splits.train
    poisoning = build_attack("random_flip", {"target": 4, "sources": [9], "budget": 15}).poison(train, seed=0)
    data = ImageSet(train.images, poisoning.labels, train.class_names)
    det = build_defense("confident_learning", {"folds": 3, "epochs": 30}).detect(
        data, None, seed=0, context=_context(cfg, splits, tmp_path))
    m = detection_metrics(det.scores, det.flagged, poisoning.mask)
    assert m["roc_auc"] > 0.8 and m["recall"] > 0.3, m


def test_strip_separates_triggered_from_clean_test_inputs(digits, badnets, tmp_path):
    cfg, splits = digits
    _, model, poisoning = badnets
    test = splits.test
    clean = test.images[250:]
    triggered = poisoning.activation(clean[test.labels[250:] != poisoning.target])
    inputs = np.concatenate([clean, triggered])
    truth = np.r_[np.zeros(len(clean), bool), np.ones(len(triggered), bool)]
    det = build_defense("strip").detect(inputs, model, seed=0, context=_context(cfg, splits, tmp_path))
    m = detection_metrics(det.scores, det.flagged, truth)
    assert m["roc_auc"] > 0.9 and m["recall"] > 0.5, m
    assert det.flagged[:len(clean)].mean() < 0.1  # false rejection rate near the 1% asked for
    with pytest.raises(ConfigError, match="held-out"):
        build_defense("strip").detect(inputs, model, context=DefenseContext())


def test_cross_validated_probabilities_are_cached_and_deterministic(digits, flipped, tmp_path):
    cfg, splits = digits
    data, model, _ = flipped
    ctx = _context(cfg, splits, tmp_path)
    cl = build_defense("confident_learning", {"folds": 2, "epochs": 3})
    a = cl.detect(data, model, seed=0, context=ctx)
    assert list((tmp_path / "defenses").glob("cv-*.npz"))
    b = cl.detect(data, model, seed=0, context=ctx)  # from the cache
    assert np.array_equal(a.scores, b.scores) and np.array_equal(a.flagged, b.flagged)
    probs = a.diagnostics["probabilities"]
    assert probs.shape == (len(data), 10) and np.allclose(probs.sum(1), 1)


@pytest.mark.parametrize("name", ["spectral", "activation_clustering", "confident_learning"])
def test_scores_on_clean_data_have_the_right_shape_and_no_nan(name, digits, tmp_path):
    cfg, splits = digits
    train = splits.train
    model = train_model(cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 5})}), train,
                        train.images, train.labels, desc="clean") if name != "confident_learning" else None
    params = {"probabilities": "cross_val", "folds": 2, "epochs": 3} if name == "confident_learning" else {}
    if name == "activation_clustering":
        params = {"analysis": "size"}
    det = build_defense(name, params).detect(train, model, seed=0, context=_context(cfg, splits, tmp_path))
    assert det.scores.shape == (len(train),) and det.flagged.shape == (len(train),)
    assert np.isfinite(det.scores).all()


def test_a_defense_that_needs_a_model_says_so(digits):
    _, splits = digits
    with pytest.raises(ConfigError, match="needs a model"):
        build_defense("spectral").detect(splits.train, None)
