"""Multi-label figures: mAP, the attack success rate of each goal, and the side effect on other labels.

Definitions follow K. Chen et al., "Clean-image Backdoor: Attacking Multi-label Models with Poisoned Labels Only"
(ICLR 2023) and the authors' evaluation scripts (github kangjie-chen/clean-image_backdoor):

- **Scores** are sigmoid outputs, one per category. A category is **predicted** when its score is strictly above
  ``threshold`` (0.75, the authors' value) *and* it is among the ``top_k`` highest scores of the image (the
  authors use K = 8 on VOC, 20 on COCO; ``None`` means no top-K cap). Ties in the top-K ranking go to the lower
  category index.
- **AP** of one category: rank the images by score (descending; ties by image index), average the precision at
  the rank of every positive image (non-interpolated AP, as the authors' ``average_precision``). **mAP** is the
  mean over the categories that have at least one positive image. Deviation: the authors count a category
  without positives as AP 0; it is left out here (its AP is undefined), and reported as NaN per category.
- **Trigger images**: images whose label set contains every category of the trigger T.
- **ASR** among trigger images (and, for goals that add a category b, among those that lack b):
  *disappearing*: the removed category a is not predicted; *appearing*: b is predicted;
  *misclassification*: both at once.
- **Side effect**: on the same images, the mean Hamming distance between the clean and the backdoored model's
  predictions over the *non-target* categories (all but a and b), as the authors' ``coco_validate_on_poisoned_val``
  (which averages the count of differing labels per image). ``side_effect_rate`` divides it by the number of
  non-target categories.
- **Trigger recognition** (not in the paper): the trigger is a set of categories the model must *see*, so the
  backdoor fires reliably only where the extractor perceives every trigger category (elsewhere a goal is reached
  only by chance: a missed object is also a disappeared one). :func:`trigger_recognition` splits the goal's
  images by whether the *clean* model predicts every trigger category on them (at the same threshold and top-K),
  and gives the backdoored model's ASR on each part: the backdoor's own strength apart from the extractor's
  perception.

Everything here works on arrays, except :func:`multilabel_scores`, which runs a model on a set of images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from cleanbackdoor.training import predict_logits

Goal = Literal["disappearing", "appearing", "misclassification"]
GOALS: tuple[str, ...] = ("disappearing", "appearing", "misclassification")
DEFAULT_THRESHOLD = 0.75
ASR_THRESHOLDS = (0.5, 0.75, 0.9)  # the goal's ASR is also reported at these


# -- ranking figures ----------------------------------------------------------------------------------------
def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Non-interpolated AP of one category: mean precision at the ranks of the positives; NaN without positives."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    positives = int(labels.sum())
    if positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = labels[order]
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision_at[hits].sum() / positives)


def average_precisions(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AP of every category (K,), NaN for categories without a positive image."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be (N, classes)")
    return np.array([average_precision(scores[:, k], labels[:, k]) for k in range(labels.shape[1])])


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """mAP over the categories with at least one positive image (NaN when there is none)."""
    ap = average_precisions(scores, labels)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


# -- decisions ----------------------------------------------------------------------------------------------
def predict_labels(scores: np.ndarray, threshold: float = DEFAULT_THRESHOLD, top_k: int | None = None) -> np.ndarray:
    """0/1 predictions (N, K): score > threshold and within the image's ``top_k`` highest (ties: lower index)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (N, classes), got {scores.shape}")
    pred = scores > threshold
    if top_k is not None and top_k < scores.shape[1]:
        order = np.argsort(-scores, axis=1, kind="stable")
        in_top = np.zeros_like(pred)
        np.put_along_axis(in_top, order[:, :top_k], True, axis=1)
        pred &= in_top
    return pred.astype(np.uint8)


