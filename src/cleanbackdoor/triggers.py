"""Test-time triggers: seeded functions of a uint8 image batch (N, H, W, C) -> (N, H, W, C).

Every trigger is built for one image shape and scales its geometry to it: the papers give sizes for 32x32 CIFAR
images; on 8x8 digits or 28x28 MNIST the same trigger covers the same share of the image (never below the
size at which it is still a pattern). Randomness (a random patch position, a random pattern) comes from the
trigger's ``seed``, so the same trigger applied twice to the same batch gives the same images.

| name        | what it does                                                                   | from          |
|-------------|--------------------------------------------------------------------------------|---------------|
| patch       | a square patch (checkerboard, white, seeded noise or a seeded smooth grid of    | BadNets; HTBA |
|             | saturated colours, ``pattern = "colors"``) at a corner,                         |               |
|             | a given (row, col), or a random position per image                              |               |
| sinusoidal  | amplitude * sin(linspace(0, 2*pi*periods, W)) added along the width, all rows   | FLIP (Barni)  |
| pixels      | FLIP's three single pixels with fixed colours, positions scaled from 32x32      | FLIP          |
| turner      | a +-255 checkerboard in all four corners                                        | Turner et al. |
| blend       | (1 - alpha) * x + alpha * a seeded uniform-noise image                          | Chen et al.   |
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from cleanbackdoor.errors import ConfigError, DataError, unknown_name


def _scaled(size_at_32: float, side: int, minimum: int) -> int:
    return max(minimum, int(round(size_at_32 * side / 32)))


@dataclass
class Trigger(ABC):
    """Base class: subclasses are dataclasses whose fields are the trigger's parameters."""

    image_shape: tuple[int, int, int]  # (C, H, W)
    seed: int = 0
    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        c, h, w = self.image_shape
        if c not in (1, 3) or h < 4 or w < 4:
            raise ConfigError(f"trigger {self.name!r}: unsupported image shape {self.image_shape}")
        self._check_params()

    def _check_params(self) -> None:  # pragma: no cover - overridden where there is something to check
        pass

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(f"trigger {self.name!r} takes uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
        c, h, w = self.image_shape
        if images.shape[1:] != (h, w, c):
            raise DataError(f"trigger {self.name!r} was built for {(h, w, c)} images, got {images.shape[1:]}")
        out = self._apply(images.astype(np.float32))
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    @abstractmethod
    def _apply(self, x: np.ndarray) -> np.ndarray:
        """x: float32 (N, H, W, C) on the 0..255 scale; returns the same shape, unclipped."""

    def params(self) -> dict:
        """The parameters that reproduce this trigger (name included)."""
        out = {"name": self.name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


_CORNERS = {"bottom-right", "bottom-left", "top-right", "top-left", "random"}


# Saturated colours: black, white, red, green, blue, cyan, magenta, yellow.
_SATURATED = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 255, 255],
                       [255, 0, 255], [255, 255, 0]], dtype=np.float32)


def _bilinear(grid: np.ndarray, size: int) -> np.ndarray:
    """A (g, g, C) grid of cells resized to (size, size, C) by bilinear interpolation between the cells' centres
    (the edges hold the outer cells' colours)."""
    g = grid.shape[0]
    x = np.clip((np.arange(size) + 0.5) * g / size - 0.5, 0, g - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, g - 1)
    t = (x - lo).astype(np.float32)
    rows = grid[lo] * (1 - t)[:, None, None] + grid[hi] * t[:, None, None]  # along the height
    return rows[:, lo] * (1 - t)[None, :, None] + rows[:, hi] * t[None, :, None]


