"""Inner-product label flips: a label-only baseline that knows the trigger, stronger than random flips.

Flip to the target the ``budget`` source-class training images whose pixels are most aligned with the trigger: the
score of image x is its inner product with the trigger's mean effect on the source images,
d = mean_x (trigger(x) - x), over the flattened pixels. Images are untouched. A victim trained on these labels sees
the target class attached to the source images that already look most like triggered ones, so a label-only backdoor
can take with no optimization at all. FLIP (Jha, Hayase, Oh, NeurIPS 2023) must beat this to show that trajectory
matching adds something; the authors' repository ships precomputed labels of a baseline of the same name. This is
the toolkit's own formulation of it, not a copy: for an additive trigger such as the sinusoid, d is the pattern
(less what clipping to the pixel range removes).

Ranking only depends on x . d, and subtracting any fixed image from every x shifts all scores alike, so centering
does not change which images are flipped. Ties are broken by index (stable sort). The seed only draws the trigger
where the trigger itself is random; the flips are otherwise deterministic.
Budget: a count of training examples or a fraction of the whole training set (see :mod:`.base`).
"""

from __future__ import annotations

import numpy as np

from cleanbackdoor.attacks.base import Attack, AttackContext, Poisoning, relabel, resolve_budget
from cleanbackdoor.attacks.random_flip import RandomFlipParams
from cleanbackdoor.data.imageset import ImageSet
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.triggers import Trigger


class InnerProductParams(RandomFlipParams):
    """The fields of random flips (target, sources, budget, trigger), which it replaces at the same budget."""


def trigger_alignment(images: np.ndarray, trigger: Trigger) -> np.ndarray:
    """Each image's inner product with d = mean(trigger(x) - x) over ``images`` (uint8, N x H x W x C)."""
    flat = images.reshape(len(images), -1).astype(np.float32)
    direction = (trigger(images).reshape(len(images), -1).astype(np.float32) - flat).mean(0)
    return flat @ direction


class InnerProduct(Attack):
    name = "inner_product"
    Params = InnerProductParams

    def poison(self, train: ImageSet, *, seed: int = 0, context: AttackContext | None = None) -> Poisoning:
        if train.multilabel:
            raise ConfigError("inner_product needs single-label data")
        target, sources = self.resolve_classes(train)
        candidates = np.flatnonzero(self.eligible(train, target, sources))
        m = resolve_budget(self.params.budget, len(train), len(candidates), "source-class images")
        trigger = self.params.trigger.build(train.image_shape, seed)
        scores = trigger_alignment(train.images[candidates], trigger)
        order = np.argsort(-scores, kind="stable")
        chosen = np.sort(candidates[order[:m]])
        labels, mask = relabel(train.labels, chosen, target)
        return Poisoning(self.name, labels, mask, trigger, target, sources, m,
                         metadata={"seed": seed, "score_threshold": float(scores[order[m - 1]]) if m else None})
