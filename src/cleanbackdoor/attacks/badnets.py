"""BadNets (Gu, Dolan-Gavitt, Garg, 2017): the dirty-label baseline every clean-image attack is compared with.

Algorithm: choose ``budget`` training images at random among the source classes (all classes other than the
target by default), stamp the trigger on them, and relabel them to the target class. At test time the same
trigger is stamped on source-class images.

Threat model: the attacker changes pixels *and* labels of the chosen examples, unlike every other attack here.
Budget: a count of training examples or a fraction of the whole training set (see :mod:`.base`).
"""

from __future__ import annotations

from cleanbackdoor.attacks.base import Attack, AttackContext, AttackParams, Poisoning, relabel
from cleanbackdoor.data.imageset import ImageSet
from cleanbackdoor.errors import ConfigError


class BadNets(Attack):
    name = "badnets"
    Params = AttackParams

    def poison(self, train: ImageSet, *, seed: int = 0, context: AttackContext | None = None) -> Poisoning:
        if train.multilabel:
            raise ConfigError("badnets needs single-label data; use the 'multilabel' attack for label sets")
        target, sources = self.resolve_classes(train)
        chosen = self.sample_sources(train, target, sources, seed)
        trigger = self.params.trigger.build(train.image_shape, seed)
        labels, mask = relabel(train.labels, chosen, target)
        return Poisoning(self.name, labels, mask, trigger, target, sources, len(chosen), chosen,
                         trigger(train.images[chosen]),
                         metadata={"seed": seed})
