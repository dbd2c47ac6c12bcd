"""Attack registry: name -> class. The CLI and config files use these names."""

from __future__ import annotations

from cleanbackdoor.attacks.badnets import BadNets
from cleanbackdoor.attacks.base import Attack, AttackContext, AttackParams, Poisoning, resolve_budget
from cleanbackdoor.attacks.clean_image import CleanImage
from cleanbackdoor.attacks.flip import Flip
from cleanbackdoor.attacks.hidden_trigger import HiddenTrigger
from cleanbackdoor.attacks.inner_product import InnerProduct
from cleanbackdoor.attacks.multilabel import MultiLabel
from cleanbackdoor.attacks.random_flip import RandomFlip
from cleanbackdoor.errors import unknown_name

ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (BadNets, CleanImage, Flip, HiddenTrigger, InnerProduct,
                                                              MultiLabel, RandomFlip)}


def build_attack(name: str, params: dict | None = None) -> Attack:
    if name not in ATTACKS:
        raise unknown_name("attack", name, ATTACKS)
    return ATTACKS[name](params or {})


__all__ = ["ATTACKS", "Attack", "AttackContext", "AttackParams", "Poisoning", "build_attack", "resolve_budget"]