@dataclass
class PatchTrigger(Trigger):
    """A square patch; ``size`` None means 3 pixels at 32x32, scaled to the image (at least 2)."""

    size: int | None = dataclasses.field(
        default=None, metadata={"description": "side of the square patch in pixels; None: 3 at 32x32, scaled to the "
                                               "image (at least 2)"})
    position: str | tuple[int, int] = dataclasses.field(
        default="bottom-right", metadata={"description": "a corner (bottom-right, bottom-left, top-right, top-left), "
                                                         "random (per image) or [row, col] of the top-left pixel"})
    pattern: str = dataclasses.field(
        default="checkerboard", metadata={"description": "checkerboard, white, black, random (seeded noise) or colors "
                                                         "(a seeded smooth grid of saturated colours)"})
    margin: int = dataclasses.field(
        default=1, metadata={"description": "pixels between a corner patch and the image border"})
    grid: int = dataclasses.field(
        default=5, metadata={"description": 'pattern "colors": cells per side of the colour grid before it is '
                                            "smoothed to the patch size"})
    name: ClassVar[str] = "patch"

    def _check_params(self) -> None:
        _, h, w = self.image_shape
        if self.size is None:
            self.size = _scaled(3, min(h, w), 2)
        if not 1 <= self.size <= min(h, w) - 2 * self.margin:
            raise ConfigError(f"patch size must be in [1, {min(h, w) - 2 * self.margin}] for {h}x{w} images, "
                              f"got {self.size}")
        if isinstance(self.position, str):
            if self.position not in _CORNERS:
                raise ConfigError(f"patch position must be (row, col) or one of {sorted(_CORNERS)}, "
                                  f"got {self.position!r}")
        else:
            r, c = self.position = tuple(int(v) for v in self.position)
            if not (0 <= r <= h - self.size and 0 <= c <= w - self.size):
                raise ConfigError(f"patch at {self.position} of size {self.size} does not fit a {h}x{w} image")
        patterns = {"checkerboard", "white", "black", "random", "colors"}
        if self.pattern not in patterns:
            raise ConfigError(f"patch pattern must be one of {sorted(patterns)}, got {self.pattern!r}")
        if self.grid < 2:
            raise ConfigError(f"patch grid must be at least 2 cells per side, got {self.grid}")
        self._patch = self._make_pattern()

    def _make_pattern(self) -> np.ndarray:
        c, s = self.image_shape[0], self.size
        if self.pattern == "checkerboard":
            board = (np.indices((s, s)).sum(axis=0) % 2 == 0).astype(np.float32) * 255
            return np.repeat(board[:, :, None], c, axis=2)
        if self.pattern == "white":
            return np.full((s, s, c), 255, np.float32)
        if self.pattern == "black":
            return np.zeros((s, s, c), np.float32)
        rng = np.random.default_rng(self.seed)
        if self.pattern == "colors":  # the hidden-trigger authors' kind of trigger, drawn here
            cells = _SATURATED[rng.integers(0, len(_SATURATED), (self.grid, self.grid))]
            smooth = _bilinear(cells, s)
            return smooth if c == 3 else smooth.mean(axis=2, keepdims=True)
        return rng.integers(0, 256, (s, s, c)).astype(np.float32)

    def positions(self, n: int) -> np.ndarray:
        """(n, 2) top-left corners of the patch for a batch of n images."""
        _, h, w = self.image_shape
        s, m = self.size, self.margin
        if self.position == "random":
            rng = np.random.default_rng(self.seed + 1)
            return np.stack([rng.integers(0, h - s + 1, n), rng.integers(0, w - s + 1, n)], axis=1)
        if isinstance(self.position, tuple):
            rc = self.position
        else:
            vert, horiz = self.position.split("-")
            rc = (m if vert == "top" else h - s - m, m if horiz == "left" else w - s - m)
        return np.tile(np.asarray(rc), (n, 1))

    def _apply(self, x: np.ndarray) -> np.ndarray:
        s = self.size
        pos = self.positions(x.shape[0])
        if self.position != "random":
            r, c = pos[0]
            x[:, r:r + s, c:c + s, :] = self._patch
            return x
        for i, (r, c) in enumerate(pos):
            x[i, r:r + s, c:c + s, :] = self._patch
        return x


@dataclass
class SinusoidalTrigger(Trigger):
    """FLIP's default: amplitude * sin(linspace(0, 2 pi periods, W)) added to every row and channel."""

    amplitude: float = dataclasses.field(
        default=6.0, metadata={"description": "peak of the added sine in grey levels (0..255 scale), in (0, 255]"})
    periods: float = dataclasses.field(
        default=8.0, metadata={"description": "sine periods across the image width, > 0"})
    name: ClassVar[str] = "sinusoidal"

    def _check_params(self) -> None:
        if not 0 < self.amplitude <= 255 or self.periods <= 0:
            raise ConfigError("sinusoidal trigger needs 0 < amplitude <= 255 and periods > 0, "
                              f"got {self.amplitude}, {self.periods}")

    def _apply(self, x: np.ndarray) -> np.ndarray:
        w = self.image_shape[2]
        wave = self.amplitude * np.sin(np.linspace(0, 2 * np.pi * self.periods, w, dtype=np.float64))
        return x + wave.astype(np.float32)[None, None, :, None]


