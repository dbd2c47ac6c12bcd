"""Confident learning: flag the examples whose given label disagrees with out-of-sample predictions.

Paper: C. G. Northcutt, L. Jiang, I. L. Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels",
JAIR 2021; implemented by cleanlab (``cleanlab.filter.find_label_issues``), which this module calls rather than
rewrites. Multi-label sets use cleanlab's multi-label mode (``cleanlab.multilabel_classification``; Thyagarajan
et al., "Identifying Incorrect Annotations in Multi-Label Classification Data", 2023).

Algorithm: obtain *out-of-sample* predicted probabilities for every training example by K-fold cross-validation
(each fold is predicted by a model trained on the other folds, so a model never sees the label it judges), then
let cleanlab estimate the joint distribution of given and true labels (the confident joint) and prune the
examples most likely mislabelled (``filter_by``, cleanlab's default ``prune_by_noise_rate``). The score is
1 - cleanlab's label quality score (``rank_by``, default self-confidence: the out-of-sample probability of the
given label).

Threat model of the defense: the defender holds the training set and can train the victim's architecture on
parts of it. A label-only attack changes labels, which is exactly what confident learning looks for; an attack
that keeps labels correct (hidden trigger) should be invisible to it.

Arguments (``ConfidentLearningParams``):
    folds: K of the cross-validation (default 4; at least 2).
    probabilities: "cross_val" (default: K models of the victim's architecture and recipe) or "features"
        (K-fold logistic regression on the given model's penultimate features: cheap, but those features were
        learned from the labels under audit, so they may have memorized the poisoned labels; single-label only).
    epochs: epochs of each cross-validation model (default: the victim recipe's).
    filter_by: cleanlab's pruning method (default "prune_by_noise_rate").
    rank_by: cleanlab's label quality score for the ranking (default "self_confidence").
    retrain: retrain without the flagged examples in an experiment (default True).

Shapes: ``data`` an ImageSet with labels (N,) or (N, K); returns scores (N,) and flagged (N,); the
out-of-sample probabilities (N, K) are returned in the detection's ``diagnostics["probabilities"]`` (the audit reads
them).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field
from torch import nn

from cleanbackdoor.data.imageset import ImageSet
from cleanbackdoor.defenses.base import Defense, DefenseContext, Detection, FilterParams
from cleanbackdoor.defenses.internal import cross_val_probabilities, feature_probabilities, penultimate_features
from cleanbackdoor.errors import ConfigError

FilterBy = Literal["prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given",
                   "low_normalized_margin", "low_self_confidence"]


class ConfidentLearningParams(FilterParams):
    folds: int = Field(4, ge=2, le=20, description="K of the K-fold cross-validation")
    probabilities: Literal["cross_val", "features"] = Field(
        "cross_val", description="out-of-sample probabilities from cross_val (K victim models) or features "
                                 "(logistic regression on the model's features)")
    epochs: int | None = Field(None, ge=1, description="epochs of each cross-validation model; None: the victim "
                                                       "recipe's")
    filter_by: FilterBy = Field("prune_by_noise_rate", description="cleanlab's pruning method (find_label_issues' "
                                                                   "filter_by)")
    rank_by: Literal["self_confidence", "normalized_margin", "confidence_weighted_entropy"] = Field(
        "self_confidence", description="cleanlab's label quality score behind the ranking (score = 1 - quality)")


def label_issues(labels: np.ndarray, probs: np.ndarray, *, filter_by: str = "prune_by_noise_rate",
                 rank_by: str = "self_confidence") -> tuple[np.ndarray, np.ndarray]:
    """cleanlab on out-of-sample ``probs``: (issue mask (N,), score (N,) = 1 - label quality)."""
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        raise ConfigError("defense 'confident_learning' needs cleanlab: "
                          "pip install 'cleanbackdoor[defenses]'") from None
    labels = np.asarray(labels)
    if labels.ndim == 1:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores

        probs = probs / probs.sum(1, keepdims=True)
        mask = find_label_issues(labels, probs, filter_by=filter_by, n_jobs=1)
        quality = get_label_quality_scores(labels, probs, method=rank_by)
    else:
        from cleanlab.multilabel_classification.filter import find_label_issues as find_ml
        from cleanlab.multilabel_classification.rank import get_label_quality_scores as quality_ml

        as_lists = [list(np.flatnonzero(row)) for row in labels]
        mask = find_ml(as_lists, probs, filter_by=filter_by, n_jobs=1)
        quality = quality_ml(as_lists, probs, method=rank_by)
    return np.asarray(mask, dtype=bool), 1.0 - np.asarray(quality, dtype=np.float64)


class ConfidentLearning(Defense):
    name = "confident_learning"
    Params = ConfidentLearningParams

    @property
    def needs_model(self) -> bool:  # type: ignore[override]
        return self.params.probabilities == "features"

    def detect(self, data: ImageSet, model: nn.Module | None = None, *, seed: int = 0,
               context: DefenseContext | None = None) -> Detection:
        self._check_inputs(data, model)
        p = self.params
        context = context or DefenseContext()
        if p.probabilities == "features":
            if data.multilabel:
                raise ConfigError("defense 'confident_learning': probabilities = 'features' is for single-label "
                                  "data; use 'cross_val' for label sets")
            features = penultimate_features(model, data.images, feature_cache=context.feature_cache)
            probs = feature_probabilities(features, data.labels, data.num_classes, folds=p.folds, seed=seed)
        else:
            probs = cross_val_probabilities(data, folds=p.folds, seed=seed, context=context, epochs=p.epochs)
        return self.detect_probabilities(data.labels, probs)

    def detect_probabilities(self, labels: np.ndarray, probs: np.ndarray) -> Detection:
        """The detection from given labels and out-of-sample probabilities (N, K)."""
        p = self.params
        mask, scores = label_issues(labels, probs, filter_by=p.filter_by, rank_by=p.rank_by)
        labels = np.asarray(labels)
        meta = {"out_of_sample_accuracy": float((probs.argmax(1) == labels).mean()) if labels.ndim == 1 else None}
        return Detection(self.name, scores, mask, None, meta, diagnostics={"probabilities": probs})
