"""The small ConvNet of the dataset-distillation literature (Zhao & Bilen; Cazenavette et al.).

Blocks of conv3x3 (``width`` channels) -> instance norm (GroupNorm with one group per channel, affine) ->
activation -> 2x2 average pooling; ``depth`` blocks (3 by default, fewer when the image is too small to pool
three times). It has no running statistics, which keeps functional training steps (FLIP) exact.

``hidden`` > 0 adds a fully connected layer of that many units (and the activation) after the flattened feature
map, so the features the linear head reads are a non-linear function of every position: a multi-label victim can
then combine objects seen in different places (a category-combination trigger is a conjunction), as the attention
decoder heads of the multi-label literature (ML-Decoder) can. On the CIFAR-10 mosaics it raises the clean mAP but
not the backdoor's ASR (docs/attacks/multilabel.md).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from cleanbackdoor.errors import ConfigError
from cleanbackdoor.models.common import activation


class ConvNet(nn.Module):
    param_help: ClassVar[dict[str, str]] = {
        "width": "channels of every conv block",
        "depth": "conv blocks, each halving the image; fewer when the image is too small to pool that often",
        "act": "activation: relu, leaky_relu (slope 0.1), gelu or none",
        "norm": "instance (GroupNorm, one group per channel), batch (BatchNorm); any other value: none",
        "hidden": "units of a fully connected layer after the flattened feature map; 0: none",
    }

    def __init__(self, in_channels: int, image_size: tuple[int, int], width: int = 128, depth: int = 3,
                 act: str = "relu", norm: str = "instance", hidden: int = 0) -> None:
        super().__init__()
        h, w = image_size
        depth = max(1, min(depth, int(math.log2(min(h, w)))))
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(depth):
            layers.append(nn.Conv2d(c, width, 3, padding=1))
            if norm == "instance":
                layers.append(nn.GroupNorm(width, width, affine=True))
            elif norm == "batch":
                layers.append(nn.BatchNorm2d(width))
            layers.append(activation(act))
            layers.append(nn.AvgPool2d(2))
            c, h, w = width, h // 2, w // 2
        layers.append(nn.Flatten())
        self.feature_dim = width * h * w
        if hidden < 0:
            raise ConfigError(f"model 'convnet': hidden must be >= 0 (0: no hidden layer), got {hidden}")
        if hidden:
            layers += [nn.Linear(self.feature_dim, hidden), activation(act)]
            self.feature_dim = hidden
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
