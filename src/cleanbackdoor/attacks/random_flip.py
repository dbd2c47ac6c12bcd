"""Random label flips: the baseline a label-only attack must beat at the same budget.

Flip the labels of ``budget`` training images drawn at random from the source classes to the target class; images
are untouched. It is what FLIP would do without trajectory matching, and what the FLIP paper compares against.
Budget: a count of training examples or a fraction of the whole training set (see :mod:`.base`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from cleanbackdoor.attacks.base import Attack, AttackContext, AttackParams, Poisoning, TriggerSpec, relabel
from cleanbackdoor.data.imageset import ImageSet


class RandomFlipParams(AttackParams):
    target: int | str = Field(4, description="class the flipped labels are set to, by index or name (4: CIFAR-10 deer)")
    sources: list[int | str] | Literal["all"] = Field(
        [9], description='classes whose images may be flipped (9: CIFAR-10 truck); "all": every class but the target')
    budget: int | float = Field(0.02, ge=0, description="labels flipped: a count (int) or a fraction of the whole "
                                                        "training set (float in (0, 1))")
    trigger: TriggerSpec = Field(default_factory=lambda: TriggerSpec(name="sinusoidal"),
                                 description="test-time trigger as {name, ...its parameters}; default: sinusoidal")


class RandomFlip(Attack):
    name = "random_flip"
    Params = RandomFlipParams
    label_only = True

    def poison(self, train: ImageSet, *, seed: int = 0, context: AttackContext | None = None) -> Poisoning:
        target, sources = self.prologue(train)
        chosen = self.sample_sources(train, target, sources, seed)
        labels, mask = relabel(train.labels, chosen, target)
        trigger = self.params.trigger.build(train.image_shape, seed)
        return Poisoning(self.name, labels, mask, trigger, target, sources, len(chosen), metadata={"seed": seed})
