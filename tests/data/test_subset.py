"""stratified_subset: seeded, class-balanced subsets."""

from __future__ import annotations

import numpy as np
import pytest

from cleanbackdoor.data import ImageSet, stratified_subset
from cleanbackdoor.errors import ConfigError


@pytest.fixture
def imageset() -> ImageSet:
    labels = np.repeat([0, 1, 2], [10, 20, 5])
    images = np.arange(len(labels), dtype=np.uint8).reshape(-1, 1, 1, 1).repeat(2, axis=1)
    return ImageSet(images, labels, ("a", "b", "c"), "toy")


def test_per_class(imageset):
    sub = stratified_subset(imageset, per_class=4, seed=3)
    assert list(sub.class_counts()) == [4, 4, 4] and sub.name == "toy"
    index = sub.images[:, 0, 0, 0].astype(int)
    assert np.all(np.diff(index) > 0), "original order is kept"
    assert np.array_equal(imageset.labels[index], sub.labels)


def test_seeded(imageset):
    a = stratified_subset(imageset, per_class=5, seed=0)
    b = stratified_subset(imageset, per_class=5, seed=0)
    c = stratified_subset(imageset, per_class=5, seed=1)
    assert np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)


def test_fraction(imageset):
    sub = stratified_subset(imageset, fraction=0.5)
    assert list(sub.class_counts()) == [5, 10, 2]  # round(2.5) = 2 (banker's rounding), at least one
    assert len(stratified_subset(imageset, fraction=1.0)) == len(imageset)
    assert list(stratified_subset(imageset, fraction=0.01).class_counts()) == [1, 1, 1]


@pytest.mark.parametrize("kwargs, message", [
    ({"per_class": 6}, "smallest class, 'c' with 5"),
    ({}, "exactly one"),
    ({"per_class": 2, "fraction": 0.5}, "exactly one"),
    ({"per_class": 0}, "positive integer"),
    ({"fraction": 0.0}, r"\(0, 1\]"),
    ({"fraction": 1.5}, r"\(0, 1\]"),
])
def test_bad_arguments(imageset, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        stratified_subset(imageset, **kwargs)


def test_multilabel_refused():
    labels = np.array([[1, 0], [0, 1], [1, 1]], np.uint8)
    s = ImageSet(np.zeros((3, 2, 2, 3), np.uint8), labels, ("x", "y"))
    with pytest.raises(ConfigError, match="single-label"):
        stratified_subset(s, per_class=1)


def test_a_count_per_class(imageset):
    """A mapping gives each class (by name or index) its own count, e.g. more target images for the hidden
    trigger's poisons to be added to the clean ones."""
    sub = stratified_subset(imageset, per_class={"a": 3, 1: 12, "c": 5}, seed=2)
    assert list(sub.class_counts()) == [3, 12, 5]
    with pytest.raises(ConfigError, match="no count for class 'c'"):
        stratified_subset(imageset, per_class={"a": 3, "b": 3})
    with pytest.raises(ConfigError, match=r"per_class\['c'\] must be a count in \[1, 5\]"):
        stratified_subset(imageset, per_class={"a": 3, "b": 3, "c": 6})
    with pytest.raises(ConfigError, match="names class 'a' twice"):
        stratified_subset(imageset, per_class={"a": 3, 0: 3, "b": 1, "c": 1})
    with pytest.raises(ConfigError, match="has no class 'd'"):
        stratified_subset(imageset, per_class={"d": 1})
