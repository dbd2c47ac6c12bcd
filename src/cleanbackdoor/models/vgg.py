"""VGG-11 / VGG-19 with batch normalization (Simonyan & Zisserman), CIFAR-sized.

Max-pooling layers that would shrink the feature map below 1x1 are skipped, so 8x8 digits work too.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cleanbackdoor.errors import ConfigError
from cleanbackdoor.models.common import activation

_CFG = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    param_help: ClassVar[dict[str, str]] = {
        "depth": "VGG configuration: 11 or 19",
        "width_mult": "multiplies every conv layer's channels (at least 8 each)",
        "act": "activation: relu, leaky_relu (slope 0.1), gelu or none",
    }

    def __init__(self, in_channels: int, image_size: tuple[int, int], depth: int = 11, width_mult: float = 1.0,
                 act: str = "relu") -> None:
        super().__init__()
        if depth not in _CFG:
            raise ConfigError(f"VGG depth must be one of {sorted(_CFG)}, got {depth}")
        layers: list[nn.Module] = []
        c, size = in_channels, min(image_size)
        for v in _CFG[depth]:
            if v == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            cout = max(8, int(v * width_mult))
            layers += [nn.Conv2d(c, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), activation(act)]
            c = cout
        self.body = nn.Sequential(*layers)
        self.feature_dim = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.body(x), 1).flatten(1)
