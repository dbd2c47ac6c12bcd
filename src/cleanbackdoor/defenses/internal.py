"""Private helpers shared by the defenses: penultimate features, label groups, out-of-sample probabilities."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cleanbackdoor.cache import DEFENSES, FEATURES, compute_once, entry_key, fingerprint
from cleanbackdoor.recipes import scale_milestones
from cleanbackdoor.data.imageset import ImageSet
from cleanbackdoor.data.transforms import Augment, to_nchw, to_tensor
from cleanbackdoor.defenses.base import DefenseContext
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.pretrain import build_victim, model_key
from cleanbackdoor.training import FrozenFeatures, predict_logits, train


@torch.inference_mode()
def penultimate_features(model: nn.Module, images: np.ndarray, batch_size: int = 512,
                         feature_cache: Path | None = None) -> np.ndarray:
    """The model's penultimate representation (``model.features``), (N, D) float64, in eval mode.
    ``feature_cache``: the folder of a frozen extractor's cached features (a victim that trained its head alone)."""
    if not hasattr(model, "features"):
        raise ConfigError(f"{type(model).__name__} exposes no `features(x)`: the defense needs the penultimate layer")
    dev = next(model.parameters()).device
    model.eval()
    if feature_cache is not None:
        with torch.inference_mode(False):
            cached = FrozenFeatures.of(model, to_nchw(images, dev), Augment(), batch_size, cache_dir=feature_cache)
        if cached is not None:
            return cached.plain.cpu().double().numpy()
    outs = [model.features(to_tensor(images[i:i + batch_size], dev)).float().flatten(1).cpu()
            for i in range(0, len(images), batch_size)]
    return torch.cat(outs).double().numpy()


def label_groups(labels: np.ndarray, num_classes: int) -> list[tuple[int, np.ndarray]]:
    """(class, indices) of the examples given each class: one group per class for single labels, one per
    category (examples whose label set holds it) for multi-label sets. Empty groups are left out."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        groups = [(k, np.flatnonzero(labels == k)) for k in range(num_classes)]
    else:
        groups = [(k, np.flatnonzero(labels[:, k] > 0)) for k in range(num_classes)]
    return [(k, idx) for k, idx in groups if len(idx)]


def percentile_ranks(scores: np.ndarray) -> np.ndarray:
    """Scores as ranks in [0, 1] (ties share their mean rank): comparable across detectors."""
    from scipy.stats import rankdata

    if len(scores) < 2:
        return np.zeros(len(scores))
    return (rankdata(scores) - 1) / (len(scores) - 1)


def defender_recipe(context: DefenseContext, epochs: int | None, multilabel: bool):
    """The victim's training recipe as the defender reuses it: ``epochs`` overridden (lr milestones moved to the
    same fractions of the run), BCE for label sets when the recipe says cross-entropy."""
    if context.model is None or context.train is None:
        raise ConfigError("this defense trains models of its own and needs the victim's model and training recipe "
                          "(DefenseContext.model and .train)")
    recipe = context.train
    if epochs is not None and epochs != recipe.epochs:
        update: dict = {"epochs": epochs}
        if recipe.milestones:
            update["milestones"] = scale_milestones(recipe.milestones, recipe.epochs, epochs)
            if not update["milestones"]:
                update["schedule"] = "constant"
        try:
            recipe = type(recipe)(**{**recipe.model_dump(), **update})
        except ValueError as e:
            raise ConfigError(f"the defender's recipe with epochs={epochs}: {e}") from None
    if multilabel and recipe.loss == "ce":
        recipe = recipe.model_copy(update={"loss": "bce"})
    return recipe


def train_defender_model(data: ImageSet, index: np.ndarray, recipe, *, seed: int, context: DefenseContext,
                         desc: str) -> nn.Module:
    """A fresh model built as the victim is (``context.model_factory``; else the victim's architecture normalized
    with the statistics of all of ``data``), trained with ``recipe`` on the examples ``index`` of ``data``."""
    if context.model_factory is not None:
        model = context.model_factory(seed)
    else:
        model = build_victim(context.model, data.images, data.num_classes, seed, cache_dir=context.cache_dir)
    features = Path(context.cache_dir) / FEATURES if context.cache_dir else None  # a frozen extractor's
    train(model, data.images[index], data.labels[index], recipe, seed=seed, device=context.device,
          progress=context.progress, desc=desc, feature_cache=features)
    return model


def probabilities(model: nn.Module, images: np.ndarray, multilabel: bool,
                  feature_cache: Path | None = None) -> np.ndarray:
    """Predicted probabilities (N, K): softmax, or sigmoid for a multi-label model."""
    logits = predict_logits(model, images, feature_cache=feature_cache)
    return (torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1)).double().numpy()


def _cache_file(context: DefenseContext, kind: str, key: str) -> Path | None:
    return Path(context.cache_dir) / DEFENSES / f"{kind}-{key}.npz" if context.cache_dir else None


def cached_array(path: Path | None, compute: Callable[[], np.ndarray], context: DefenseContext,
                 what: str) -> np.ndarray:
    """An array of the defenses' cache (``.npz``), computed once (:func:`cleanbackdoor.cache.compute_once`)."""
    def load(p: Path) -> np.ndarray:
        with np.load(p, allow_pickle=False) as z:
            return z["array"]

    def save(array: np.ndarray, p: Path) -> None:
        tmp = p.with_name(f"{p.stem}.{os.getpid()}.tmp.npz")  # a file of this process: concurrent writers
        np.savez_compressed(tmp, array=array)
        tmp.replace(p)

    array, loaded = compute_once(path, compute, load, save)
    if loaded:
        context.log(f"{what}: loaded from cache {path}")
    return array


