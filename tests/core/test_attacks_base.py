import inspect

import numpy as np
import pytest

from cleanbackdoor.attacks import ATTACKS, Poisoning, build_attack, resolve_budget
from cleanbackdoor.data import ImageSet
from cleanbackdoor.errors import BudgetError, ConfigError
from cleanbackdoor.triggers import build_trigger


def _set(n=100, k=4, seed=0):
    rng = np.random.default_rng(seed)
    return ImageSet(rng.integers(0, 256, (n, 8, 8, 1)).astype(np.uint8), rng.integers(0, k, n),
                    [str(i) for i in range(k)], "toy")


def test_resolve_budget():
    assert resolve_budget(10, 100, 50) == 10
    assert resolve_budget(0.05, 1000, 900) == 50  # fraction of the WHOLE training set
    assert resolve_budget(150.0, 1000, 900) == 150
    assert resolve_budget(0, 10, 10) == 0
    with pytest.raises(BudgetError, match="only 50 can be changed"):
        resolve_budget(51, 100, 50)
    with pytest.raises(BudgetError):
        resolve_budget(0.6, 100, 50)
    for bad in (-1, 1.5, "10", True):
        with pytest.raises(ConfigError):
            resolve_budget(bad, 100, 100)


def test_badnets_contract():
    train = _set()
    p = build_attack("badnets", {"budget": 12, "target": 1, "sources": [0, 2]}).poison(train, seed=4)
    assert p.mask.sum() == 12 == p.budget == len(p.image_indices)
    assert set(train.labels[p.mask]) <= {0, 2}
    assert (p.labels[p.mask] == 1).all() and np.array_equal(p.labels[~p.mask], train.labels[~p.mask])
    images, labels = p.apply(train)
    changed = (images != train.images).any(axis=(1, 2, 3))
    assert not changed[~p.mask].any() and changed[p.mask].all()
    assert np.array_equal(images[p.mask], build_trigger("patch", (1, 8, 8), seed=4)(train.images[p.mask]))
    q = build_attack("badnets", {"budget": 12, "target": 1, "sources": [0, 2]}).poison(train, seed=4)
    assert np.array_equal(p.labels, q.labels) and np.array_equal(p.images, q.images)
    r = build_attack("badnets", {"budget": 12, "target": 1, "sources": [0, 2]}).poison(train, seed=5)
    assert not np.array_equal(p.mask, r.mask)


def test_badnets_failures():
    train = _set()
    n_src = int((train.labels == 0).sum())
    with pytest.raises(BudgetError, match=f"only {n_src} can be changed"):
        build_attack("badnets", {"budget": n_src + 1, "target": 1, "sources": [0]}).poison(train)
    with pytest.raises(ConfigError, match="has no class 'cat'"):
        build_attack("badnets", {"target": "cat"}).poison(train)
    with pytest.raises(ConfigError, match="badnets.*budgte.*unknown key"):
        build_attack("badnets", {"budgte": 3})
    with pytest.raises(ConfigError, match="unknown attack 'badnet'"):
        build_attack("badnet")
    with pytest.raises(ConfigError, match="unknown trigger"):
        build_attack("badnets", {"trigger": {"name": "glitter"}}).poison(train)


def test_poisoning_round_trip(tmp_path):
    train = _set()
    p = build_attack("badnets", {"budget": 5, "trigger": {"name": "patch", "size": 3}}).poison(train, seed=1)
    p.save(tmp_path)
    q = Poisoning.load(tmp_path, image_shape=train.image_shape)
    assert np.array_equal(p.labels, q.labels) and np.array_equal(p.mask, q.mask)
    assert np.array_equal(p.images, q.images) and np.array_equal(p.image_indices, q.image_indices)
    assert np.array_equal(p.activation(train.images), q.activation(train.images))
    assert q.target == p.target and q.budget == 5


def test_registry_names_match():
    for name, cls in ATTACKS.items():
        assert cls.name == name


def test_random_flip_changes_labels_only():
    train = _set()
    p = build_attack("random_flip", {"budget": 9, "target": 3, "sources": [1]}).poison(train, seed=2)
    assert p.mask.sum() == 9 and (train.labels[p.mask] == 1).all() and (p.labels[p.mask] == 3).all()
    assert p.images is None
    assert np.array_equal(p.apply(train)[0], train.images)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_constructors_show_their_parameters_as_keywords(name):
    """help(Flip) and an editor's signature help show every parameter with its type and default."""
    cls = ATTACKS[name]
    signature = inspect.signature(cls)
    fields = cls.Params.model_fields
    keywords = {n: p for n, p in signature.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert list(keywords) == list(fields)
    for field, info in fields.items():
        assert keywords[field].annotation == info.annotation
        assert f"\n    {field} (" in cls.__doc__
    some, value = next((n, info.default) for n, info in fields.items() if type(info.default) in (int, float, str))
    assert cls(**{some: value}).params.model_dump() == cls().params.model_dump()  # keywords are the parameters
    with pytest.raises(ConfigError, match="colour: unknown key"):
        cls(colour=1)
