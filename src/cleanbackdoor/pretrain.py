"""Feature extractors pretrained by the toolkit on a source task, for transfer-learning victims.

The hidden-trigger attack (Saha, Subramanya, Pirsiavash, AAAI 2020) assumes transfer learning: the victim takes a
feature extractor trained on another task and fine-tunes it on its own data, the last layer only (the paper's
setting) or the whole network. No weights are downloaded here: the toolkit trains the extractor itself on a
*source task*, ``model.pretrained`` in the config (:class:`~cleanbackdoor.config.PretrainConfig`): the victim's
architecture trained on some classes of a dataset (e.g. the CIFAR-10 classes other than the attacked ones), with
its own recipe and seed. The result is cached under a key of exactly those inputs (architecture, source data as a
hash of its files, classes, subset, recipe, seed), like the clean model of an experiment, so every run, attack and
budget that names the same source task trains it once, however its root is written; pretraining resumes from its
last epoch after an interruption.

The cached file holds plain tensors and numbers (``torch.load(..., weights_only=True)``): the weights, the source
task's class names, the normalization statistics of the source data (the extractor was trained with them, so a
victim built on it keeps them), and the source-task test accuracy.

- :func:`~cleanbackdoor.data.subset.select_classes` (re-exported here): an image set restricted to some classes,
  relabelled 0..k-1 (the victim's task, the source task);
- :func:`pretrained_model`: the source-task classifier (extractor + source head), from the cache or trained;
- :func:`victim_from_pretrained`: a victim for a new task: the pretrained extractor and a fresh, seeded head;
- :func:`build_victim`: the one place a fresh victim is built from a model config, pretrained or not (the
  experiment, the attacks' guess of the victim, the defenses and the audit all call it).

The victim's images may be larger than the source task's (the multi-label mosaics of
:mod:`cleanbackdoor.data.mosaic` are grids of source-sized images): the architecture is then built for the victim's
size and takes every pretrained backbone weight, which works for fully convolutional backbones (ResNets with global
pooling, ConvNets without a hidden layer; the head's input size follows the feature map). A backbone whose weights
depend on the image size (a ConvNet's ``hidden`` layer) is refused. Two model options are the victim's own and
change no backbone weight: ``head_hidden`` (an MLP head, :func:`cleanbackdoor.models.make_head`) and ``pool`` (a
ResNet's pooling grid, :mod:`cleanbackdoor.models.resnet`). The source-task classifier is pretrained without
them (a linear head on globally pooled features), so one cached extractor serves victims with any of them.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cleanbackdoor.cache import compute_once, entry_key, entry_lock, model_file, save_atomic, seeded
from cleanbackdoor.specs import ModelConfig, PretrainConfig
from cleanbackdoor.data import ImageSet, load_dataset, select_classes, source_fingerprint, stratified_subset
from cleanbackdoor.data.transforms import channel_stats
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.metrics import accuracy
from cleanbackdoor.models import Classifier, build_model, make_head
from cleanbackdoor.training import predict, resolve_device, train


def source_task(spec: PretrainConfig) -> tuple[ImageSet, ImageSet]:
    """The (train, test) sets of the source task a :class:`PretrainConfig` names."""
    _require_resolved(spec)
    splits = load_dataset(spec.dataset, root=spec.root, **spec.options)
    train_set, test_set = splits.train, splits.test
    if spec.classes is not None:
        train_set, test_set = select_classes(train_set, spec.classes), select_classes(test_set, spec.classes)
    if spec.per_class:
        train_set = stratified_subset(train_set, per_class=spec.per_class, seed=spec.seed)
    return train_set, test_set


def pretrain_key(model_cfg: ModelConfig) -> str:
    """The cache key of a pretrained extractor: exactly the inputs that produce it. The source data enters as a
    hash of its files (:func:`~cleanbackdoor.data.source_fingerprint`), not as the root is written."""
    spec = _spec(model_cfg)
    source = {**spec.model_dump(mode="json"), "root": source_fingerprint(spec.dataset, spec.root)}
    return entry_key("pretrained", model_cfg.name, backbone_options(model_cfg), source)


def model_key(model_cfg: ModelConfig) -> dict[str, Any]:
    """The model config as it enters the cache keys of models trained with it: a pretrained extractor stands as
    its own cache key (which hashes the source data's files instead of naming its root)."""
    out = model_cfg.model_dump(mode="json")
    if model_cfg.pretrained is not None:
        out["pretrained"] = pretrain_key(model_cfg)
    return out


VICTIM_OPTIONS = ("head_hidden", "pool")  # model options of the victim only: they change no backbone weight


def backbone_options(model_cfg: ModelConfig) -> dict[str, Any]:
    """The architecture options of the extractor: ``model.options`` without the victim's own (VICTIM_OPTIONS)."""
    return {k: v for k, v in model_cfg.options.items() if k not in VICTIM_OPTIONS}


def _spec(model_cfg: ModelConfig) -> PretrainConfig:
    if model_cfg is None or model_cfg.pretrained is None:
        raise ConfigError("no pretrained extractor is configured (model.pretrained)")
    return _require_resolved(model_cfg.pretrained)


def _require_resolved(spec: PretrainConfig) -> PretrainConfig:
    if spec.dataset is None:
        raise ConfigError("model.pretrained.dataset is not resolved (load the config with load_config)")
    return spec


def pretrained_model(model_cfg: ModelConfig, *, cache_dir: str | Path | None, device: str = "auto",
                     progress: bool = True, log: Callable[[str], None] = print) -> Classifier:
    """The source-task classifier of ``model_cfg.pretrained`` (in eval mode, on ``device``): loaded from the cache,
    or trained on the source task and cached. ``cache_dir`` None trains without caching."""
    spec = _spec(model_cfg)
    key = pretrain_key(model_cfg)
    path = model_file(cache_dir, "pretrained", key) if cache_dir is not None else None
    dev = resolve_device(device)
    if path is not None and not path.exists():
        with entry_lock(path):  # an extractor kept in artifacts/: the cache takes a copy
            if not path.exists() and (seed := seeded(path)) is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(seed, tmp := path.with_name(f"{path.name}.{os.getpid()}.tmp"))
                tmp.replace(path)
                log(f"pretrained extractor: copied from {seed} into the cache")

    def fit() -> dict[str, Any]:
        train_set, test_set = source_task(spec)
        mean, std = channel_stats(train_set.images)
        log(f"pretrained extractor: training {model_cfg.name} on {len(train_set)} images of the source task "
            f"({', '.join(train_set.class_names)}), {spec.train.epochs} epochs")
        state: dict[str, Any] = {"class_names": list(train_set.class_names), "mean": list(mean), "std": list(std),
                                 "image_shape": list(train_set.image_shape), "model": model_cfg.name,
                                 "options": backbone_options(model_cfg)}
        model = _build(model_cfg, state, seed=spec.seed)
        checkpoint = path.with_suffix(".ckpt") if path is not None else None
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
        history = train(model, train_set.images, train_set.labels, spec.train, seed=spec.seed, device=dev,
                        progress=progress, desc="pretraining", checkpoint=checkpoint, checkpoint_key=key)
        state["source_test_accuracy"] = accuracy(predict(model, test_set.images), test_set.labels)
        state["train_loss"] = history.loss
        state["weights"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        log(f"pretrained extractor: source-task test accuracy {state['source_test_accuracy']:.3f}")
        return state

    def save(state: dict[str, Any], p: Path) -> None:
        save_atomic(state, p)
        p.with_suffix(".ckpt").unlink(missing_ok=True)

    state, loaded = compute_once(path, fit, lambda p: torch.load(p, map_location="cpu", weights_only=True), save)
    model = _build(model_cfg, state)
    model.load_state_dict(state["weights"])
    model.source_task = _info(state, key)
    if loaded:
        log(f"pretrained extractor: loaded from cache {path} (source task: {len(state['class_names'])} classes, "
            f"test accuracy {state['source_test_accuracy']:.3f})")
    return model.to(dev).eval()


def _info(state: dict[str, Any], key: str) -> dict[str, Any]:
    """What a pretrained model remembers of its source task (attribute ``source_task``)."""
    return {"key": key, "class_names": list(state["class_names"]), "image_shape": tuple(state["image_shape"]),
            "source_test_accuracy": float(state["source_test_accuracy"]),
            "model": state.get("model"), "options": dict(state.get("options", {}))}


def _build(model_cfg: ModelConfig, state: dict[str, Any], seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return build_model(model_cfg.name, tuple(state["image_shape"]), len(state["class_names"]),
                       tuple(state["mean"]), tuple(state["std"]), **backbone_options(model_cfg))


def victim_from_pretrained(pretrained: Classifier, image_shape: tuple[int, int, int], num_classes: int,
                           seed: int, head_hidden: int | list[int] = 0, pool: int | str | None = None) -> Classifier:
    """A victim for a ``num_classes``-way task on (C, H, W) images: the pretrained extractor (weights and
    normalization) with a fresh head (linear, or an MLP with ``head_hidden`` units), initialized from ``seed``.

    Images of another height and width than the source task's, or another pooling grid ``pool`` (ResNets): the
    architecture is rebuilt for them and takes every backbone weight of the extractor (ConfigError if one depends
    on the image size)."""
    info = getattr(pretrained, "source_task", {})
    source_shape = tuple(info.get("image_shape", image_shape))
    image_shape = tuple(image_shape)
    if image_shape == source_shape and pool is None:
        model = copy.deepcopy(pretrained).cpu()
    else:
        if image_shape[0] != source_shape[0] or info.get("model") is None:  # older caches lack the architecture
            raise ConfigError(f"the pretrained extractor takes {source_shape} images, the victim's data are "
                              f"{image_shape}")
        options = {**info["options"], **({} if pool is None else {"pool": pool})}
        model = build_model(info["model"], image_shape, len(info["class_names"]),
                            tuple(pretrained.normalize.mean.flatten().tolist()),
                            tuple(pretrained.normalize.std.flatten().tolist()), **options)
        source = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("head.")}
        target = model.state_dict()
        misfit = [k for k, v in source.items() if k not in target or target[k].shape != v.shape]
        if misfit:
            raise ConfigError(f"the pretrained {info['model']} extractor takes {source_shape} images and its "
                              f"weights {', '.join(misfit)} depend on that size: it cannot take the victim's "
                              f"{image_shape} images (use a fully convolutional backbone, e.g. no `hidden` layer)")
        model.load_state_dict(source, strict=False)
    for p in model.parameters():
        p.requires_grad_(True)
    torch.manual_seed(seed)
    model.head = make_head(model.backbone.feature_dim, num_classes, head_hidden)
    return model.train()


def build_victim(model_cfg: ModelConfig, images: np.ndarray, num_classes: int, seed: int, *,
                 cache_dir: str | Path | None, progress: bool = False,
                 log: Callable[[str], None] = lambda _: None) -> Classifier:
    """A fresh, seeded victim for uint8 ``images`` (N, H, W, C) of ``num_classes`` classes: with
    ``model_cfg.pretrained``, the pretrained extractor (trained and cached if needed) and a fresh head
    (``head_hidden``, ``pool`` from the options); otherwise the architecture normalized with the images' channel
    statistics."""
    image_shape = (images.shape[3], images.shape[1], images.shape[2])
    if model_cfg.pretrained is not None:
        extractor = pretrained_model(model_cfg, cache_dir=cache_dir, device="cpu", progress=progress, log=log)
        return victim_from_pretrained(extractor, image_shape, num_classes, seed,
                                      head_hidden=model_cfg.options.get("head_hidden", 0),
                                      pool=model_cfg.options.get("pool"))
    mean, std = channel_stats(images)
    torch.manual_seed(seed)
    return build_model(model_cfg.name, image_shape, num_classes, mean, std, **model_cfg.options)