def cross_val_probabilities(data: ImageSet, *, folds: int, seed: int, context: DefenseContext,
                            epochs: int | None = None) -> np.ndarray:
    """Out-of-sample predicted probabilities (N, K) by K-fold cross-validation of the victim's architecture and
    recipe: each fold's examples are predicted by a model trained on the other folds (softmax for single labels,
    sigmoid for label sets). Folds are stratified by the given label (single-label). Cached under a key of the
    images, labels, architecture, recipe, folds and seed."""
    from sklearn.model_selection import KFold, StratifiedKFold

    multilabel = data.multilabel
    recipe = defender_recipe(context, epochs, multilabel)
    labels = data.labels
    if not multilabel:
        counts = np.bincount(labels, minlength=data.num_classes)
        smallest = int(counts[counts > 0].min())
        if smallest < folds:
            raise ConfigError(f"cross-validation with {folds} folds needs at least {folds} examples of every given "
                              f"class; the smallest class has {smallest}")
    key = entry_key("defenses", "cv-probabilities", fingerprint(data.images, labels), model_key(context.model),
                    recipe.model_dump(mode="json"), folds, seed)

    def compute() -> np.ndarray:
        splitter = (KFold(folds, shuffle=True, random_state=seed) if multilabel
                    else StratifiedKFold(folds, shuffle=True, random_state=seed))
        probs = np.zeros((len(data), data.num_classes), dtype=np.float64)
        for f, (fit_idx, held_idx) in enumerate(splitter.split(np.zeros(len(data)),
                                                                None if multilabel else labels)):
            model = train_defender_model(data, fit_idx, recipe, seed=seed + 1000 + f, context=context,
                                         desc=f"cross-validation fold {f + 1}/{folds}")
            probs[held_idx] = probabilities(model, data.images[held_idx], multilabel, context.feature_cache)
            context.log(f"cross-validation: fold {f + 1}/{folds} trained on {len(fit_idx)} examples")
        return probs

    return cached_array(_cache_file(context, "cv", key), compute, context, "cross-validated probabilities")


def held_out_probabilities(data: ImageSet, held_out: np.ndarray, *, seed: int, context: DefenseContext,
                           epochs: int | None = None) -> np.ndarray:
    """Probabilities (N, K) of a model of the victim's recipe trained on every example except ``held_out`` (a
    boolean mask): out-of-sample for the held-out examples, in-sample for the rest. Cached like the above."""
    recipe = defender_recipe(context, epochs, data.multilabel)
    key = entry_key("defenses", "held-out-probabilities", fingerprint(data.images, data.labels, held_out),
                    model_key(context.model), recipe.model_dump(mode="json"), seed)

    def compute() -> np.ndarray:
        model = train_defender_model(data, np.flatnonzero(~held_out), recipe, seed=seed + 2000, context=context,
                                     desc="model without the held-out examples")
        return probabilities(model, data.images, data.multilabel, context.feature_cache)

    return cached_array(_cache_file(context, "heldout", key), compute, context, "held-out probabilities")


def feature_probabilities(features: np.ndarray, labels: np.ndarray, num_classes: int, *, folds: int,
                          seed: int) -> np.ndarray:
    """Out-of-sample probabilities of a logistic regression on (standardized) features, by K-fold
    cross-validation: a cheap stand-in for retraining the network K times (single-label only)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = np.unique(labels)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    probs_present = cross_val_predict(clf, features, labels, cv=cv, method="predict_proba")
    probs = np.zeros((len(labels), num_classes))
    probs[:, classes] = probs_present
    return probs