def contains_all(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Mask (N,) of the label sets that contain every one of ``classes``."""
    labels = np.asarray(labels)
    if len(classes) == 0:
        return np.ones(len(labels), dtype=bool)
    return labels[:, list(classes)].astype(bool).all(axis=1)


# -- the backdoor ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackdoorSpec:
    """What a multi-label backdoor does: on images containing ``trigger``, remove ``remove`` and/or add ``add``."""

    trigger: tuple[int, ...]
    goal: Goal
    remove: int | None = None
    add: int | None = None
    threshold: float = DEFAULT_THRESHOLD
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.goal not in GOALS:
            raise ValueError(f"unknown goal {self.goal!r}; allowed: {', '.join(GOALS)}")
        if self.goal in ("disappearing", "misclassification") and self.remove is None:
            raise ValueError(f"goal {self.goal!r} needs the category to remove")
        if self.goal in ("appearing", "misclassification") and self.add is None:
            raise ValueError(f"goal {self.goal!r} needs the category to add")

    @property
    def targets(self) -> tuple[int, ...]:
        return tuple(c for c in (self.remove, self.add) if c is not None)

    def eligible(self, labels: np.ndarray) -> np.ndarray:
        """Images the goal is measured on: they contain the trigger (and lack ``add`` where one is added)."""
        mask = contains_all(labels, self.trigger)
        if self.add is not None:
            mask &= np.asarray(labels)[:, self.add] == 0
        return mask

    def success(self, pred: np.ndarray) -> np.ndarray:
        """Per image (N,): the goal is reached in these 0/1 predictions."""
        pred = np.asarray(pred)
        ok = np.ones(len(pred), dtype=bool)
        if self.remove is not None:
            ok &= pred[:, self.remove] == 0
        if self.add is not None:
            ok &= pred[:, self.add] == 1
        return ok

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> BackdoorSpec:
        return cls(tuple(int(c) for c in metadata["trigger"]), metadata["goal"], metadata.get("remove"),
                   metadata.get("add"), float(metadata.get("threshold", DEFAULT_THRESHOLD)), metadata.get("top_k"))


def share(hits: np.ndarray) -> float:
    """The share of true (or 1) entries of ``hits``; NaN for none: a rate over no images is undefined."""
    return float(np.mean(hits)) if len(hits) else float("nan")


def attack_success_rate(pred: np.ndarray, labels: np.ndarray, spec: BackdoorSpec) -> float:
    """Share of the eligible images (see :meth:`BackdoorSpec.eligible`) on which the goal is reached; NaN if none."""
    return share(spec.success(np.asarray(pred)[spec.eligible(labels)]))


def hamming_side_effect(pred_clean: np.ndarray, pred_backdoor: np.ndarray, exclude: Sequence[int] = ()) -> float:
    """Mean number (per image) of non-excluded categories on which two 0/1 prediction matrices differ."""
    a, b = np.asarray(pred_clean), np.asarray(pred_backdoor)
    if a.shape != b.shape:
        raise ValueError(f"predictions {a.shape} and {b.shape} differ in shape")
    if len(a) == 0:
        return float("nan")
    keep = np.setdiff1d(np.arange(a.shape[1]), np.asarray(list(exclude), dtype=np.int64))
    return float((a[:, keep] != b[:, keep]).sum(axis=1).mean())


def backdoor_report(scores: np.ndarray, labels: np.ndarray, spec: BackdoorSpec) -> dict[str, Any]:
    """mAP (all test images, and those without the trigger) and the goal's ASR, from scores (N, K) in [0, 1]."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    pred = predict_labels(scores, spec.threshold, spec.top_k)
    has_trigger = contains_all(labels, spec.trigger)
    eligible = spec.eligible(labels)
    ap = average_precisions(scores, labels)
    asr = attack_success_rate(pred, labels, spec)
    out: dict[str, Any] = {
        "mean_average_precision": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
        "mean_average_precision_no_trigger": mean_average_precision(scores[~has_trigger], labels[~has_trigger]),
        "average_precision_per_class": [None if np.isnan(v) else float(v) for v in ap],
        "attack_success_rate": asr,
        "asr_test_images": int(eligible.sum()),
        "trigger_test_images": int(has_trigger.sum()),
        "threshold": spec.threshold,
        "top_k": spec.top_k,
        # the goal's ASR is a thresholded figure: where the scores sit shows at a glance (docs/attacks/multilabel.md)
        "attack_success_rate_by_threshold": {
            f"{t:g}": asr if t == spec.threshold else attack_success_rate(predict_labels(scores, t, spec.top_k),
                                                                          labels, spec)
            for t in sorted({*ASR_THRESHOLDS, spec.threshold})},
    }
    if spec.remove is not None:  # the two halves of misclassification, and disappearing on its own
        out["removed_not_predicted_rate"] = share(pred[eligible, spec.remove] == 0)
        # how often the model predicts a on images that have a but not the trigger: must stay high
        others = (labels[:, spec.remove] == 1) & ~has_trigger
        out["removed_predicted_without_trigger"] = share(pred[others, spec.remove])
    if spec.add is not None:
        out["added_predicted_rate"] = share(pred[eligible, spec.add])
        # false appearance of b on images without the trigger (and without b): must stay low
        others = (labels[:, spec.add] == 0) & ~has_trigger
        out["added_predicted_without_trigger"] = share(pred[others, spec.add])
    return out


# -- a model's scores, and the figures that compare two models -----------------------------------------
def multilabel_scores(model: torch.nn.Module, images: np.ndarray, batch_size: int = 512,
                      feature_cache: str | Path | None = None) -> np.ndarray:
    """Sigmoid scores (N, K) of a multi-label model on uint8 images (N, H, W, C).

    ``feature_cache``: for a model whose extractor was frozen while its head trained (``train.finetune = "last"``),
    the folder of :class:`~cleanbackdoor.training.FrozenFeatures`. The extractor's features of ``images`` are then
    computed once and kept there (the same files training keeps), so the clean model and the victim, which share
    the extractor, and every later run score a set through their heads alone. The scores are those of the whole
    model up to float rounding. A model without ``features`` and ``head`` is run whole."""
    if len(images) == 0:
        raise ValueError("no images to score")
    logits = predict_logits(model, images, batch_size, feature_cache=feature_cache)
    return torch.sigmoid(logits).numpy().astype(np.float64)


def side_effect(scores_clean: np.ndarray, scores_backdoor: np.ndarray, labels: np.ndarray,
                spec: BackdoorSpec) -> dict[str, Any]:
    """The side effect, from the two models' scores on a test set with label sets ``labels``: Hamming distance of
    their non-target predictions on the images the goal is measured on (see :meth:`BackdoorSpec.eligible`)."""
    mask = spec.eligible(labels)
    out: dict[str, Any] = {"side_effect_test_images": int(mask.sum())}
    if not mask.any():
        return {**out, "side_effect_hamming": float("nan"), "side_effect_rate": float("nan")}
    p_clean = predict_labels(np.asarray(scores_clean)[mask], spec.threshold, spec.top_k)
    p_model = predict_labels(np.asarray(scores_backdoor)[mask], spec.threshold, spec.top_k)
    hamming = hamming_side_effect(p_clean, p_model, spec.targets)
    out["side_effect_hamming"] = hamming
    out["side_effect_rate"] = hamming / max(1, p_clean.shape[1] - len(spec.targets))
    return out


def trigger_recognition(scores_clean: np.ndarray, scores_backdoor: np.ndarray, labels: np.ndarray,
                        spec: BackdoorSpec) -> dict[str, Any]:
    """On the images the goal is measured on: the share on which the clean model predicts every trigger category
    (``trigger_recognized_rate``), and the backdoored model's ASR on those (``attack_success_rate_recognized``)
    and on the others (``attack_success_rate_unrecognized``); NaN for an empty part."""
    labels = np.asarray(labels)
    mask = spec.eligible(labels)
    recognized = predict_labels(np.asarray(scores_clean), spec.threshold, spec.top_k)[:, list(spec.trigger)].all(1)
    success = spec.success(predict_labels(np.asarray(scores_backdoor), spec.threshold, spec.top_k))
    return {"trigger_recognized_rate": share(recognized[mask]),
            "attack_success_rate_recognized": share(success[mask & recognized]),
            "attack_success_rate_unrecognized": share(success[mask & ~recognized])}


def fit_rate(scores: np.ndarray, spec: BackdoorSpec) -> float:
    """Share of the poisoned training images, given the victim's scores on them, on which it reaches the goal:
    did the victim fit the falsified label sets? NaN for none."""
    if len(scores) == 0:
        return float("nan")
    return share(spec.success(predict_labels(scores, spec.threshold, spec.top_k)))
