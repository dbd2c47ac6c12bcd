"""The real archives of ``../shared/data``: skipped where they are absent.

A session-wide cache holds the decoded arrays, so each archive is decoded at most once per test run
(cold: about 12 s for CIFAR-10's 60,000 JPEGs and 8 s for MNIST's 70,000 PNGs on 2 cores; cached: under 1 s).
"""

from __future__ import annotations

import numpy as np
import pytest

from cleanbackdoor.data import load_dataset, stratified_subset
from cleanbackdoor.data.cifar import CIFAR10_CLASSES


@pytest.fixture(autouse=True)
def shared_cache(session_cache, monkeypatch):
    monkeypatch.setenv("CLEANBACKDOOR_CACHE", str(session_cache))
    return session_cache


def archive(shared_data, name):
    path = shared_data / name
    if not path.is_file():
        pytest.skip(f"{name} is not in {shared_data}")
    return path


def test_cifar10_jpg(shared_data):
    splits = load_dataset("cifar10", root=archive(shared_data, "cifar10-jpg.tar.gz"))
    train, test = splits.train, splits.test
    assert train.images.shape == (50_000, 32, 32, 3) and test.images.shape == (10_000, 32, 32, 3)
    assert train.images.dtype == np.uint8
    assert train.class_names == CIFAR10_CLASSES
    assert list(train.class_counts()) == [5000] * 10 and list(test.class_counts()) == [1000] * 10
    assert np.allclose(train.images.reshape(-1, 3).mean(0), (125.3, 122.9, 113.9), atol=0.2)
    again = load_dataset("cifar10", root=archive(shared_data, "cifar10-jpg.tar.gz"))  # from the cache
    assert np.array_equal(again.test.images, test.images)
    assert len(stratified_subset(train, per_class=100)) == 1000


def test_mnist_png(shared_data):
    splits = load_dataset("mnist", root=archive(shared_data, "mnist-png.tar.gz"))
    assert splits.train.images.shape == (60_000, 28, 28, 1) and splits.test.images.shape == (10_000, 28, 28, 1)
    assert splits.train.class_names == tuple("0123456789")
    assert splits.train.class_counts().sum() == 60_000 and splits.train.class_counts().min() > 5000
    assert splits.train.images.max() == 255 and splits.train.images.min() == 0
