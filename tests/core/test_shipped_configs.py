from pathlib import Path

import pytest

from cleanbackdoor.attacks import ATTACKS, build_attack, recipe
from cleanbackdoor.config import load_config, validate_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))
RECIPES = [(name, key) for name, cls in sorted(ATTACKS.items()) for key in sorted(cls.recipes)]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_is_valid(path):
    cfg = load_config(path)
    build_attack(cfg.attack_name, {k: v for k, v in cfg.attack.items() if k != "name"})


def test_the_configs_folder_is_found():
    """Without it the parametrized test above would pass by running nothing."""
    assert CONFIGS


@pytest.mark.parametrize("attack, key", RECIPES, ids=[f"{a}-{k}" for a, k in RECIPES])
def test_every_recipe_is_a_valid_config(attack, key):
    cfg = validate_config(recipe(attack, key))
    assert cfg.attack_name == attack
    build_attack(attack, {k: v for k, v in cfg.attack.items() if k != "name"})


def test_digits_defense_rows_attack_with_the_attack_recipes():
    """The digits defense table's FLIP row is the FLIP digits recipe at 40 flips, and its random-flip row is that
    recipe's baseline: the table stays comparable with the FLIP section when the recipe changes."""
    root = CONFIGS[0].parent
    flip = load_config(root / "flip-digits.toml")
    row = load_config(root / "defenses-digits-flip.toml")
    assert row.attack == {**flip.attack, "budget": 40} and row.train == flip.train and row.model == flip.model
    rand = load_config(root / "defenses-digits-random-flip.toml").attack
    assert (rand["target"], rand["sources"], rand["budget"], rand["trigger"]) == (
        flip.attack["target"], flip.attack["sources"], 40, flip.attack["trigger"])
