"""Small shared pieces of the architectures."""

from __future__ import annotations

from torch import nn

from cleanbackdoor.errors import unknown_name

ACTIVATIONS = {
    "relu": lambda: nn.ReLU(),
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "gelu": lambda: nn.GELU(),
    "none": lambda: nn.Identity(),
}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise unknown_name("activation", name, ACTIVATIONS)
    return ACTIVATIONS[name]()
