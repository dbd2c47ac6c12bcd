"""BadNets (Gu, Dolan-Gavitt, Garg, 2017): the dirty-label baseline every clean-image attack is compared with.

Algorithm: choose ``budget`` training images at random among the source classes (all classes other than the
target by default), stamp the trigger on them, and relabel them to the target class. At test time the same
trigger is stamped on source-class images.

Threat model: the attacker changes pixels *and* labels of the chosen examples, unlike every other attack here.
Budget: a count of training examples or a fraction of the whole training set (see :mod:`.base`).
"""

from __future__ import annotations

from typing import Any

from cleanbackdoor.attacks.base import Attack, AttackContext, AttackParams, Poisoning, relabel
from cleanbackdoor.data.imageset import ImageSet


# Digits: the defaults (5% of the training set, a 2x2 checkerboard patch, target 0: ASR 100%). CIFAR-10: a 3x3
# checkerboard on 2,500 images (5%) and a 6-epoch ConvNet (docs/attacks/badnets.md).
BADNETS_RECIPES: dict[str, dict[str, Any]] = {
    "digits": {},
    "cifar10": {
        "model": {"name": "convnet", "options": {"width": 32}},
        "train": {"preset": "cifar-fast", "epochs": 6},
        "attack": {"budget": 2500, "target": 0, "sources": "all",
                   "trigger": {"name": "patch", "size": 3, "position": "bottom-right", "pattern": "checkerboard"}},
    },
}


class BadNets(Attack):
    name = "badnets"
    Params = AttackParams
    recipes = BADNETS_RECIPES

    def poison(self, train: ImageSet, *, seed: int = 0, context: AttackContext | None = None) -> Poisoning:
        target, sources = self.prologue(train)
        chosen = self.sample_sources(train, target, sources, seed)
        trigger = self.params.trigger.build(train.image_shape, seed)
        labels, mask = relabel(train.labels, chosen, target)
        return Poisoning(self.name, labels, mask, trigger, target, sources, len(chosen), chosen,
                         trigger(train.images[chosen]),
                         metadata={"seed": seed})
