"""The losses a recipe names (``train.loss``): cross-entropy on hard or soft labels, BCE and ASL on 0/1 label sets."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cleanbackdoor.errors import ConfigError
from cleanbackdoor.recipes import TrainConfig


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 4.0, gamma_pos: float = 0.0,
                    clip: float = 0.05, eps: float = 1e-8, detach_focal: bool = True) -> torch.Tensor:
    """ASL (Ridnik et al., ICCV 2021): focusing on positives/negatives and probability shifting of negatives.

    With p = sigmoid(z) and p_m = max(p - clip, 0): -[y (1 - p)^gamma_pos log p + (1 - y) p_m^gamma_neg log(1 - p_m)].
    ``detach_focal``: the focusing weights (1 - p)^gamma_pos and p_m^gamma_neg carry no gradient, as in the
    multi-label backdoor authors' recipe (``AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05,
    disable_torch_grad_focal_loss=True)``). Returns the sum over labels averaged over the batch (the authors sum
    over the batch too: a constant factor, which Adam does not see)."""
    p = torch.sigmoid(logits)
    p_neg = (p - clip).clamp(min=0) if clip > 0 else p
    loss_pos = targets * torch.log(p.clamp(min=eps))
    loss_neg = (1 - targets) * torch.log((1 - p_neg).clamp(min=eps))
    if gamma_pos > 0:
        w_pos = (1 - p).pow(gamma_pos)
        loss_pos = loss_pos * (w_pos.detach() if detach_focal else w_pos)
    if gamma_neg > 0:
        w_neg = p_neg.pow(gamma_neg)
        loss_neg = loss_neg * (w_neg.detach() if detach_focal else w_neg)
    return -(loss_pos + loss_neg).sum(dim=1).mean()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def make_loss(cfg: TrainConfig, targets: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss for these targets: hard or soft cross-entropy for 'ce'; BCE or ASL for 0/1 label sets."""
    if cfg.loss == "ce":
        if targets.dtype == torch.int64:
            return F.cross_entropy
        return soft_cross_entropy
    if targets.dtype == torch.int64:
        raise ConfigError(f"loss {cfg.loss!r} is for multi-label targets (N, classes), got hard labels")
    if cfg.loss == "bce":
        return lambda z, t: F.binary_cross_entropy_with_logits(z, t, reduction="sum") / z.shape[0]
    return lambda z, t: asymmetric_loss(z, t, cfg.asl_gamma_neg, cfg.asl_gamma_pos, cfg.asl_clip)


def targets_tensor(targets: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Hard labels as int64, soft labels and 0/1 label sets as float32."""
    t = torch.as_tensor(targets)
    if t.ndim == 1:
        return t.long()
    return t.float()
