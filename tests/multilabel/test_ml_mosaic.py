"""Composed mosaic sets (cleanbackdoor.data.mosaic) on real digits (scikit-learn)."""

import numpy as np
import pytest

from cleanbackdoor.data import ImageSet, load_dataset, load_digits
from cleanbackdoor.data.mosaic import compose_mosaics, cooccurrence, mosaic_options, resize_tiles
from cleanbackdoor.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_labels_are_the_classes_of_the_tiles(digits):
    opts = mosaic_options(grid=2, train_size=300, objects=(1, 4))
    m = compose_mosaics(digits.train, 300, opts, seed=0)
    assert m.images.shape == (300, 16, 16, 1) and m.labels.shape == (300, 10) and m.multilabel
    tiles = m.meta["tiles"]
    for i in range(300):
        classes = set(digits.train.labels[tiles[i]].tolist())
        assert set(np.flatnonzero(m.labels[i]).tolist()) == classes
        assert 1 <= len(classes) <= 4
        # the pixels are the source images, in row-major cells
        cells = [m.images[i, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] for r in range(2) for c in range(2)]
        assert all(np.array_equal(cell, digits.train.images[j]) for cell, j in zip(cells, tiles[i]))


def test_deterministic_prefix_and_splits_disjoint(digits):
    opts = mosaic_options(train_size=200, test_size=50, seed=3)
    a = compose_mosaics(digits.train, 200, opts, seed=3)
    b = compose_mosaics(digits.train, 200, opts, seed=3)
    c = compose_mosaics(digits.train, 120, opts, seed=3)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(c.labels, a.labels[:120])  # a smaller set is a prefix of the same mosaics
    assert not np.array_equal(compose_mosaics(digits.train, 200, opts, seed=4).labels, a.labels)
    splits = load_dataset("digits-mosaic", train_size=200, test_size=50)
    assert len(splits.train) == 200 and len(splits.test) == 50
    assert splits.test.meta["tiles"].max() < len(digits.test)  # test mosaics: test images only


def test_cooccurrence_structure_is_controlled(digits):
    # one strong theme at 30%, uniform popularity: {3, 7} co-occurs far more than any other pair
    opts = mosaic_options(train_size=3000, themes=[[3, 7]], theme_rates=[0.3], skew=0.0, objects=(1, 2))
    m = compose_mosaics(digits.train, 3000, opts, seed=0)
    co = cooccurrence(m.labels)
    assert np.array_equal(np.diag(co), m.labels.sum(axis=0))
    pairs = co.astype(float)
    np.fill_diagonal(pairs, 0)
    assert np.unravel_index(pairs.argmax(), pairs.shape) in {(3, 7), (7, 3)}
    assert 0.26 <= co[3, 7] / 3000 <= 0.36  # 30% from the theme, plus a few chance pairs
    assert (m.meta["theme"] == 0).mean() == pytest.approx(0.3, abs=0.03)
    # popularity skew: class 0 much more common than class 9
    skewed = compose_mosaics(digits.train, 2000, mosaic_options(skew=2.0, themes=[], theme_rates=[]), seed=0)
    counts = skewed.labels.sum(axis=0)
    assert counts[0] > 3 * counts[9]


def test_tiles_are_resized(digits):
    m = compose_mosaics(digits.train, 10, mosaic_options(grid=3, tile=4, objects=(2, 5)), seed=0)
    assert m.images.shape == (10, 12, 12, 1)
    small = resize_tiles(np.full((1, 8, 8, 3), 200, np.uint8), 4)
    assert small.shape == (1, 4, 4, 3) and (small == 200).all()


@pytest.mark.parametrize("options, match", [
    ({"objects": (0, 2)}, "objects"),
    ({"grid": 2, "objects": (1, 5)}, "objects"),
    ({"themes": [[1, 2]]}, "theme_rates"),
    ({"themes": [[1, 2]], "theme_rates": [0.5, 0.2]}, "theme_rates"),
    ({"themes": [[1, 2], [3]], "theme_rates": [0.7, 0.6]}, "sum"),
    ({"themes": [[1, 1]], "theme_rates": [0.1]}, "twice"),
    ({"colour": 2}, "unknown option"),
])
def test_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        mosaic_options(**options)


def test_bad_sources(digits):
    with pytest.raises(ConfigError, match="has no class"):
        compose_mosaics(digits.train, 5, mosaic_options(themes=[["cat"]], theme_rates=[0.1]), seed=0)
    multi = ImageSet(np.zeros((2, 4, 4, 1), np.uint8), np.array([[1, 0], [0, 1]]), ("a", "b"))
    with pytest.raises(DataError, match="single-label"):
        compose_mosaics(multi, 5, mosaic_options(themes=[], theme_rates=[]), seed=0)
    three = ImageSet(np.zeros((3, 4, 4, 1), np.uint8), np.array([0, 1, 2]), ("a", "b", "c"))
    with pytest.raises(ConfigError, match="10 classes"):
        compose_mosaics(three, 5, mosaic_options(), seed=0)
    with pytest.raises(ConfigError, match="unknown option"):
        load_dataset("digits-mosaic", size=3)
