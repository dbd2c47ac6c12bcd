"""The core step of each detector on small synthetic cases where the answer is known."""

import numpy as np
import pytest

from cleanbackdoor.defenses import ActivationClustering, ConfidentLearning, SpectralSignatures, roc_auc
from cleanbackdoor.defenses.activation_clustering import two_clusters
from cleanbackdoor.defenses.confident_learning import label_issues
from cleanbackdoor.defenses.internal import label_groups
from cleanbackdoor.defenses.spectral import spectral_scores
from cleanbackdoor.defenses.strip import superimpose


def planted_features(seed=0, n=200, poisons=30, dim=16, shift=4.0):
    """Two classes of isotropic features; class 1 also holds ``poisons`` points shifted along one direction."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * n + poisons, dim))
    labels = np.r_[np.zeros(n, int), np.ones(n + poisons, int)]
    x[labels == 1] += 3.0
    truth = np.zeros(len(labels), bool)
    truth[2 * n:] = True
    x[truth, 0] += shift
    return x, labels, truth


def test_spectral_scores_are_squared_projections_on_the_top_direction():
    x = np.array([[2.0, 0.0], [-2.0, 0.0], [1.0, 0.1], [-1.0, -0.1]])
    s = spectral_scores(x)
    # the top singular direction is (almost) the first axis: scores ~ x0^2 after centring
    assert np.argsort(-s)[:2].tolist() in ([0, 1], [1, 0])
    assert np.allclose(s.sum(), np.linalg.svd(x - x.mean(0), compute_uv=False)[0] ** 2)


def test_spectral_flags_the_planted_points_per_class():
    x, labels, truth = planted_features(shift=6.0)
    det = SpectralSignatures(epsilon=0.1).detect_features(x, labels, 2)
    assert roc_auc(det.scores, truth) > 0.95
    # 1.5 * 0.1 * n_y flagged in every class, most of the planted points among them
    assert det.flagged[labels == 0].sum() == 30 and det.flagged[labels == 1].sum() == 34
    assert (det.flagged & truth).sum() >= 25


def test_two_clusters_separates_a_small_far_group():
    x, labels, truth = planted_features(shift=10.0)
    idx = np.flatnonzero(labels == 1)
    small, margin, sil = two_clusters(x[idx], seed=0)
    assert np.array_equal(small.astype(bool), truth[idx]) and sil > 0.3
    assert (margin[small == 1] > 0).all() and (margin[small == 0] < 0).all()


def test_activation_clustering_exclusionary_analysis_flags_clusters_reclassified_elsewhere():
    x, labels, truth = planted_features(shift=10.0)
    held_out_seen = []

    def reclassify(held_out):
        held_out_seen.append(held_out.copy())
        probs = np.zeros((len(labels), 2))
        probs[np.arange(len(labels)), labels] = 1.0
        probs[truth] = [1.0, 0.0]  # the planted points look like class 0 to a model that did not see them
        return probs

    det = ActivationClustering(components=5).detect_features(x, labels, 2, reclassify=reclassify)
    assert held_out_seen and held_out_seen[0][truth].all()  # the small clusters were held out
    assert np.array_equal(det.flagged, truth)
    assert det.metadata["classes_flagged"] == [1]
    assert roc_auc(det.scores, truth) == 1.0


def test_label_groups_single_and_multilabel():
    assert [(k, i.tolist()) for k, i in label_groups(np.array([1, 0, 1]), 3)] == [(0, [1]), (1, [0, 2])]
    ml = np.array([[1, 1, 0], [0, 1, 0]])
    assert [(k, i.tolist()) for k, i in label_groups(ml, 3)] == [(0, [0]), (1, [0, 1])]


def test_confident_learning_finds_planted_flips_single_label():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 3, size=300)
    probs = np.full((300, 3), 0.05)
    probs[np.arange(300), true] = 0.9
    given = true.copy()
    flips = rng.choice(300, 20, replace=False)
    given[flips] = (true[flips] + 1) % 3
    det = ConfidentLearning().detect_probabilities(given, probs)
    truth = np.zeros(300, bool)
    truth[flips] = True
    assert np.array_equal(det.flagged, truth)
    assert roc_auc(det.scores, truth) == 1.0


def test_confident_learning_multilabel_mode():
    rng = np.random.default_rng(1)
    true = (rng.random((300, 4)) < 0.4).astype(np.uint8)
    true[true.sum(1) == 0, 0] = 1
    probs = np.where(true == 1, 0.92, 0.06)
    given = true.copy()
    changed = rng.choice(300, 15, replace=False)
    given[changed, 3] = 1 - given[changed, 3]  # a category added or removed
    mask, scores = label_issues(given, probs)
    truth = np.zeros(300, bool)
    truth[changed] = True
    assert mask[truth].mean() >= 0.9 and mask[~truth].mean() <= 0.02
    assert roc_auc(scores, truth) > 0.95


def test_superimpose_saturates_or_averages():
    a = np.array([[[[200]]]], dtype=np.uint8)
    b = np.array([[[[100]]]], dtype=np.uint8)
    assert superimpose(a, b, "add").item() == 255
    assert superimpose(a, b, "average").item() == 150


@pytest.mark.parametrize("name, params, message", [
    ("spectral", {"epsilon": 0}, "epsilon"),
    ("spectral", {"epsilon": 0.5, "removal_factor": 2}, "90%"),
    ("spectral", {"eps": 0.1}, "eps: unknown key"),
    ("activation_clustering", {"reduce": "tsne"}, "reduce"),
    ("strip", {"frr": 0.7}, "frr"),
    ("strip", {"retrain": True}, "retrain: unknown key"),
    ("confident_learning", {"folds": 1}, "folds"),
    ("confident_learning", {"filter_by": "magic"}, "filter_by"),
])
def test_bad_parameters_are_config_errors(name, params, message):
    from cleanbackdoor.defenses import build_defense
    from cleanbackdoor.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        build_defense(name, params)
