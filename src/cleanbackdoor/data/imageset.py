"""The image-set type every part of the toolkit exchanges.

An :class:`ImageSet` is plain data: ``images`` is a uint8 array (N, H, W, C), ``labels`` is an int64 array (N,)
for single-label sets or a 0/1 uint8 array (N, K) for multi-label sets, and ``class_names`` names the K classes.
Tensors are made at the edge of the training code, never stored here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cleanbackdoor.errors import ConfigError, DataError


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    name: str = ""
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            got = getattr(images, "dtype", type(images).__name__), getattr(images, "shape", None)
            raise DataError(f"{self.name or 'image set'}: images must be a uint8 array (N, H, W, C), got {got}")
        if images.shape[-1] not in (1, 3):
            raise DataError(f"{self.name or 'image set'}: images need 1 or 3 channels last, got shape {images.shape}")
        labels = np.asarray(labels)
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        k = len(self.class_names)
        if k < 2:
            raise DataError(f"{self.name or 'image set'}: needs at least 2 classes, got {k}")
        if labels.shape[0] != images.shape[0]:
            raise DataError(f"{self.name or 'image set'}: {images.shape[0]} images but {labels.shape[0]} labels")
        if labels.ndim == 1:
            if not np.issubdtype(labels.dtype, np.integer):
                raise DataError(f"{self.name or 'image set'}: single-label labels must be integers, got {labels.dtype}")
            labels = labels.astype(np.int64, copy=False)
            if labels.size and (labels.min() < 0 or labels.max() >= k):
                raise DataError(f"{self.name or 'image set'}: labels must lie in [0, {k}), "
                                f"got [{labels.min()}, {labels.max()}]")
        elif labels.ndim == 2:
            if labels.shape[1] != k:
                raise DataError(f"{self.name or 'image set'}: label matrix has {labels.shape[1]} columns "
                                f"for {k} classes")
            if labels.size and not np.isin(labels, (0, 1)).all():
                raise DataError(f"{self.name or 'image set'}: multi-label matrix must hold only 0 and 1")
            labels = labels.astype(np.uint8, copy=False)
        else:
            raise DataError(f"{self.name or 'image set'}: labels must be (N,) or (N, classes), got {labels.shape}")
        object.__setattr__(self, "labels", labels)

    # -- shape facts -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W): the shape a model sees."""
        _, h, w, c = self.images.shape
        return (c, h, w)

    # -- derived sets ------------------------------------------------------------------------------------------
    def subset(self, index: np.ndarray | slice, name: str | None = None) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.class_names, name or self.name, dict(self.meta))

    def with_labels(self, labels: np.ndarray) -> ImageSet:
        return ImageSet(self.images, labels, self.class_names, self.name, dict(self.meta))

    def with_images(self, images: np.ndarray) -> ImageSet:
        return ImageSet(images, self.labels, self.class_names, self.name, dict(self.meta))

    def class_index(self, name_or_index: str | int) -> int:
        """Resolve a class given by name or index, with a clear error for one that does not exist."""
        if isinstance(name_or_index, (int, np.integer)) and not isinstance(name_or_index, bool):
            if 0 <= int(name_or_index) < self.num_classes:
                return int(name_or_index)
        elif isinstance(name_or_index, str):
            if name_or_index in self.class_names:
                return self.class_names.index(name_or_index)
            if name_or_index.isdigit() and int(name_or_index) < self.num_classes:
                return int(name_or_index)
        raise ConfigError(
            f"{self.name or 'dataset'} has no class {name_or_index!r}; classes are 0..{self.num_classes - 1}: "
            + ", ".join(self.class_names)
        )

    def class_counts(self) -> np.ndarray:
        if self.multilabel:
            return self.labels.sum(axis=0).astype(np.int64)
        return np.bincount(self.labels, minlength=self.num_classes)


@dataclass(frozen=True)
class Splits:
    """A train and a test set over the same classes."""

    train: ImageSet
    test: ImageSet

    def __post_init__(self) -> None:
        if self.train.class_names != self.test.class_names:
            raise DataError("train and test sets name different classes")
        if self.train.image_shape != self.test.image_shape:
            raise DataError(f"train images {self.train.image_shape} and test images {self.test.image_shape} "
                            "differ in shape")
