"""scikit-learn's 8x8 handwritten digits (1,797 images), the dataset that needs no file."""

from __future__ import annotations

import numpy as np

from cleanbackdoor.data.imageset import ImageSet, Splits
from cleanbackdoor.errors import ConfigError

DIGIT_CLASSES = tuple(str(d) for d in range(10))


def load_digits(*, test_fraction: float = 0.3, seed: int = 0) -> Splits:
    """The digits as (N, 8, 8, 1) uint8 (values 0..16 scaled by round(v * 255 / 16)), in a stratified split.

    The split is fixed by ``test_fraction`` and ``seed`` (defaults 0.3 and 0): the same arguments always give the
    same train and test sets, named ``digits-train`` and ``digits-test``.
    """
    if not 0 < test_fraction < 1:
        raise ConfigError(f"digits: test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = np.round(bunch.images * 255.0 / 16.0).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=seed,
                                           stratify=labels)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    meta = {"source": "sklearn.datasets.load_digits", "test_fraction": test_fraction, "seed": seed}
    return Splits(ImageSet(images[train_idx], labels[train_idx], DIGIT_CLASSES, "digits-train", dict(meta)),
                  ImageSet(images[test_idx], labels[test_idx], DIGIT_CLASSES, "digits-test", dict(meta)))
