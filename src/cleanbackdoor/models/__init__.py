"""Model registry: ``build_model(name, input_shape, num_classes)`` for every architecture the toolkit trains.

Every model takes float images in [0, 1], shape (N, C, H, W), and normalizes them itself (a fixed first layer),
so attacks that work in pixel space (hidden-trigger poisons, feature nudges) never need to know the statistics.
Each model exposes ``features(x)`` (the backbone's representation) and ``head``: the final linear layer, or with
``head_hidden`` > 0 a small MLP (linear -> ReLU -> linear). Fine-tuning "the last layer" of a pretrained extractor
(``train.finetune = "last"``) trains the whole head, so an MLP head lets a transfer-learning victim combine
features non-linearly (a multi-label victim must, to learn a category-combination trigger) while its backbone
stays frozen.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from cleanbackdoor.errors import ConfigError, unknown_name
from cleanbackdoor.models.alexnet import AlexNet
from cleanbackdoor.models.convnet import ConvNet
from cleanbackdoor.models.linear import LinearNet
from cleanbackdoor.models.resnet import CifarResNet, PreActResNet, ResNet18
from cleanbackdoor.models.vgg import VGG
from cleanbackdoor.models.vit import ViT

Builder = Callable[..., nn.Module]

MODELS: dict[str, Builder] = {
    "convnet": ConvNet,
    "linear": LinearNet,
    "resnet20": functools.partial(CifarResNet, depth=20),
    "resnet32": functools.partial(CifarResNet, depth=32),
    "preact-resnet20": functools.partial(PreActResNet, depth=20),
    "preact-resnet32": functools.partial(PreActResNet, depth=32),
    "resnet18": ResNet18,
    "vgg11": functools.partial(VGG, depth=11),
    "vgg19": functools.partial(VGG, depth=19),
    "vit": ViT,
    "alexnet": AlexNet,
}


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """Normalization + a backbone that maps images to features + a head (linear, or an MLP: :func:`make_head`)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int,
                 mean: tuple[float, ...], std: tuple[float, ...], head_hidden: int | Sequence[int] = 0) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone
        self.head = make_head(feature_dim, num_classes, head_hidden)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_head(feature_dim: int, num_classes: int, hidden: int | Sequence[int] = 0) -> nn.Module:
    """The classifier's head: ``Linear(feature_dim, num_classes)``; with ``hidden`` > 0 ``Linear(feature_dim,
    hidden) -> ReLU -> Linear(hidden, num_classes)``; a list of sizes stacks that many hidden layers."""
    sizes = [hidden] if isinstance(hidden, int) else list(hidden)
    if any(not isinstance(h, int) or h < 0 for h in sizes) or (len(sizes) > 1 and 0 in sizes):
        raise ConfigError(f"head_hidden must be >= 0 (0: a linear head) or a list of positive sizes, got {hidden}")
    sizes = [h for h in sizes if h]
    if not sizes:
        return nn.Linear(feature_dim, num_classes)
    layers: list[nn.Module] = []
    for h in sizes:
        layers += [nn.Linear(feature_dim, h), nn.ReLU()]
        feature_dim = h
    return nn.Sequential(*layers, nn.Linear(feature_dim, num_classes))


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int,
                mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                head_hidden: int | Sequence[int] = 0, **options) -> Classifier:
    """Build the named architecture for images of ``input_shape`` = (C, H, W) and ``num_classes`` outputs.

    ``head_hidden``: units of a hidden layer in the head (0: a linear head), or a list of sizes for several;
    ``options`` go to the backbone."""
    if name not in MODELS:
        raise unknown_name("model", name, MODELS)
    builder = MODELS[name]
    fixed = builder.keywords if isinstance(builder, functools.partial) else {}
    clash = sorted(set(options) & set(fixed))
    if clash:  # a partial would let the option override what the name fixes (resnet20 with depth=32)
        raise ConfigError(f"model {name!r}: {clash[0]} is fixed by the name ({clash[0]}={fixed[clash[0]]})")
    c, h, w = input_shape
    mean = mean or (0.5,) * c
    std = std or (0.25,) * c
    try:
        backbone = builder(in_channels=c, image_size=(h, w), **options)
    except TypeError as e:  # an option the architecture does not take
        raise ConfigError(f"model {name!r}: {e}") from None
    return Classifier(backbone, backbone.feature_dim, num_classes, mean, std, head_hidden)
