"""A small Vision Transformer (Dosovitskiy et al.) for 8..32 pixel images.

Patch size: the divisor of the image side closest to side / 8 (32x32 -> 4x4 patches, 8x8 -> 1x1), a learned
class token and position embedding, pre-norm encoder layers, the class token's final state as the features.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn


def _patch_size(h: int, w: int) -> int:
    g = math.gcd(h, w)
    divisors = [d for d in range(1, g + 1) if g % d == 0]
    return min(divisors, key=lambda d: (abs(d - max(h, w) / 8), d))


class ViT(nn.Module):
    param_help: ClassVar[dict[str, str]] = {
        "dim": "token width (the features' size)",
        "depth": "encoder layers (pre-norm)",
        "heads": "attention heads per layer",
        "mlp_ratio": "hidden width of each encoder MLP, as a multiple of dim",
        "patch": "patch side in pixels; None: the divisor of the image side closest to side / 8",
        "dropout": "dropout rate inside the encoder layers",
    }

    def __init__(self, in_channels: int, image_size: tuple[int, int], dim: int = 128, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 2.0, patch: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        h, w = image_size
        p = patch or _patch_size(h, w)
        self.embed = nn.Conv2d(in_channels, dim, p, p)
        n_tokens = (h // p) * (w // p)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n_tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.feature_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.norm(self.encoder(tokens)[:, 0])
