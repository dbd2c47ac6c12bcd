"""scikit-learn's digits as a fixed, stratified split."""

from __future__ import annotations

import numpy as np
import pytest

from cleanbackdoor.data import load_dataset, load_digits
from cleanbackdoor.errors import ConfigError


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_shapes_and_types(digits):
    train, test = digits.train, digits.test
    assert train.images.shape == (1257, 8, 8, 1) and test.images.shape == (540, 8, 8, 1)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert train.images.max() == 255 and train.images.min() == 0
    assert train.class_names == tuple(str(d) for d in range(10))
    assert (train.name, test.name) == ("digits-train", "digits-test")


def test_pixel_scaling(digits):
    from sklearn.datasets import load_digits as sklearn_digits

    values = np.unique(np.concatenate([digits.train.images.ravel(), digits.test.images.ravel()]))
    assert set(values) <= {round(v * 255 / 16) for v in range(17)}
    assert len(digits.train) + len(digits.test) == len(sklearn_digits().target)


def test_split_is_deterministic_and_stratified(digits):
    again = load_dataset("digits")
    assert np.array_equal(digits.train.images, again.train.images)
    assert np.array_equal(digits.test.labels, again.test.labels)
    train_share = digits.train.class_counts() / len(digits.train)
    test_share = digits.test.class_counts() / len(digits.test)
    assert np.abs(train_share - test_share).max() < 0.01
    other = load_digits(seed=1)
    assert not np.array_equal(digits.test.labels, other.test.labels)


def test_bad_options():
    with pytest.raises(ConfigError, match="test_fraction"):
        load_digits(test_fraction=1.5)
    with pytest.raises(ConfigError, match="no root"):
        load_dataset("digits", root="/tmp")
    with pytest.raises(ConfigError, match="no option 'label_mode'"):
        load_dataset("digits", label_mode="fine")
