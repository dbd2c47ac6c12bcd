import numpy as np
import pytest

from cleanbackdoor.attacks import ATTACKS, build_attack
from cleanbackdoor.attacks.inner_product import trigger_alignment
from cleanbackdoor.data import ImageSet
from cleanbackdoor.errors import BudgetError, ConfigError
from cleanbackdoor.triggers import build_trigger


def _set(corner_values, n_other=6, seed=0):
    """Class 1 images whose top-left pixel is ``corner_values``; then class 0 images with a bright corner."""
    rng = np.random.default_rng(seed)
    n = len(corner_values) + n_other
    x = rng.integers(0, 100, (n, 6, 6, 1)).astype(np.uint8)
    x[:len(corner_values), 0, 0, 0] = corner_values
    x[len(corner_values):, 0, 0, 0] = 250  # the target class: brightest of all, never eligible
    y = np.array([1] * len(corner_values) + [0] * n_other)
    return ImageSet(x, y, ["zero", "one"], "corner")


WHITE_CORNER = {"name": "patch", "size": 1, "position": [0, 0], "pattern": "white", "margin": 0}


def test_alignment_by_hand():
    # the trigger sets pixel (0, 0) to 255, so trigger(x) - x is 255 - a there and 0 elsewhere:
    # d = (255 - mean(a)) e_00 and each image scores a * (255 - mean(a))
    a = np.array([10, 200, 50, 120], dtype=np.uint8)
    train = _set(a)
    trig = build_trigger("patch", (1, 6, 6), size=1, position=(0, 0), pattern="white", margin=0)
    scores = trigger_alignment(train.images[:4], trig)
    assert np.allclose(scores, a * (255 - a.mean()))


def test_flips_the_most_aligned_source_images():
    train = _set(np.array([10, 200, 50, 120, 180], dtype=np.uint8))
    p = build_attack("inner_product", {"target": 0, "sources": [1], "budget": 2, "trigger": WHITE_CORNER}).poison(train)
    assert np.flatnonzero(p.mask).tolist() == [1, 4]  # corners 200 and 180
    assert (p.labels[p.mask] == 0).all() and np.array_equal(p.labels[~p.mask], train.labels[~p.mask])
    assert p.budget == p.poisoned_examples == 2 and p.images is None and p.target == 0 and p.sources == (1,)
    again = build_attack("inner_product", {"target": 0, "sources": [1], "budget": 2, "trigger": WHITE_CORNER}).poison(
        train, seed=5)
    assert np.array_equal(p.labels, again.labels)  # the seed only matters for random triggers


def test_budgets_are_nested_and_fractions_count_the_whole_set():
    train = _set(np.arange(20, 220, 20, dtype=np.uint8))  # 10 source images, 16 in all
    masks = [build_attack("inner_product", {"target": 0, "sources": [1], "budget": b, "trigger": WHITE_CORNER})
             .poison(train).mask for b in (1, 3, 6)]
    assert [int(m.sum()) for m in masks] == [1, 3, 6]
    assert all((small <= big).all() for small, big in zip(masks, masks[1:]))
    half = build_attack("inner_product", {"target": 0, "sources": [1], "budget": 0.25, "trigger": WHITE_CORNER})
    assert half.poison(train).poisoned_examples == 4  # 25% of 16


def test_failures():
    train = _set(np.array([10, 200, 50], dtype=np.uint8))
    with pytest.raises(BudgetError, match="only 3 can be changed"):
        build_attack("inner_product", {"target": 0, "sources": [1], "budget": 4, "trigger": WHITE_CORNER}).poison(train)
    with pytest.raises(ConfigError, match="only source class is the target"):
        build_attack("inner_product", {"target": 0, "sources": [0]}).poison(train)
    with pytest.raises(ConfigError, match="budget"):
        build_attack("inner_product", {"budget": -1})
    multi = ImageSet(train.images, np.eye(2, dtype=np.float32)[train.labels], ["zero", "one"], "multi")
    with pytest.raises(ConfigError, match="single-label"):
        build_attack("inner_product").poison(multi)


def test_registered():
    assert "inner_product" in ATTACKS
