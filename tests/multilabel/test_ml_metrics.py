"""cleanbackdoor.multilabel_metrics: AP/mAP by hand, the decision rule, the ASR of each goal, the side effect, the fit
rate, and scores through cached frozen features."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from cleanbackdoor.models import build_model
from cleanbackdoor.multilabel_metrics import (
    BackdoorSpec,
    attack_success_rate,
    average_precision,
    backdoor_report,
    fit_rate,
    hamming_side_effect,
    mean_average_precision,
    multilabel_scores,
    predict_labels,
    side_effect,
    trigger_recognition,
)


def test_average_precision_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([1, 0, 1, 0, 1])
    # positives at ranks 1, 3, 5: precisions 1/1, 2/3, 3/5
    assert average_precision(scores, labels) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert average_precision(scores, np.ones(5)) == 1.0
    assert np.isnan(average_precision(scores, np.zeros(5)))
    # ties: ranked by index (stable), so a positive tied after a negative gets the lower precision
    assert average_precision(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)


def test_map_skips_categories_without_positives_and_matches_sklearn():
    scores = np.array([[0.9, 0.1, 0.3], [0.8, 0.7, 0.2], [0.7, 0.2, 0.9], [0.6, 0.3, 0.1], [0.5, 0.9, 0.4]])
    labels = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0]])
    ap0 = (1 + 2 / 3 + 3 / 5) / 3
    ap1 = 1.0  # class 1 ranks images 4, 1, 3, 2, 0: its positives 4 and 1 come first
    # class 2 has no positive image: left out of the mean
    assert mean_average_precision(scores, labels) == pytest.approx((ap0 + ap1) / 2)
    rng = np.random.default_rng(0)
    s = rng.random((200, 5))
    y = (rng.random((200, 5)) < 0.3).astype(np.uint8)
    ours = mean_average_precision(s, y)
    assert ours == pytest.approx(np.mean([average_precision_score(y[:, k], s[:, k]) for k in range(5)]))


def test_decision_rule_threshold_and_top_k():
    scores = np.array([[0.9, 0.8, 0.76, 0.75, 0.1], [0.2, 0.99, 0.99, 0.3, 0.95]])
    assert predict_labels(scores).tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 0, 1]]  # strictly above 0.75
    assert predict_labels(scores, top_k=2).tolist() == [[1, 1, 0, 0, 0], [0, 1, 1, 0, 0]]
    assert predict_labels(scores, top_k=1).tolist() == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]]  # tie: lower index
    assert predict_labels(scores, threshold=0.5, top_k=10).tolist() == [[1, 1, 1, 1, 0], [0, 1, 1, 0, 1]]


# four test images over classes 0..3; trigger {0, 1}
LABELS = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1], [1, 0, 0, 0]])
PRED = np.array([[0, 1, 0, 1], [1, 1, 1, 1], [0, 1, 0, 1], [1, 0, 0, 1]])


def test_asr_of_each_goal_by_hand():
    dis = BackdoorSpec((0, 1), "disappearing", remove=0)
    assert dis.eligible(LABELS).tolist() == [True, True, True, False]
    assert attack_success_rate(PRED, LABELS, dis) == pytest.approx(2 / 3)  # images 0 and 2 lost class 0
    app = BackdoorSpec((0, 1), "appearing", add=3)
    assert app.eligible(LABELS).tolist() == [True, True, False, False]  # image 2 already has 3
    assert attack_success_rate(PRED, LABELS, app) == 1.0
    mis = BackdoorSpec((0, 1), "misclassification", remove=0, add=3)
    assert attack_success_rate(PRED, LABELS, mis) == pytest.approx(1 / 2)  # image 0 yes, image 1 keeps class 0
    none = BackdoorSpec((2, 3), "disappearing", remove=2)
    assert np.isnan(attack_success_rate(PRED, LABELS, none))
    with pytest.raises(ValueError, match="add"):
        BackdoorSpec((0, 1), "appearing")


def test_side_effect_counts_only_non_target_labels():
    clean = np.array([[1, 1, 0, 0], [1, 1, 1, 0]])
    backdoor = np.array([[0, 1, 0, 1], [0, 0, 1, 1]])
    assert hamming_side_effect(clean, backdoor) == pytest.approx((2 + 3) / 2)
    assert hamming_side_effect(clean, backdoor, exclude=(0, 3)) == pytest.approx((0 + 1) / 2)


def test_report_fields():
    scores = np.where(PRED == 1, 0.9, 0.1)
    r = backdoor_report(scores, LABELS, BackdoorSpec((0, 1), "misclassification", remove=0, add=3))
    assert r["attack_success_rate"] == pytest.approx(0.5)
    assert r["removed_not_predicted_rate"] == pytest.approx(0.5) and r["added_predicted_rate"] == 1.0
    assert r["asr_test_images"] == 2 and r["trigger_test_images"] == 3
    assert r["removed_predicted_without_trigger"] == 1.0  # image 3 has class 0 and no trigger: predicted
    assert r["added_predicted_without_trigger"] == 1.0
    assert len(r["average_precision_per_class"]) == 4 and r["threshold"] == 0.75


def test_asr_by_threshold_reads_the_scores_at_each_threshold():
    labels = np.array([[1, 1, 0, 0]] * 3 + [[0, 0, 0, 0]])
    scores = np.array([[0.9, 0.9, 0.1, 0.6], [0.9, 0.9, 0.1, 0.8], [0.9, 0.9, 0.1, 0.95], [0.1, 0.1, 0.1, 0.1]])
    r = backdoor_report(scores, labels, BackdoorSpec((0, 1), "appearing", add=3, threshold=0.7))
    assert r["attack_success_rate_by_threshold"] == pytest.approx({"0.5": 1.0, "0.7": 2 / 3, "0.75": 2 / 3,
                                                                   "0.9": 1 / 3})
    assert r["attack_success_rate"] == r["attack_success_rate_by_threshold"]["0.7"]


def test_side_effect_and_fit_rate_from_scores_by_hand():
    """The side effect is measured on the eligible images only (0 and 1 here: image 2 has the added class 3, image
    3 lacks the trigger), over the non-target classes 1 and 2."""
    spec = BackdoorSpec((0, 1), "misclassification", remove=0, add=3)
    clean = np.array([[0.9, 0.9, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1], [0.9, 0.1, 0.9, 0.9], [0.1, 0.1, 0.1, 0.1]])
    backdoor = np.array([[0.1, 0.9, 0.9, 0.9], [0.1, 0.1, 0.9, 0.1], [0.1, 0.9, 0.1, 0.1], [0.9, 0.9, 0.9, 0.9]])
    r = side_effect(clean, backdoor, LABELS, spec)
    assert r["side_effect_test_images"] == 2
    assert r["side_effect_hamming"] == pytest.approx((1 + 2) / 2) and r["side_effect_rate"] == pytest.approx(0.75)
    assert np.isnan(side_effect(clean, backdoor, LABELS, BackdoorSpec((2, 3), "disappearing", remove=2))[
        "side_effect_hamming"])
    # of the first three images, only image 0 has the goal (class 0 gone, class 3 there)
    assert fit_rate(backdoor[:3], spec) == pytest.approx(1 / 3)
    assert np.isnan(fit_rate(backdoor[:0], spec))


def test_trigger_recognition_splits_the_asr_by_what_the_clean_model_sees():
    """Disappearing of class 0 with trigger {0, 1}: images 0-3 have the trigger. The clean model sees both trigger
    classes on images 0, 1 and 2 (image 3: class 1 at 0.6, under the threshold); the backdoored model removes class
    0 on images 0 and 1 of those, and on image 3. Image 4 lacks the trigger and is not counted."""
    labels = np.array([[1, 1, 0]] * 4 + [[1, 0, 1]])
    clean = np.array([[0.9, 0.9, 0.1], [0.8, 0.9, 0.1], [0.9, 0.8, 0.1], [0.9, 0.6, 0.1], [0.1, 0.1, 0.1]])
    backdoor = np.array([[0.1, 0.9, 0.1], [0.2, 0.9, 0.1], [0.9, 0.9, 0.1], [0.3, 0.6, 0.1], [0.1, 0.1, 0.1]])
    r = trigger_recognition(clean, backdoor, labels, BackdoorSpec((0, 1), "disappearing", remove=0))
    assert r == pytest.approx({"trigger_recognized_rate": 3 / 4, "attack_success_rate_recognized": 2 / 3,
                               "attack_success_rate_unrecognized": 1.0})
    # at a threshold of 0.5 the clean model sees the trigger on all four: nothing is left unrecognized
    r = trigger_recognition(clean, backdoor, labels, BackdoorSpec((0, 1), "disappearing", remove=0, threshold=0.5))
    assert r["trigger_recognized_rate"] == 1.0 and r["attack_success_rate_recognized"] == pytest.approx(3 / 4)
    assert np.isnan(r["attack_success_rate_unrecognized"])


def test_scores_through_cached_frozen_features_equal_the_whole_model(tmp_path):
    """With a feature cache the extractor runs once per set; the scores are the whole model's."""
    torch.manual_seed(0)
    model = build_model("convnet", (3, 12, 12), 4, width=8)
    images = np.random.default_rng(0).integers(0, 256, (30, 12, 12, 3), dtype=np.uint8)
    whole = multilabel_scores(model, images)
    calls = []
    inner = model.features
    model.features = lambda x: calls.append(len(x)) or inner(x)
    first = multilabel_scores(model, images, batch_size=16, feature_cache=tmp_path)
    again = multilabel_scores(model, images, batch_size=16, feature_cache=tmp_path)
    assert calls[:2] == [16, 14] and sum(calls[2:]) == 4  # then only the cache's check of its first images
    assert len(list(tmp_path.glob("*-plain/shard-*.pt"))) == 1
    np.testing.assert_allclose(first, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(again, first)
    with pytest.raises(ValueError, match="no images"):
        multilabel_scores(model, images[:0])
