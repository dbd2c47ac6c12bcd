"""Subsets of an image set: seeded class-balanced subsets for fast runs, and the task made of some classes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cleanbackdoor.data.imageset import ImageSet
from cleanbackdoor.errors import ConfigError


def stratified_subset(imageset: ImageSet, per_class: int | Mapping[int | str, int] | None = None,
                      fraction: float | None = None, seed: int = 0) -> ImageSet:
    """A seeded subset with ``per_class`` examples of every class, or ``fraction`` of every class.

    Give exactly one of ``per_class`` (a count, at most the size of the smallest class; or a mapping from every
    class, by name or index, to its own count) and ``fraction`` (0 < fraction <= 1; each class keeps
    round(fraction * its size) examples, at least one). The chosen examples keep their original order; the same set
    and seed always give the same subset. Single-label sets only.
    """
    if (per_class is None) == (fraction is None):
        raise ConfigError("stratified_subset needs exactly one of per_class and fraction")
    if imageset.multilabel:
        raise ConfigError(f"{imageset.name or 'image set'}: stratified_subset works on single-label sets only")
    counts = imageset.class_counts()
    if isinstance(per_class, Mapping):
        take = _counts_per_class(imageset, per_class, counts)
    elif per_class is not None:
        if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
            raise ConfigError(f"per_class must be a positive integer, got {per_class!r}")
        smallest = int(np.argmin(counts))
        if per_class > counts[smallest]:
            raise ConfigError(f"{imageset.name or 'image set'}: per_class={per_class} exceeds the smallest class, "
                              f"{imageset.class_names[smallest]!r} with {counts[smallest]} examples")
        take = np.full(imageset.num_classes, int(per_class))
    else:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) or not 0 < fraction <= 1:
            raise ConfigError(f"fraction must lie in (0, 1], got {fraction!r}")
        take = np.where(counts > 0, np.maximum(1, np.round(counts * float(fraction))), 0).astype(np.int64)
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(imageset.labels == k), size=int(n), replace=False)
              for k, n in enumerate(take) if n > 0]
    index = np.sort(np.concatenate(chosen))
    return imageset.subset(index)


def _counts_per_class(imageset: ImageSet, per_class: Mapping[int | str, int], counts: np.ndarray) -> np.ndarray:
    """The count of every class from a mapping that names each class once (by name or index)."""
    take = np.full(imageset.num_classes, -1, dtype=np.int64)
    for key, n in per_class.items():
        k = imageset.class_index(key)
        if take[k] >= 0:
            raise ConfigError(f"per_class names class {imageset.class_names[k]!r} twice")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= counts[k]:
            raise ConfigError(f"per_class[{key!r}] must be a count in [1, {counts[k]}] (the examples of class "
                              f"{imageset.class_names[k]!r}), got {n!r}")
        take[k] = int(n)
    missing = [imageset.class_names[k] for k in np.flatnonzero(take < 0)]
    if missing:
        raise ConfigError(f"per_class gives no count for class {missing[0]!r}; a mapping names every class")
    return take


def select_classes(images: ImageSet, classes: Sequence[int | str]) -> ImageSet:
    """``images`` restricted to ``classes`` (names or indices), relabelled 0..k-1 in the order given."""
    if images.multilabel:
        raise ConfigError(f"{images.name or 'image set'}: class selection works on single-label sets only")
    index = [images.class_index(c) for c in classes]
    if len(set(index)) != len(index):
        raise ConfigError(f"classes {list(classes)} name the same class twice")
    if len(index) < 2:
        raise ConfigError(f"a task needs at least 2 classes, got {list(classes)}")
    keep = np.isin(images.labels, index)
    relabel = np.full(images.num_classes, -1, dtype=np.int64)
    relabel[index] = np.arange(len(index))
    return ImageSet(images.images[keep], relabel[images.labels[keep]],
                    tuple(images.class_names[i] for i in index), images.name, dict(images.meta))
