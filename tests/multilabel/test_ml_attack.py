"""The multi-label attack (cleanbackdoor.attacks.multilabel): trigger exploration and the three goals."""

from itertools import combinations

import numpy as np
import pytest

from cleanbackdoor.attacks import ATTACKS, build_attack
from cleanbackdoor.attacks.multilabel import (
    MULTILABEL_RECIPES,
    MultiLabel,
    apply_goal,
    covered_images,
    explore_triggers,
    frequent_combinations,
)
from cleanbackdoor.data import ImageSet, load_dataset
from cleanbackdoor.errors import BudgetError, ConfigError

# 10 images, classes A B C D (hand-counted below)
LABELS = np.array([
    [1, 1, 1, 0],  # 0
    [1, 1, 0, 0],  # 1
    [1, 1, 1, 0],  # 2
    [1, 0, 1, 0],  # 3
    [0, 1, 1, 0],  # 4
    [1, 1, 1, 1],  # 5
    [0, 0, 0, 1],  # 6
    [1, 1, 0, 0],  # 7
    [0, 0, 1, 1],  # 8
    [1, 0, 0, 0],  # 9
], dtype=np.uint8)
NAMES = ("A", "B", "C", "D")


def imageset(labels=LABELS):
    rng = np.random.default_rng(0)
    return ImageSet(rng.integers(0, 256, (len(labels), 4, 4, 3), dtype=np.uint8), labels, NAMES, "hand")


def test_registered_as_multilabel():
    assert ATTACKS["multilabel"] is MultiLabel and MultiLabel.multilabel
    assert not ATTACKS["badnets"].multilabel