# FLIP's pixel trigger on 32x32 images: (row, col) and RGB colour.
_FLIP_PIXELS = (((11, 16), (101, 0, 25)), ((5, 27), (101, 123, 121)), ((30, 7), (0, 36, 54)))


@dataclass
class PixelsTrigger(Trigger):
    """FLIP's three single pixels, positions scaled from 32x32; grey images get each colour's mean."""

    name: ClassVar[str] = "pixels"

    def _apply(self, x: np.ndarray) -> np.ndarray:
        c, h, w = self.image_shape
        for (r, col), rgb in _FLIP_PIXELS:
            rr, cc = min(h - 1, r * h // 32), min(w - 1, col * w // 32)
            x[:, rr, cc, :] = np.asarray(rgb, np.float32) if c == 3 else float(np.mean(rgb))
        return x


@dataclass
class TurnerTrigger(Trigger):
    """A +-255 checkerboard of ``size`` (3 at 32x32) in each of the four corners (Turner et al. 2019)."""

    size: int | None = dataclasses.field(
        default=None, metadata={"description": "side of each corner checkerboard in pixels; None: 3 at 32x32, scaled "
                                               "to the image (at least 2)"})
    name: ClassVar[str] = "turner"

    def _check_params(self) -> None:
        _, h, w = self.image_shape
        if self.size is None:
            self.size = _scaled(3, min(h, w), 2)
        if not 1 <= self.size <= min(h, w) // 2:
            raise ConfigError(f"turner size must be in [1, {min(h, w) // 2}], got {self.size}")

    def _apply(self, x: np.ndarray) -> np.ndarray:
        s = self.size
        board = np.where(np.indices((s, s)).sum(axis=0) % 2 == 0, 255.0, -255.0).astype(np.float32)[:, :, None]
        # mirrored in each corner, as in the label-consistent attack
        x[:, :s, :s] += board
        x[:, :s, -s:] += board[:, ::-1]
        x[:, -s:, :s] += board[::-1, :]
        x[:, -s:, -s:] += board[::-1, ::-1]
        return x


@dataclass
class BlendTrigger(Trigger):
    """Blend with a fixed, seeded uniform-noise image: (1 - alpha) * x + alpha * noise."""

    alpha: float = dataclasses.field(
        default=0.1, metadata={"description": "weight of the noise image: (1 - alpha) * x + alpha * noise, in (0, 1)"})
    name: ClassVar[str] = "blend"

    def _check_params(self) -> None:
        if not 0 < self.alpha < 1:
            raise ConfigError(f"blend alpha must be in (0, 1), got {self.alpha}")
        c, h, w = self.image_shape
        self._noise = np.random.default_rng(self.seed).integers(0, 256, (h, w, c)).astype(np.float32)

    def _apply(self, x: np.ndarray) -> np.ndarray:
        return (1 - self.alpha) * x + self.alpha * self._noise


TRIGGERS: dict[str, type[Trigger]] = {
    cls.name: cls for cls in (PatchTrigger, SinusoidalTrigger, PixelsTrigger, TurnerTrigger, BlendTrigger)
}


def build_trigger(name: str, image_shape: tuple[int, int, int], seed: int = 0, **params) -> Trigger:
    """Build the named trigger for (C, H, W) images; unknown names or parameters raise ConfigError."""
    if name not in TRIGGERS:
        raise unknown_name("trigger", name, TRIGGERS)
    cls = TRIGGERS[name]
    allowed = {f.name for f in dataclasses.fields(cls)} - {"image_shape", "seed"}
    extra = set(params) - allowed
    if extra:
        raise ConfigError(f"trigger {name!r} has no parameter {sorted(extra)[0]!r}; "
                          f"allowed: {', '.join(sorted(allowed)) or 'none'}")
    if isinstance(params.get("position"), list):
        params["position"] = tuple(params["position"])
    return cls(image_shape=tuple(image_shape), seed=seed, **params)
