"""ResNets for small images.

- :class:`CifarResNet`: He et al. (2016), section 4.2: 3 stages of n basic blocks with 16/32/64 channels,
  depth 6n + 2 (ResNet-20: n = 3; ResNet-32: n = 5).
- :class:`PreActResNet`: the same layout with pre-activation blocks (He et al., "Identity mappings", 2016); FLIP's
  experts use it with LeakyReLU(0.1).
- :class:`ResNet18`: the CIFAR variant of ResNet-18 (3x3 stem, no max-pool), 64..512 channels.

All end in average pooling of the last feature map: global by default, or over a ``pool`` x ``pool`` grid of
regions (features of size channels * pool**2), which keeps where things are, e.g. which tile of a multi-label
mosaic holds which object; ``pool = "max"`` takes the global maximum instead (a trigger patch anywhere in the
image keeps its response, where an average spreads it over every cell: the hidden-trigger attack). Pooling has
no weights, so an extractor pretrained with global pooling serves a victim that pools over a grid or takes the
maximum (:func:`cleanbackdoor.pretrain.victim_from_pretrained`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cleanbackdoor.errors import ConfigError
from cleanbackdoor.models.common import activation


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act1, self.act2 = activation(act), activation(act)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: str) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.act1, self.act2 = activation(act), activation(act)
        self.shortcut = None if (stride == 1 and cin == cout) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.act2(self.bn2(out)))
        return out + skip


class _StagedResNet(nn.Module):
    block: type[nn.Module]
    preact: bool

    def __init__(self, in_channels: int, image_size: tuple[int, int], blocks: list[int], widths: list[int],
                 act: str = "relu", pool: int | str = 1) -> None:
        super().__init__()
        if pool != "max" and (isinstance(pool, str) or isinstance(pool, bool) or pool < 1):
            raise ConfigError(f"pool must be >= 1 (1: global average pooling) or 'max' (global max pooling), "
                              f"got {pool!r}")
        self.pool = pool
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.stem_bn = nn.Identity() if self.preact else nn.BatchNorm2d(widths[0])
        self.stem_act = nn.Identity() if self.preact else activation(act)
        stages = []
        cin = widths[0]
        for i, (n, cout) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                layers.append(self.block(cin, cout, stride if j == 0 else 1, act))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.final = nn.Sequential(nn.BatchNorm2d(cin), activation(act)) if self.preact else nn.Identity()
        self.feature_dim = cin if pool == "max" else cin * pool * pool

    def extra_repr(self) -> str:  # the pooling grid has no weights: repr shows it (a key of cached features)
        return f"pool={self.pool}, feature_dim={self.feature_dim}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stem_act(self.stem_bn(self.stem(x)))
        out = self.final(self.stages(out))
        if self.pool == "max":  # a small patch anywhere survives a maximum, not an average over every cell
            return F.adaptive_max_pool2d(out, 1).flatten(1)
        return F.adaptive_avg_pool2d(out, self.pool).flatten(1)


# parameter help shared by the staged ResNets (``param_help``, which `cleanbackdoor describe` prints)
_ACT_HELP = "activation: relu, leaky_relu (slope 0.1), gelu or none"
_POOL_HELP = 'pooling of the last feature map: n >= 1 averages over an n x n grid (1: global), "max": global max'
_CIFAR_WIDTH_HELP = "channels of the first stage; the stages have width, 2 * width, 4 * width"


def _cifar_blocks(depth: int) -> list[int]:
    if depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110), got {depth}")
    return [(depth - 2) // 6] * 3


class CifarResNet(_StagedResNet):
    block = BasicBlock
    preact = False
    param_help: ClassVar[dict[str, str]] = {
        "depth": "layers, 6n + 2 (20, 32, 44, 56, 110): 3 stages of n basic blocks",
        "width": _CIFAR_WIDTH_HELP,
        "act": _ACT_HELP,
        "pool": _POOL_HELP,
    }

    def __init__(self, in_channels: int, image_size: tuple[int, int], depth: int = 20, width: int = 16,
                 act: str = "relu", pool: int | str = 1) -> None:
        super().__init__(in_channels, image_size, _cifar_blocks(depth), [width, 2 * width, 4 * width], act, pool)


class PreActResNet(_StagedResNet):
    block = PreActBlock
    preact = True
    param_help: ClassVar[dict[str, str]] = {
        "depth": "layers, 6n + 2 (20, 32, 44, 56, 110): 3 stages of n pre-activation blocks",
        "width": _CIFAR_WIDTH_HELP,
        "act": _ACT_HELP + " (FLIP's experts: leaky_relu)",
        "pool": _POOL_HELP,
    }

    def __init__(self, in_channels: int, image_size: tuple[int, int], depth: int = 32, width: int = 16,
                 act: str = "leaky_relu", pool: int | str = 1) -> None:
        super().__init__(in_channels, image_size, _cifar_blocks(depth), [width, 2 * width, 4 * width], act, pool)


class ResNet18(_StagedResNet):
    block = BasicBlock
    preact = False
    param_help: ClassVar[dict[str, str]] = {
        "width": "channels of the first stage; the four stages have width, 2, 4 and 8 times width",
        "act": _ACT_HELP,
        "pool": _POOL_HELP,
    }

    def __init__(self, in_channels: int, image_size: tuple[int, int], width: int = 64, act: str = "relu",
                 pool: int | str = 1) -> None:
        super().__init__(in_channels, image_size, [2, 2, 2, 2], [width, 2 * width, 4 * width, 8 * width], act, pool)
