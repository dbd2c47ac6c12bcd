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

``space``: where x and d live. ``"pixels"`` as above; ``"features"``: the victim's frozen extractor's features
(a victim that trains only its head, ``train.finetune = "last"``): d = mean(f(trigger(x)) - f(x)), score f(x) . d.
That is the baseline FLIP must beat against such a victim: an attacker who knows the extractor, as FLIP's experts
do, without trajectory matching. ``"auto"`` (default): features for a head-only victim, else pixels.
Budget: a count of training examples or a fraction of the whole training set (see :mod:`.base`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from cleanbackdoor.attacks.base import Attack, AttackContext, Poisoning, relabel, resolve_budget
from cleanbackdoor.attacks.random_flip import RandomFlipParams
from cleanbackdoor.data.imageset import ImageSet
from cleanbackdoor.data.transforms import Augment, to_nchw
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.training import FrozenFeatures, resolve_device
from cleanbackdoor.triggers import Trigger


class InnerProductParams(RandomFlipParams):
    """The fields of random flips (target, sources, budget, trigger), which it replaces at the same budget, and
    the space the alignment is measured in."""

    space: Literal["auto", "pixels", "features"] = Field(
        "auto", description="where the alignment with the trigger is measured: pixels, features (the victim's frozen "
                            "extractor) or auto (features for a head-only victim, else pixels)")


def trigger_alignment(images: np.ndarray, trigger: Trigger) -> np.ndarray:
    """Each image's inner product with d = mean(trigger(x) - x) over ``images`` (uint8, N x H x W x C)."""
    flat = images.reshape(len(images), -1).astype(np.float32)
    direction = (trigger(images).reshape(len(images), -1).astype(np.float32) - flat).mean(0)
    return flat @ direction


class InnerProduct(Attack):
    name = "inner_product"
    Params = InnerProductParams
    label_only = True

    def poison(self, train: ImageSet, *, seed: int = 0, context: AttackContext | None = None) -> Poisoning:
        target, sources = self.prologue(train)
        candidates = np.flatnonzero(self.eligible(train, target, sources))
        m = resolve_budget(self.params.budget, len(train), len(candidates), "source-class images")
        trigger = self.params.trigger.build(train.image_shape, seed)
        ctx = context or AttackContext()
        space = self.params.space
        head_only = ctx.train is not None and ctx.train.finetune == "last"
        if space == "auto":
            space = "features" if head_only and ctx.victim is not None else "pixels"
        if space == "features":
            if not head_only or ctx.victim is None:
                raise ConfigError("attack 'inner_product': space = 'features' needs a victim that trains its head "
                                  "on a frozen extractor (train.finetune = 'last')")
            scores = feature_alignment(ctx.victim(seed), train.images[candidates], trigger, ctx)
        else:
            scores = trigger_alignment(train.images[candidates], trigger)
        order = np.argsort(-scores, kind="stable")
        chosen = np.sort(candidates[order[:m]])
        labels, mask = relabel(train.labels, chosen, target)
        return Poisoning(self.name, labels, mask, trigger, target, sources, m,
                         metadata={"seed": seed, "space": space,
                                   "score_threshold": float(scores[order[m - 1]]) if m else None})


def feature_alignment(victim, images: np.ndarray, trigger: Trigger, ctx: AttackContext) -> np.ndarray:
    """Each image's inner product with d = mean(f(trigger(x)) - f(x)), f the victim's frozen extractor (features
    cached in ``ctx.features_dir``)."""
    device = resolve_device(ctx.device)
    victim = victim.to(device)

    def features(x: np.ndarray) -> np.ndarray:
        out = FrozenFeatures.of(victim, to_nchw(x, device), Augment(), cache_dir=ctx.features_dir)
        if out is None:
            raise ConfigError("attack 'inner_product': the victim has no `features` to align with")
        return out.plain.cpu().numpy().astype(np.float64)

    clean = features(images)
    direction = (features(trigger(images)) - clean).mean(0)
    return clean @ direction