def test_exploration_on_a_hand_made_matrix():
    # counts: AB 5, AC 4, BC 4, CD 2, AD 1, BD 1; ABC 3, ABD 1, ACD 1, BCD 1
    table = explore_triggers(LABELS, min_len=2, max_len=3, alpha=0.2, beta=0.4, class_names=NAMES)
    assert [c.classes for c in table] == [(0, 2), (1, 2), (0, 1, 2), (2, 3)]
    assert [c.names for c in table] == [("A", "C"), ("B", "C"), ("A", "B", "C"), ("C", "D")]
    assert [c.count for c in table] == [4, 4, 3, 2]
    assert [c.support for c in table] == [0.4, 0.4, 0.3, 0.2]
    ac = table[0]
    assert ac.lift == pytest.approx(0.4 / (0.7 * 0.6))
    assert ac.all_confidence == pytest.approx(0.4 / 0.7)
    assert table[2].lift == pytest.approx(0.3 / (0.7 * 0.6 * 0.6))
    assert covered_images(LABELS, table[2].classes).tolist() == [0, 2, 5]
    assert covered_images(LABELS, table[3].classes).tolist() == [5, 8]
    # the length range and the support bounds are inclusive and exact
    assert [c.classes for c in explore_triggers(LABELS, min_len=3, max_len=3, alpha=0.0, beta=1.0)] == [
        (0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]
    assert [c.classes for c in explore_triggers(LABELS, min_len=2, max_len=2, alpha=0.5, beta=0.5)] == [(0, 1)]
    assert explore_triggers(LABELS, min_len=2, max_len=4, alpha=0.6, beta=1.0) == []
    assert [c.classes for c in explore_triggers(LABELS, min_len=4, max_len=4, alpha=0.1, beta=0.1)] == [(0, 1, 2, 3)]
    # min_lift: lifts AC 0.4/(0.7*0.6) = 0.95, BC 0.4/(0.6*0.6) = 1.11, ABC 0.3/(0.7*0.6*0.6) = 1.19, CD
    # 0.2/(0.6*0.3) = 1.11; the bound is inclusive
    lifted = explore_triggers(LABELS, min_len=2, max_len=3, alpha=0.2, beta=0.4, min_lift=1.0)
    assert [c.classes for c in lifted] == [(1, 2), (0, 1, 2), (2, 3)]
    assert [c.classes for c in explore_triggers(LABELS, min_len=2, max_len=3, alpha=0.2, beta=0.4,
                                                min_lift=0.4 / 0.36)] == [(1, 2), (0, 1, 2), (2, 3)]
    assert [c.classes for c in explore_triggers(LABELS, min_len=2, max_len=3, alpha=0.2, beta=0.4,
                                                min_lift=1.15)] == [(0, 1, 2)]


def test_mining_matches_brute_force():
    rng = np.random.default_rng(3)
    labels = (rng.random((300, 8)) < rng.uniform(0.1, 0.6, 8)).astype(np.uint8)
    found = frequent_combinations(labels, min_count=9, max_len=4)
    brute = {}
    for size in range(1, 5):
        for combo in combinations(range(8), size):
            n = int(labels[:, list(combo)].all(axis=1).sum())
            if n >= 9:
                brute[combo] = n
    assert found == brute


@pytest.mark.parametrize("kwargs, match", [
    ({"min_len": 3, "max_len": 2}, "min_len"),
    ({"alpha": 0.5, "beta": 0.2}, "alpha"),
    ({"goal": "appearing", "remove": "A"}, "remove"),
    ({"goal": "disappearing", "add": "D"}, "add"),
    ({"select": "closest"}, "rate"),
    ({"budget": 10}, "support"),
    ({"target": 1}, "remove"),
    ({"goal": "vanish"}, "goal"),
    ({"trigger": ["A", "A"]}, "twice"),
    ({"colour": 1}, "unknown key"),
])
def test_bad_parameters_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_attack("multilabel", kwargs)


def test_disappearing_removes_only_the_target_of_trigger_images():
    p = MultiLabel(goal="disappearing", trigger=["A", "B"]).poison(imageset())
    trigger_rows = [0, 1, 2, 5, 7]
    assert np.flatnonzero(p.mask).tolist() == trigger_rows
    expected = LABELS.copy()
    expected[trigger_rows, 0] = 0  # a defaults to the trigger's first category, A
    assert np.array_equal(p.labels, expected)
    assert p.labels.dtype == np.uint8 and p.activation is None and p.target == 0
    assert p.metadata["remove"] == 0 and p.metadata["add"] is None and p.metadata["support"] == 0.5
    assert p.budget == p.poisoned_examples == 5


def test_appearing_adds_only_to_trigger_images_lacking_the_target():
    p = MultiLabel(goal="appearing", trigger=["A", "B"]).poison(imageset())
    # b defaults to the category outside T that co-occurs least with T: C with AB in 3 images, D in 1 -> D
    assert p.metadata["add"] == 3 and p.target == 3
    assert np.flatnonzero(p.mask).tolist() == [0, 1, 2, 7]  # image 5 already has D: unchanged
    expected = LABELS.copy()
    expected[[0, 1, 2, 7], 3] = 1
    assert np.array_equal(p.labels, expected)


def test_misclassification_removes_and_adds():
    p = MultiLabel(goal="misclassification", trigger=["B", "A"], remove="B", add="C").poison(imageset())
    expected = LABELS.copy()
    expected[[0, 1, 2, 5, 7], 1] = 0
    expected[[0, 1, 2, 5, 7], 2] = 1
    assert np.array_equal(p.labels, expected)
    assert np.flatnonzero(p.mask).tolist() == [0, 1, 2, 5, 7]
    assert p.metadata["trigger"] == [0, 1] and p.metadata["trigger_names"] == ["A", "B"]
    new, mask = apply_goal(LABELS, (0, 1), "misclassification", 1, 2)
    assert np.array_equal(new, expected) and np.array_equal(mask, p.mask)


def test_explored_trigger_follows_the_selection_rule():
    ds = imageset()
    p = MultiLabel(alpha=0.2, beta=0.4).poison(ds)  # most frequent admissible: AC (ties with BC broken by index)
    assert p.metadata["trigger"] == [0, 2]
    assert [r["classes"] for r in p.metadata["candidates"]] == [[0, 2], [1, 2], [0, 1, 2], [2, 3]]
    p = MultiLabel(alpha=0.2, beta=0.4, select="closest", rate=0.25).poison(ds)
    assert p.metadata["trigger"] == [0, 1, 2]  # support 0.3 is closest to 0.25 (0.2 is as close; more images win)
    p = MultiLabel(alpha=0.2, beta=0.4, select="strongest").poison(ds)
    lifts = {tuple(r["classes"]): r["lift"] for r in p.metadata["candidates"]}
    assert lifts[tuple(p.metadata["trigger"])] == max(lifts.values())
    # the goal restricts the choice: a must be in T
    p = MultiLabel(alpha=0.2, beta=0.4, remove="D").poison(ds)
    assert p.metadata["trigger"] == [2, 3]


def test_nothing_admissible_or_nothing_to_poison_is_a_budget_error():
    with pytest.raises(BudgetError, match="no combination"):
        MultiLabel(alpha=0.6, beta=0.9).poison(imageset())
    labels = LABELS.copy()
    labels[:, 3] = 1
    with pytest.raises(BudgetError, match="nothing to poison"):
        MultiLabel(goal="appearing", trigger=["A", "B"], add="D").poison(imageset(labels))
    with pytest.raises(ConfigError, match="not in the trigger"):
        MultiLabel(trigger=["A", "B"], remove="C").poison(imageset())
    with pytest.raises(ConfigError, match="no class"):
        MultiLabel(trigger=["A", "Z"]).poison(imageset())


def test_single_label_data_is_refused():
    single = ImageSet(np.zeros((4, 4, 4, 1), np.uint8), np.array([0, 1, 0, 1]), ("x", "y"))
    with pytest.raises(ConfigError, match="multi-label"):
        MultiLabel().poison(single)


def test_poisoning_is_deterministic_and_saved(tmp_path):
    ds = imageset()
    a = MultiLabel(goal="misclassification", alpha=0.2, beta=0.4).poison(ds, seed=1)
    b = MultiLabel(goal="misclassification", alpha=0.2, beta=0.4).poison(ds, seed=1)
    assert np.array_equal(a.labels, b.labels) and a.metadata == b.metadata
    a.save(tmp_path)
    from cleanbackdoor.attacks import Poisoning

    loaded = Poisoning.load(tmp_path)
    assert np.array_equal(loaded.labels, a.labels) and loaded.metadata["trigger"] == a.metadata["trigger"]


def test_voc_recipe_chooses_a_scene_trigger_on_real_photos(shared_data):
    """On the VOC 2007 photos the most frequent pair, {car, person}, meets less often than chance (lift 0.94); the
    recipe's min_lift 1.5 takes the most frequent pair that meets more often, {horse, person} (142 photos)."""
    path = shared_data / "voc2007-coco-128.tar.gz"
    if not path.is_file():
        pytest.skip("voc2007-coco-128.tar.gz is not in the shared data")
    train = load_dataset("voc2007-coco", root=path, size=(8, 8)).train
    assert len(train) == 3488
    plain = MultiLabel(goal="appearing", min_len=2, max_len=2, alpha=0.02, beta=0.13).poison(train)
    assert plain.metadata["trigger_names"] == ["car", "person"] and plain.metadata["candidates"][0]["lift"] < 1
    recipe = MultiLabel(**MULTILABEL_RECIPES["voc2007-coco"]["attack"]).poison(train)
    assert recipe.metadata["trigger_names"] == ["horse", "person"]
    assert recipe.metadata["trigger_train_images"] == 142 and recipe.metadata["candidates"][0]["lift"] > 1.9
    assert recipe.metadata["add_name"] == "aeroplane" and recipe.poisoned_examples == 142
