"""Spectral signatures: a backdoor leaves a trace along the top singular direction of a class's representations.

Paper: B. Tran, J. Li, A. Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018 (Algorithm 1).

Algorithm: train a network on the (possibly poisoned) data; for each given label y, take the learned
representations R(x) of the examples labelled y, centre them (R(x) - mean), take the top right singular vector v
of the centred matrix, and score every example by its squared projection ((R(x) - mean) . v)^2. The examples
with the top ``removal_factor * epsilon * n_y`` scores of each class are flagged and removed, and the network is
retrained (the experiment does the retraining).

Threat model of the defense: the defender holds the training set and the model trained on it, and an upper bound
``epsilon`` on the share of a class that is poisoned (the paper's epsilon; it removes 1.5 epsilon of every class).
Every class is scanned: the defender does not know the target.

Arguments (``SpectralParams``):
    epsilon: upper bound on the poisoned share of any one class, in (0, 0.5] (default 0.1).
    removal_factor: multiple of ``epsilon * n_y`` flagged per class (default 1.5, as in the paper).
    retrain: retrain without the flagged examples in an experiment (default True).

Shapes: ``data`` an ImageSet (N examples); ``model`` a classifier with ``features(x)``; returns scores (N,) and
flagged (N,).

Deviations from the paper, all deliberate:

- the representation is this toolkit's penultimate layer (``model.features``: for the ConvNet the flattened last
  block), where the paper takes the ResNet's last residual block;
- to rank examples across classes (for a dataset-wide ROC AUC), each class's scores are divided by their class
  mean (the class's top singular value squared over n_y); the flags, taken per class, are the paper's;
- for multi-label sets each category is a "class" (the examples whose label set holds it); an example's score is
  its highest over its categories and it is flagged when flagged in any of them.

Example::

    >>> det = SpectralSignatures(epsilon=0.1).detect(poisoned_train, victim)
    >>> det.scores.shape, det.flagged.sum()
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field
from torch import nn

from cleanbackdoor.data.imageset import ImageSet
from cleanbackdoor.defenses.base import Defense, DefenseContext, Detection, FilterParams
from cleanbackdoor.defenses.internal import label_groups, penultimate_features
from cleanbackdoor.errors import ConfigError


class SpectralParams(FilterParams):
    epsilon: float = Field(0.1, gt=0, le=0.5, description="upper bound on the poisoned share of any one class, in "
                                                          "(0, 0.5]")
    removal_factor: float = Field(1.5, gt=0, le=10, description="flag removal_factor * epsilon * n_y examples per "
                                                                "class (the paper: 1.5)")


def spectral_scores(features: np.ndarray) -> np.ndarray:
    """Squared projections of the centred ``features`` (n, D) on their top right singular vector."""
    centred = features - features.mean(axis=0, keepdims=True)
    if len(features) < 2 or not np.any(centred):
        return np.zeros(len(features))
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return (centred @ vt[0]) ** 2


class SpectralSignatures(Defense):
    name = "spectral"
    Params = SpectralParams

    def _check_params(self) -> None:
        share = self.params.epsilon * self.params.removal_factor
        if share > 0.9:
            raise ConfigError(f"defense 'spectral': epsilon * removal_factor = {share:.3g} would flag more than 90% "
                              "of every class")

    def detect(self, data: ImageSet, model: nn.Module | None = None, *, seed: int = 0,
               context: DefenseContext | None = None) -> Detection:
        self._check_inputs(data, model)
        features = penultimate_features(model, data.images,
                                        feature_cache=(context or DefenseContext()).feature_cache)
        return self.detect_features(features, data.labels, data.num_classes)

    def detect_features(self, features: np.ndarray, labels: np.ndarray, num_classes: int) -> Detection:
        """The detection from precomputed representations (N, D) and given labels."""
        p = self.params
        scores = np.zeros(len(features))
        flagged = np.zeros(len(features), dtype=bool)
        per_class = {}
        for k, idx in label_groups(labels, num_classes):
            s = spectral_scores(features[idx])
            mean = s.mean()
            normalized = s / mean if mean > 0 else np.zeros_like(s)
            scores[idx] = np.maximum(scores[idx], normalized)
            m = min(len(idx), math.floor(p.removal_factor * p.epsilon * len(idx)))
            if m > 0:
                top = idx[np.argsort(-s, kind="stable")[:m]]
                flagged[top] = True
            per_class[int(k)] = {"examples": len(idx), "flagged": int(m)}
        return Detection(self.name, scores, flagged, None, {"per_class": per_class})

