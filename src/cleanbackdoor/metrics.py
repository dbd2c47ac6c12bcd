"""The figures every experiment reports, computed the same way for every attack.

- CTA (clean test accuracy): accuracy of the model on the untouched test set.
- ASR (attack success rate): among the test images whose *true* class is a source class of the attack and is not
  the target class, the share that the model classifies as the target once the trigger is applied. Images of the
  target class are always excluded (they would count as successes without any backdoor).
- NASR (natural ASR, clean-image backdoor): the same share on images that carry the trigger feature naturally.
- Multi-label figures (mAP, per-goal ASR, side effect) live in :mod:`cleanbackdoor.multilabel_metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    pred, labels = np.asarray(pred), np.asarray(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"predictions {pred.shape} and labels {labels.shape} differ in shape")
    if len(labels) == 0:
        return float("nan")
    return float((pred == labels).mean())


def asr_eligible(labels: np.ndarray, target: int, sources: Sequence[int] | None) -> np.ndarray:
    """Mask of test images that count for ASR: true class among ``sources`` (all classes if None), not the target."""
    labels = np.asarray(labels)
    mask = labels != target
    if sources is not None:
        mask &= np.isin(labels, np.asarray(list(sources)))
    return mask


def attack_success_rate(pred_triggered: np.ndarray, target: int) -> float:
    """Share of (already eligible, triggered) images predicted as ``target``."""
    pred_triggered = np.asarray(pred_triggered)
    if len(pred_triggered) == 0:
        return float("nan")
    return float((pred_triggered == target).mean())


def confusion(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    out = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(out, (np.asarray(labels), np.asarray(pred)), 1)
    return out
