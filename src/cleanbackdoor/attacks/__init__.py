"""Attack registry: name -> class. The CLI and config files use these names."""

from __future__ import annotations

import copy
from typing import Any

from cleanbackdoor.attacks.badnets import BadNets
from cleanbackdoor.attacks.base import Attack, AttackContext, AttackParams, Poisoning, Probe, resolve_budget
from cleanbackdoor.attacks.clean_image import CleanImage
from cleanbackdoor.attacks.flip import Flip
from cleanbackdoor.attacks.hidden_trigger import HiddenTrigger
from cleanbackdoor.attacks.inner_product import InnerProduct
from cleanbackdoor.attacks.multilabel import MultiLabel
from cleanbackdoor.attacks.random_flip import RandomFlip
from cleanbackdoor.errors import ConfigError, unknown_name

ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (BadNets, CleanImage, Flip, HiddenTrigger, InnerProduct,
                                                              MultiLabel, RandomFlip)}


def build_attack(name: str, params: dict | None = None) -> Attack:
    if name not in ATTACKS:
        raise unknown_name("attack", name, ATTACKS)
    return ATTACKS[name](params or {})


def recipe(attack: str, key: str) -> dict[str, Any] | None:
    """The experiment ``attack`` runs under recipe ``key`` (a dataset name, or a name like "cifar10-paper") as a
    partial config dict with the attack's name and the dataset's name filled in; None when it has none."""
    if attack not in ATTACKS:
        raise unknown_name("attack", attack, ATTACKS)
    found = ATTACKS[attack].recipes.get(key)
    if found is None:
        return None
    out = copy.deepcopy(found)
    out["data"] = {"name": key, **out.get("data", {})}
    out["attack"] = {"name": attack, **out.get("attack", {})}
    return out


def require_recipe(attack: str, key: str) -> dict[str, Any]:
    """:func:`recipe`, or a ConfigError naming the recipes the attack has."""
    found = recipe(attack, key)
    if found is None:
        have = ", ".join(sorted(ATTACKS[attack].recipes)) or "none"
        raise ConfigError(f"attack {attack!r} has no recipe {key!r}; its recipes: {have}")
    return found


__all__ = ["ATTACKS", "Attack", "AttackContext", "AttackParams", "Poisoning", "Probe", "build_attack", "recipe",
           "require_recipe", "resolve_budget"]
