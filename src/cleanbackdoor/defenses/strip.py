"""STRIP: a triggered input keeps its (target) prediction when other images are superimposed on it.

Paper: Y. Gao, C. Xu, D. Wang, S. Chen, D. C. Ranasinghe, S. Nepal, "STRIP: A Defence Against Trojan Attacks on
Deep Neural Networks", ACSAC 2019.

Algorithm (an inference-time defense: it scores the inputs presented to the deployed model, not the training
set): every input x is copied ``overlays`` times and each copy is superimposed with a different clean image
drawn from the defender's held-out set (the paper adds the two images and saturates, ``blend = "add"``). The
model classifies every copy; the input's *entropy* is the mean over the copies of the Shannon entropy (bits) of
the predicted class distribution. A trigger dominates the prediction whatever is superimposed, so triggered
inputs have low entropy. The boundary comes from clean inputs only: the entropies of the held-out images
(superimposed the same way) are fitted with a normal distribution, and the boundary is its ``frr`` quantile, so
that a share ``frr`` of clean inputs is rejected (the false rejection rate, FRR). Inputs below the boundary are
flagged (rejected).

Threat model of the defense: the defender holds the deployed model and a small set of clean held-out images
(``DefenseContext.reference``), and knows nothing about the trigger.

Arguments (``STRIPParams``):
    overlays: superimposed copies per input, N (default 20; the paper uses up to 100).
    frr: false rejection rate the boundary is set for, on clean held-out inputs (default 0.01, as in the paper).
    blend: "add" (x + overlay, saturating at 255: the paper's code) or "average" ((x + overlay) / 2).
    boundary: "normal" (the paper: a normal fit to the clean entropies) or "quantile" (their empirical quantile).
    reference_images: how many held-out images the boundary is fitted on (default 1,000, a seeded sample; the
        overlays come from all of them).

Score: minus the entropy (higher = more suspicious); ``Detection.threshold`` is minus the boundary.

Deviations: the overlays for each input are drawn (seeded) from the whole held-out set rather than a fixed
subset; for multi-label models STRIP is not defined here (the entropy of a label set is not the paper's).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from scipy.stats import norm
from torch import nn

from cleanbackdoor.data.imageset import ImageSet
from cleanbackdoor.defenses.base import Defense, DefenseContext, DefenseParams, Detection
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.training import predict_logits


class STRIPParams(DefenseParams):
    overlays: int = Field(20, ge=2, le=500, description="superimposed copies per input (the paper: up to 100)")
    frr: float = Field(0.01, gt=0, lt=0.5, description="false rejection rate on clean inputs the boundary is set for "
                                                       "(the paper: 0.01)")
    blend: Literal["add", "average"] = Field("add", description="add: x + overlay, saturating at 255 (the paper's "
                                                                "code); average: (x + overlay) / 2")
    boundary: Literal["normal", "quantile"] = Field(
        "normal", description="entropy boundary: frr quantile of a normal fit to clean entropies (the paper), or "
                              "their empirical quantile")
    reference_images: int = Field(1000, ge=2, description="held-out images the boundary is fitted on (all of them "
                                                          "serve as overlays)")
    batch_size: int = Field(2048, ge=1, description="superimposed copies classified per forward pass")


def superimpose(images: np.ndarray, overlays: np.ndarray, blend: str) -> np.ndarray:
    """uint8 images superimposed with uint8 overlays of the same shape."""
    a, b = images.astype(np.int16), overlays.astype(np.int16)
    out = a + b if blend == "add" else (a + b + 1) // 2
    return np.clip(out, 0, 255).astype(np.uint8)


def strip_entropy(model: nn.Module, images: np.ndarray, pool: np.ndarray, *, overlays: int, blend: str,
                  seed: int, batch_size: int = 2048) -> np.ndarray:
    """Mean entropy (bits) of the model's prediction over ``overlays`` superimposed copies of each image."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(pool), size=(len(images), overlays))
    per_batch = max(1, batch_size // overlays)
    out = np.empty(len(images))
    for i in range(0, len(images), per_batch):
        x = images[i:i + per_batch]
        copies = superimpose(np.repeat(x, overlays, axis=0), pool[picks[i:i + per_batch].ravel()], blend)
        p = torch.softmax(predict_logits(model, copies, batch_size=batch_size).double(), dim=1)
        h = -(p * torch.log2(p.clamp_min(1e-300))).sum(1)
        out[i:i + len(x)] = h.view(len(x), overlays).mean(1).numpy()
    return out


class STRIP(Defense):
    name = "strip"
    Params = STRIPParams
    kind = "inference"
    multilabel = False

    def detect(self, data: ImageSet | np.ndarray, model: nn.Module | None = None, *, seed: int = 0,
               context: DefenseContext | None = None) -> Detection:
        """Score the inputs ``data`` (an ImageSet or uint8 images (N, H, W, C)) presented to ``model``."""
        images = data.images if isinstance(data, ImageSet) else np.asarray(data)
        if isinstance(data, ImageSet):
            self._check_inputs(data, model)
        elif model is None:
            raise ConfigError("defense 'strip' needs the deployed model")
        reference = context.reference if context is not None else None
        if reference is None or len(reference) < 2:
            raise ConfigError("defense 'strip' needs clean held-out images (DefenseContext.reference), at least 2")
        if images.dtype != np.uint8 or images.shape[1:] != reference.shape[1:]:
            raise ConfigError(f"defense 'strip': inputs {images.dtype} {images.shape[1:]} and held-out images "
                              f"{reference.dtype} {reference.shape[1:]} must be uint8 of one shape")
        p = self.params
        fit = reference
        if len(reference) > p.reference_images:
            fit = reference[np.sort(np.random.default_rng(seed).choice(len(reference), p.reference_images,
                                                                       replace=False))]
        clean_h = strip_entropy(model, fit, reference, overlays=p.overlays, blend=p.blend, seed=seed,
                                batch_size=p.batch_size)
        if p.boundary == "normal":
            boundary = float(norm.ppf(p.frr, loc=clean_h.mean(), scale=max(clean_h.std(ddof=1), 1e-12)))
        else:
            boundary = float(np.quantile(clean_h, p.frr))
        h = strip_entropy(model, images, reference, overlays=p.overlays, blend=p.blend, seed=seed + 1,
                          batch_size=p.batch_size)
        meta = {"boundary_entropy": boundary, "reference_entropy_mean": float(clean_h.mean()),
                "reference_entropy_std": float(clean_h.std(ddof=1)), "reference_images": len(fit),
                "reference_rejected": float((clean_h < boundary).mean())}
        return Detection(self.name, -h, h < boundary, -boundary, meta)
