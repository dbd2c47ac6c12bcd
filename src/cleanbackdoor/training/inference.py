"""Predictions of a trained model on uint8 images, through its head alone where its extractor is frozen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from cleanbackdoor.data.transforms import Augment, to_nchw, to_tensor
from cleanbackdoor.training.device import resolve_device
from cleanbackdoor.training.features import FrozenFeatures


@torch.inference_mode()
def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int = 512,
                   device: str | torch.device | None = None,
                   feature_cache: str | Path | None = None) -> torch.Tensor:
    """Logits (N, classes) on the CPU for uint8 images (N, H, W, C), in eval mode.

    ``feature_cache``: for a model whose extractor stayed frozen while its head trained (``train.finetune =
    "last"``), the folder of :class:`FrozenFeatures`: the extractor's features of ``images`` are computed once and
    kept there, so the clean model, the victim and every later model on the same extractor score a set through
    their heads alone (the logits of the whole model up to float rounding)."""
    dev = next(model.parameters()).device if device is None else resolve_device(device)
    model.eval()
    if feature_cache is not None and len(images) and callable(getattr(model, "features", None)) \
            and isinstance(getattr(model, "head", None), nn.Module):
        with torch.inference_mode(False):
            feats = FrozenFeatures.of(model, to_nchw(images, dev), Augment(), batch_size, cache_dir=feature_cache)
        return torch.cat([model.head(feats.plain[i:i + batch_size]).float().cpu()
                          for i in range(0, len(feats), batch_size)])
    outs = []
    for i in range(0, len(images), batch_size):
        outs.append(model(to_tensor(images[i:i + batch_size], dev)).float().cpu())
    if not outs:
        return torch.empty(0, 0)
    return torch.cat(outs)


def predict(model: nn.Module, images: np.ndarray, batch_size: int = 512,
            feature_cache: str | Path | None = None) -> np.ndarray:
    """Predicted classes (N,) of a single-label model (``feature_cache``: see :func:`predict_logits`)."""
    if len(images) == 0:
        return np.zeros(0, dtype=np.int64)
    return predict_logits(model, images, batch_size, feature_cache=feature_cache).argmax(1).numpy()
