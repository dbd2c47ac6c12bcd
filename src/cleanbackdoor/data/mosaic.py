"""Composed multi-label sets: mosaics (grid x grid tiles) of real single-label images, labelled by the classes present.

Chen et al. (ICLR 2023) attack multi-label models trained on VOC and COCO, which are not available here. As the
paper summary suggests, a multi-label set is composed from a real single-label set (CIFAR-10, MNIST, digits): each
mosaic places ``grid * grid`` real images on a grid and its label set is the set of their classes. Unlike a real
scene set, the co-occurrence statistics are under the experimenter's control, so trigger combinations of known
rarity exist:

1. **Number of distinct classes** m of a mosaic: uniform in ``objects = [lo, hi]`` (at most grid * grid).
2. **Themes**: with probability ``theme_rates[i]`` a mosaic starts from theme i, a fixed class combination
   (``themes[i]``); at most one theme per mosaic (the rates must sum to at most 1). Themes are the strongly
   co-occurring combinations (high lift), from frequent to rare.
3. **Popularity**: the remaining classes (up to m) are drawn without replacement with weights
   (rank + 1) ** -skew, rank = class index: ``skew = 0`` makes all classes equally common; larger values make
   low-index classes, and the combinations among them, frequent and the others rare.
4. **Tiles**: every chosen class fills one cell; the remaining cells hold more instances of the chosen classes
   (drawn uniformly among them), so a mosaic's label set is exactly its m classes. Cells are shuffled. Each cell
   takes a real image of its class, cycling through a seeded shuffle of that class's images, so images are used
   about equally often. Tiles are resized to ``tile`` x ``tile`` pixels (box filter) when ``tile`` is given.

Training mosaics are made only of training images and test mosaics only of test images. The same source, options
and seed give the same mosaics, bit for bit. ``meta["tiles"]`` records the source index and class of every cell.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cleanbackdoor.data.imageset import ImageSet, Splits
from cleanbackdoor.errors import ConfigError, DataError

# Default themes (class indices, valid for any 10-class source) from frequent to rare. On CIFAR-10:
# {automobile, horse}, {frog, ship}, {airplane, cat, truck}, {bird, dog}.
DEFAULT_THEMES: tuple[tuple[int, ...], ...] = ((1, 7), (6, 8), (0, 3, 9), (2, 5))
DEFAULT_THEME_RATES: tuple[float, ...] = (0.08, 0.04, 0.02, 0.01)


class MosaicOptions(BaseModel):
    """The options of a composed mosaic set (also the catalog options of ``*-mosaic`` datasets)."""

    model_config = ConfigDict(extra="forbid")

    grid: int = Field(2, ge=1, le=8)
    tile: int | None = Field(None, ge=2, le=512)  # tile side in pixels; None keeps the source size
    train_size: int = Field(20_000, ge=1, le=2_000_000)
    test_size: int = Field(4_000, ge=1, le=2_000_000)
    objects: tuple[int, int] = (1, 4)
    skew: float = Field(0.5, ge=0, le=10)
    themes: list[list[int | str]] | None = None  # None: DEFAULT_THEMES (needs at least 10 classes)
    theme_rates: list[float] | None = None
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> MosaicOptions:
        lo, hi = self.objects
        if not 1 <= lo <= hi <= self.grid * self.grid:
            raise ValueError(f"objects must be [lo, hi] with 1 <= lo <= hi <= grid * grid = {self.grid ** 2}, "
                             f"got {list(self.objects)}")
        if (self.themes is None) != (self.theme_rates is None):
            raise ValueError("give both themes and theme_rates, or neither (for the defaults)")
        if self.themes is not None and self.theme_rates is not None:
            if len(self.themes) != len(self.theme_rates):
                raise ValueError(f"{len(self.themes)} themes but {len(self.theme_rates)} theme_rates")
            if any(r < 0 for r in self.theme_rates) or sum(self.theme_rates) > 1 + 1e-9:
                raise ValueError(f"theme_rates must be >= 0 and sum to at most 1, got {self.theme_rates}")
            for t in self.themes:
                if not 1 <= len(t) <= self.grid * self.grid:
                    raise ValueError(f"a theme needs 1 to grid * grid = {self.grid ** 2} classes, got {t}")
                if len(set(map(str, t))) != len(t):
                    raise ValueError(f"theme {t} names a class twice")
        return self


def mosaic_options(**options: Any) -> MosaicOptions:
    """Validated options, with a ConfigError naming the bad one."""
    try:
        return MosaicOptions(**options)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = "unknown option" if err.get("type") == "extra_forbidden" else err.get("msg", str(e))
        raise ConfigError(f"mosaic dataset: {loc + ': ' if loc else ''}{msg}") from None


def _resolve_themes(source: ImageSet, opts: MosaicOptions) -> tuple[list[tuple[int, ...]], np.ndarray]:
    if opts.themes is None:
        if source.num_classes < 10:
            raise ConfigError(f"the default mosaic themes need 10 classes; {source.name or 'the source'} has "
                              f"{source.num_classes}: give themes and theme_rates")
        themes = [tuple(t) for t in DEFAULT_THEMES]
        rates = np.array(DEFAULT_THEME_RATES, dtype=np.float64)
    else:
        themes = [tuple(source.class_index(c) for c in t) for t in opts.themes]
        rates = np.array(opts.theme_rates, dtype=np.float64)
    for t in themes:
        if len(t) > opts.grid ** 2:
            raise ConfigError(f"theme {t} does not fit a {opts.grid}x{opts.grid} mosaic")
        if len(set(t)) != len(t):
            raise ConfigError(f"theme {t} names a class twice")
    return themes, rates


def resize_tiles(images: np.ndarray, tile: int | None) -> np.ndarray:
    """Images (N, H, W, C) resized to tile x tile with a box filter (area average); unchanged when None or equal."""
    if tile is None or images.shape[1:3] == (tile, tile):
        return images
    out = np.empty((len(images), tile, tile, images.shape[3]), dtype=np.uint8)
    mode = "L" if images.shape[3] == 1 else "RGB"
    for i, img in enumerate(images):
        pil = Image.fromarray(img[..., 0] if mode == "L" else img, mode)
        arr = np.asarray(pil.resize((tile, tile), Image.Resampling.BOX), dtype=np.uint8)
        out[i] = arr[..., None] if mode == "L" else arr
    return out


def compose_mosaics(source: ImageSet, count: int, opts: MosaicOptions, seed: int, name: str = "") -> ImageSet:
    """``count`` mosaics of ``source``'s images (single-label) as a multi-label :class:`ImageSet`."""
    if source.multilabel:
        raise DataError(f"{source.name or 'source'}: mosaics are composed from a single-label set")
    k = source.num_classes
    per_class = [np.flatnonzero(source.labels == c) for c in range(k)]
    missing = [source.class_names[c] for c in range(k) if len(per_class[c]) == 0]
    if missing:
        raise DataError(f"{source.name or 'source'} has no image of class(es) {', '.join(missing)}")
    themes, rates = _resolve_themes(source, opts)
    rng = np.random.default_rng(seed)  # a smaller count gives a prefix of the same mosaics
    cells = opts.grid * opts.grid
    lo, hi = opts.objects
    weights = (np.arange(k) + 1.0) ** -opts.skew
    theme_probs = np.append(rates, max(0.0, 1.0 - rates.sum()))
    pools = [rng.permutation(idx) for idx in per_class]
    cursor = np.zeros(k, dtype=np.int64)
    tiles = np.empty((count, cells), dtype=np.int64)  # source indices, row-major cells
    labels = np.zeros((count, k), dtype=np.uint8)
    theme_of = np.full(count, -1, dtype=np.int64)
    for i in range(count):
        m = int(rng.integers(lo, hi + 1))
        t = int(rng.choice(len(theme_probs), p=theme_probs))
        chosen: list[int] = []
        if t < len(themes):
            chosen = list(themes[t])
            theme_of[i] = t
            m = max(m, len(chosen))
        rest = np.setdiff1d(np.arange(k), chosen)
        if m > len(chosen) and len(rest):
            w = weights[rest] / weights[rest].sum()
            chosen += rng.choice(rest, size=min(m - len(chosen), len(rest)), replace=False, p=w).tolist()
        extra = rng.choice(chosen, size=cells - len(chosen), replace=True).tolist() if cells > len(chosen) else []
        cell_classes = rng.permutation(np.array(chosen + extra, dtype=np.int64))
        for j, c in enumerate(cell_classes):
            pool = pools[c]
            tiles[i, j] = pool[cursor[c] % len(pool)]
            cursor[c] += 1
        labels[i, chosen] = 1
    small = resize_tiles(source.images, opts.tile)
    th, tw, ch = small.shape[1:]
    grid = opts.grid
    images = small[tiles.reshape(-1)].reshape(count, grid, grid, th, tw, ch)
    images = images.transpose(0, 1, 3, 2, 4, 5).reshape(count, grid * th, grid * tw, ch)
    meta = {"source": source.name, "format": "mosaic", "tiles": tiles, "theme": theme_of,
            "options": opts.model_dump(mode="json")}
    return ImageSet(np.ascontiguousarray(images), labels, source.class_names, name, meta)


def mosaic_splits(splits: Splits, opts: MosaicOptions | None = None, name: str = "mosaic", **options: Any) -> Splits:
    """Training mosaics from ``splits.train``, test mosaics from ``splits.test`` (options: :class:`MosaicOptions`)."""
    opts = opts or mosaic_options(**options)
    train = compose_mosaics(splits.train, opts.train_size, opts, opts.seed, f"{name}-train")
    test = compose_mosaics(splits.test, opts.test_size, opts, opts.seed + 1_000_003, f"{name}-test")
    return Splits(train, test)


def cooccurrence(labels: np.ndarray) -> np.ndarray:
    """(K, K) counts of images holding both categories (the diagonal: images holding each one)."""
    x = np.asarray(labels, dtype=np.int64)
    return x.T @ x

