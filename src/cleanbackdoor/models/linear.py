"""A two-layer fully connected net (the MNIST model of the clean-image backdoor authors).

Flatten -> Linear(d, hidden) -> activation (none by default: a linear model) ; the classifier's head is the
second layer.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from cleanbackdoor.models.common import activation


class LinearNet(nn.Module):
    param_help: ClassVar[dict[str, str]] = {
        "hidden": "units of the first layer (the features the head reads)",
        "act": "activation after the first layer: none (a linear model), relu, leaky_relu (slope 0.1) or gelu",
    }

    def __init__(self, in_channels: int, image_size: tuple[int, int], hidden: int = 256, act: str = "none") -> None:
        super().__init__()
        d = in_channels * math.prod(image_size)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), activation(act))
        self.feature_dim = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)
