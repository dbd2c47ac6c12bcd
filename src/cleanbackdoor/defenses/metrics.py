"""How well a detection matches the attack's true mask: precision, recall and ROC AUC.

- **precision**: share of the flagged examples that the attacker changed (NaN when nothing is flagged);
- **recall**: share of the changed examples that are flagged (NaN when the attacker changed nothing);
- **ROC AUC**: probability that a random changed example scores higher than a random untouched one (ties count
  one half), from the scores alone, whatever the threshold (NaN when either group is empty).

Precision and recall are taken at the method's own threshold (its ``flagged`` mask); the AUC tells whether a
better threshold exists.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def roc_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """ROC AUC of ``scores`` for the positives ``truth`` (Mann-Whitney, ties one half); NaN if undefined."""
    from scipy.stats import rankdata

    scores, truth = np.asarray(scores, dtype=np.float64), np.asarray(truth, dtype=bool)
    pos, neg = int(truth.sum()), int((~truth).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[truth].sum() - pos * (pos + 1) / 2) / (pos * neg))


def detection_metrics(scores: np.ndarray, flagged: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Precision, recall, F1 and ROC AUC of a detection against the true mask, with the counts behind them."""
    flagged, truth = np.asarray(flagged, dtype=bool), np.asarray(truth, dtype=bool)
    if not (len(scores) == len(flagged) == len(truth)):
        raise ValueError(f"scores ({len(scores)}), flagged ({len(flagged)}) and truth ({len(truth)}) differ in length")
    tp = int((flagged & truth).sum())
    n_flagged, n_pos = int(flagged.sum()), int(truth.sum())
    precision = tp / n_flagged if n_flagged else float("nan")
    recall = tp / n_pos if n_pos else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if n_flagged and n_pos and tp else (
        0.0 if n_flagged and n_pos else float("nan"))
    return {"precision": precision, "recall": recall, "f1": f1, "roc_auc": roc_auc(scores, truth),
            "flagged": n_flagged, "true_positives": tp, "positives": n_pos, "examples": len(truth)}
