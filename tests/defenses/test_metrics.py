"""Detection figures on hand-checked cases."""

import math

import numpy as np
import pytest

from cleanbackdoor.defenses import Detection, detection_metrics, roc_auc


def test_detection_metrics_on_a_hand_made_case():
    scores = np.array([0.9, 0.8, 0.1, 0.4])
    flagged = np.array([True, True, False, False])
    truth = np.array([True, False, False, True])
    m = detection_metrics(scores, flagged, truth)
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5
    # positives 0.9, 0.4 against negatives 0.8, 0.1: (0.9>0.8) (0.9>0.1) (0.4<0.8) (0.4>0.1) -> 3 of 4 pairs
    assert m["roc_auc"] == 0.75
    assert (m["flagged"], m["true_positives"], m["positives"], m["examples"]) == (2, 1, 2, 4)


def test_roc_auc_counts_ties_as_half_and_is_nan_when_undefined():
    assert roc_auc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5
    assert roc_auc(np.array([0.0, 1.0]), np.array([False, True])) == 1.0
    assert roc_auc(np.array([0.0, 1.0]), np.array([True, False])) == 0.0
    assert math.isnan(roc_auc(np.array([0.0, 1.0]), np.array([False, False])))


def test_nothing_flagged_or_nothing_poisoned():
    m = detection_metrics(np.zeros(3), np.zeros(3, bool), np.array([True, False, False]))
    assert math.isnan(m["precision"]) and m["recall"] == 0.0
    m = detection_metrics(np.arange(3.0), np.array([True, False, False]), np.zeros(3, bool))
    assert m["precision"] == 0.0 and math.isnan(m["recall"]) and math.isnan(m["roc_auc"])


def test_detection_rejects_bad_shapes_and_nan():
    with pytest.raises(ValueError, match="one length"):
        Detection("x", np.zeros(3), np.zeros(2, bool))
    with pytest.raises(ValueError, match="not finite"):
        Detection("x", np.array([0.0, np.nan]), np.zeros(2, bool))
