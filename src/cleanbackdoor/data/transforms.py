"""Tensor-side transforms: uint8 arrays to float tensors, and seeded augmentation on batches.

Augmentation is split into *drawing* parameters and *applying* them, so two computations can see exactly the
same augmentation draw (FLIP's expert and student steps need that). Everything runs on whole batches on the
batch's device; there is no per-image Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def to_nchw(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, C) -> uint8 (N, C, H, W) with standard strides, on ``device``.

    (``permute(...).contiguous()`` would keep odd strides for C = 1, which some functional transforms reject.)
    """
    n, h, w, c = images.shape
    out = torch.empty((n, c, h, w), dtype=torch.uint8, device=device)
    out.copy_(torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2))
    return out


def to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [0, 1] on ``device``."""
    return to_nchw(images, device).float().div_(255.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, C, H, W) in [0, 1] -> uint8 (N, H, W, C), rounded and clipped."""
    return x.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a uint8 image array, on the [0, 1] scale (for a model's normalization)."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    std = x.std(axis=0)
    return tuple(float(v) for v in x.mean(axis=0)), tuple(float(max(v, 1e-3)) for v in std)


@dataclass(frozen=True)
class AugmentDraw:
    """The random parameters of one augmentation of a batch: integer shifts and flip flags."""

    dy: torch.Tensor  # (N,) int64 in [-pad, pad]
    dx: torch.Tensor  # (N,) int64
    flip: torch.Tensor  # (N,) bool


@dataclass(frozen=True)
class Augment:
    """Random crop with zero padding (as a translation) and horizontal flip, applied to float NCHW batches.

    ``crop_padding`` = 0 and ``hflip`` = False make it the identity. Random-crop-with-padding of an H x W image
    from its zero-padded (H + 2p) x (W + 2p) version is the same as shifting the image by (dy, dx) in [-p, p]
    and filling with zeros, which is what :meth:`apply` does with one gather.
    """

    crop_padding: int = 0
    hflip: bool = False

    @property
    def identity(self) -> bool:
        return self.crop_padding == 0 and not self.hflip

    def draw(self, n: int, generator: torch.Generator) -> AugmentDraw:
        p = self.crop_padding
        dev = generator.device
        if p > 0:
            shifts = torch.randint(-p, p + 1, (2, n), generator=generator, device=dev)
            dy, dx = shifts[0], shifts[1]
        else:
            dy = dx = torch.zeros(n, dtype=torch.int64, device=dev)
        flip = ((torch.rand(n, generator=generator, device=dev) < 0.5) if self.hflip
                else torch.zeros(n, dtype=torch.bool, device=dev))
        return AugmentDraw(dy, dx, flip)

    def apply(self, x: torch.Tensor, draw: AugmentDraw) -> torch.Tensor:
        if self.identity:
            return x
        n, c, h, w = x.shape
        dev = x.device
        dy, dx, flip = draw.dy.to(dev), draw.dx.to(dev), draw.flip.to(dev)
        if self.hflip:
            x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
        p = self.crop_padding
        if p == 0:
            return x
        padded = F.pad(x, (p, p, p, p))
        rows = (torch.arange(h, device=dev).view(1, h) + p - dy.view(n, 1))  # (N, H) rows of the padded image
        cols = (torch.arange(w, device=dev).view(1, w) + p - dx.view(n, 1))  # (N, W)
        idx_r = rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * p)
        out = padded.gather(2, idx_r)
        idx_c = cols.view(n, 1, 1, w).expand(n, c, h, w)
        return out.gather(3, idx_c)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.identity:
            return x
        return self.apply(x, self.draw(x.shape[0], generator))
