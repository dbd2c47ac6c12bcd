"""AlexNet-style extractor for small images (after Krizhevsky, Sutskever, Hinton, NeurIPS 2012).

The hidden-trigger paper (Saha et al., AAAI 2020) attacks AlexNet's fc7: the features after the second wide fully
connected ReLU layer, on which the victim retrains fc8. This is the same shape of network sized for 32x32 inputs:
five convolutions (5x5, 5x5, 3x3, 3x3, 3x3; widths w, 3w, 6w, 4w, 4w with w = ``width``, AlexNet's 64, 192, 384,
256, 256 at w = 64) with a 2x2 max pool after the first, second and fifth, then two fully connected ReLU layers of
``fc`` units (fc6, fc7). The backbone returns fc7, so the classifier's head is fc8.

Deviations from AlexNet: stride-1 convolutions and 2x2 pools for 32x32 inputs instead of 224x224 (a pool that would
shrink the map below 1x1 is skipped, so 8x8 digits work too), ``fc`` = 1,024 by default instead of 4,096, and batch
normalization after each convolution (``norm = "batch"``, the default) so that it trains in a CPU budget; ``norm =
"none"`` is AlexNet's plain stack (local response normalization is left out).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from cleanbackdoor.errors import ConfigError

_LAYERS = ((1, 5, True), (3, 5, True), (6, 3, False), (4, 3, False), (4, 3, True))  # (width factor, kernel, pool)


class AlexNet(nn.Module):
    param_help: ClassVar[dict[str, str]] = {
        "width": "channels of the first convolution; the five have width x 1, 3, 6, 4, 4 (AlexNet: 64)",
        "fc": "units of each of the two fully connected ReLU layers, fc6 and fc7 (AlexNet: 4,096); fc7 is the "
              "feature layer",
        "dropout": "dropout before fc6 and fc7 while training (AlexNet: 0.5)",
        "norm": 'batch: batch normalization after each convolution; none: the plain AlexNet stack',
    }

    def __init__(self, in_channels: int, image_size: tuple[int, int], width: int = 64, fc: int = 1024,
                 dropout: float = 0.5, norm: str = "batch") -> None:
        super().__init__()
        if norm not in ("batch", "none"):
            raise ConfigError(f"alexnet norm must be 'batch' or 'none', got {norm!r}")
        if width < 1 or fc < 1 or not 0 <= dropout < 1:
            raise ConfigError(f"alexnet needs width >= 1, fc >= 1 and dropout in [0, 1), got {width}, {fc}, {dropout}")
        layers: list[nn.Module] = []
        c, (h, w) = in_channels, image_size
        for factor, kernel, pool in _LAYERS:
            cout = factor * width
            layers.append(nn.Conv2d(c, cout, kernel, padding=kernel // 2, bias=norm == "none"))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(cout))
            layers.append(nn.ReLU(inplace=True))
            if pool and min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = cout
        self.features = nn.Sequential(*layers)
        self.fc6 = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c * h * w, fc), nn.ReLU(inplace=True))
        self.fc7 = nn.Sequential(nn.Dropout(dropout), nn.Linear(fc, fc), nn.ReLU(inplace=True))
        self.feature_dim = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc7(self.fc6(self.features(x)))
