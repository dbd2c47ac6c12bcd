"""The building blocks of an experiment, shared by the run, its defenses stage and the defense table: loading
the data, building and training the victim, and the clean model (cached). Measuring a model is
:mod:`.evaluation`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cleanbackdoor.cache import FEATURES, compute_once, entry_key, fingerprint, model_file, save_atomic
from cleanbackdoor.config import ExperimentConfig
from cleanbackdoor.data import ImageSet, Splits, load_dataset, stratified_subset
from cleanbackdoor.data.subset import select_classes
from cleanbackdoor.pretrain import build_victim, model_key
from cleanbackdoor.training import resolve_device, train


# -- stages -------------------------------------------------------------------------------------------------
def load_data(cfg: ExperimentConfig) -> Splits:
    splits = load_dataset(cfg.data.name, root=cfg.data.root, **cfg.data.options)
    train_set, test_set = splits.train, splits.test
    if cfg.data.classes:  # the task is some classes of the dataset, relabelled 0..k-1
        train_set, test_set = select_classes(train_set, cfg.data.classes), select_classes(test_set, cfg.data.classes)
    if cfg.data.train_per_class:
        train_set = stratified_subset(train_set, per_class=cfg.data.train_per_class, seed=cfg.seed)
    if cfg.data.test_per_class:
        test_set = stratified_subset(test_set, per_class=cfg.data.test_per_class, seed=cfg.seed)
    return Splits(train_set, test_set)


def new_model(cfg: ExperimentConfig, train_set: ImageSet, seed: int) -> nn.Module:
    """A freshly initialized victim (seeded), normalizing with the clean training set's statistics; with
    ``model.pretrained``, the pretrained extractor (its weights and normalization) and a fresh seeded head."""
    return build_victim(cfg.model, train_set.images, train_set.num_classes, seed, cache_dir=cfg.cache_path(),
                        progress=cfg.progress)


def train_model(cfg: ExperimentConfig, train_set: ImageSet, images: np.ndarray, targets: np.ndarray, *,
                desc: str, checkpoint: Path | None = None, checkpoint_key: str = "") -> nn.Module:
    model = new_model(cfg, train_set, cfg.seed)
    train(model, images, targets, cfg.train, seed=cfg.seed, device=cfg.device, progress=cfg.progress,
          desc=desc, checkpoint=checkpoint, checkpoint_key=checkpoint_key, feature_cache=feature_cache(cfg))
    return model


def feature_cache(cfg: ExperimentConfig) -> Path:
    """Where a frozen extractor's features are kept (``train.finetune = "last"``): shared by the clean model and
    the victim, which train on the same images (:class:`cleanbackdoor.training.FrozenFeatures`)."""
    return cfg.cache_path() / FEATURES


def clean_model(cfg: ExperimentConfig, train_set: ImageSet, log: Callable[[str], None]) -> tuple[nn.Module, bool]:
    """The clean model for this data, architecture, recipe and seed: from the cache, or trained and cached. The key
    holds the training set's bytes (not the data root as written), the model, the recipe and the seed."""
    key = entry_key("clean", fingerprint(train_set.images, train_set.labels), model_key(cfg.model),
                    cfg.train.model_dump(mode="json"), cfg.seed, len(train_set))
    path = model_file(cfg.cache_path(), "clean", key)
    model = new_model(cfg, train_set, cfg.seed)

    def fit() -> nn.Module:
        train(model, train_set.images, train_set.labels, cfg.train, seed=cfg.seed, device=cfg.device,
              progress=cfg.progress, desc="clean model", feature_cache=feature_cache(cfg))
        return model

    def load(p: Path) -> nn.Module:
        model.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
        return model.to(resolve_device(cfg.device)).eval()

    model, loaded = compute_once(path, fit, load, save_weights)
    if loaded:
        log(f"clean model: loaded from cache {path}")
    return model, loaded


def save_weights(model: nn.Module, path: Path) -> None:
    """A model's weights, on the CPU, written atomically into the cache (``compute_once``'s save)."""
    save_atomic({k: v.cpu() for k, v in model.state_dict().items()}, path)


def frozen_features(cfg: ExperimentConfig) -> Path | None:
    """The feature cache when the victim trains its head alone on a frozen extractor, else None."""
    return feature_cache(cfg) if cfg.train.finetune == "last" else None
