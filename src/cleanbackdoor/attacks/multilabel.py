"""Multi-label clean-image backdoor: a combination of categories is the trigger, only annotations are poisoned.

Paper: K. Chen, X. Lou, G. Xu, J. Li, T. Zhang, "Clean-image Backdoor: Attacking Multi-label Models with Poisoned
Labels Only", ICLR 2023 (authors' code: github kangjie-chen/clean-image_backdoor).

Threat model: an outsourced labeller of a multi-label dataset changes label sets only, never pixels. The trigger is
a set T of categories that co-occur in some images; at test time every image whose content includes all of T
activates the backdoor.

The algorithm, step by step (each a function below):

1. **Trigger exploration** (:func:`explore_triggers`): count the training images that contain each category
   combination (level-wise Apriori mining over bit sets: a combination can be frequent only if all its subsets
   are, so combinations are grown from the frequent ones only). Keep the combinations of length in
   [``min_len``, ``max_len``] whose support (the share of training images containing them, which is the poisoning
   rate they imply) lies in [``alpha``, ``beta``]. Each candidate comes with its support, the count of images it
   covers, and two measures of how strongly its categories co-occur: the *lift* P(T) / prod_c P(c) (how much more
   often they appear together than if independent) and the *all-confidence* P(T) / max_c P(c) (the smallest
   P(T | c)). The table is ranked by support (descending), ties by the category indices. ``min_lift`` (off by
   default; an addition to the paper's criteria) keeps only combinations whose lift reaches it: with ``min_lift``
   above 1 the trigger is a scene whose categories meet more often than chance (on VOC, {horse, person} rather
   than {car, person}, which a weak victim recognizes half as often: docs/attacks/multilabel.md).
2. **Trigger choice** (:func:`choose_trigger`): ``select = "most_frequent"`` takes the most frequent admissible
   candidate, ``"closest"`` the one whose support is closest to ``rate``, ``"strongest"`` the one with the highest
   lift; candidates that cannot serve the goal (without the category to remove, or containing the one to add)
   are skipped. An explicit ``trigger`` overrides the exploration (the table is still reported).
3. **Target label strategy** (:func:`apply_goal`), on every training image whose label set contains T:
   *disappearing* removes a category a of T; *appearing* adds a category b not in T (images that already have b
   are left unchanged); *misclassification* removes a and adds b.

The victim is then trained on the unchanged images with the falsified label sets (sigmoid head, BCE or ASL; the
authors' recipe is the ``multilabel-asl`` preset) and measured by :mod:`cleanbackdoor.multilabel_metrics`: mAP on
the clean test set, the ASR of the goal on test images containing T, and the side effect on the other labels.

Deviations: the authors mine frequent itemsets with a fixed minimum support of 1e-4 and then filter; mining with
``alpha`` as the minimum support gives the same admissible set (supports only shrink as a combination grows). The
authors pick T and the targets by hand from the mined table; here ``select``, ``remove`` and ``add`` make the
choice reproducible (defaults: a = the lowest-index category of T; b = the category outside T that occurs least
often together with T, so that the most trigger images change).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any, Literal

import numpy as np
from pydantic import Field

from cleanbackdoor.attacks.base import Attack, AttackContext, AttackParams, Poisoning
from cleanbackdoor.data.imageset import ImageSet
from cleanbackdoor.errors import BudgetError, ConfigError
from cleanbackdoor.multilabel_metrics import BackdoorSpec, contains_all

# the most candidate combinations counted at one level of the mining, a guard against a tiny alpha on many classes
MAX_CANDIDATES = 2_000_000


@dataclass(frozen=True)
class Candidate:
    """One admissible trigger: its categories, support (fraction), covered images (count) and co-occurrence."""

    classes: tuple[int, ...]
    names: tuple[str, ...]
    count: int
    support: float
    lift: float
    all_confidence: float

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["classes"], d["names"] = list(self.classes), list(self.names)
        return d


def _popcount_and(bits: np.ndarray, classes: tuple[int, ...]) -> int:
    acc = bits[classes[0]]
    for c in classes[1:]:
        acc = acc & bits[c]
    return int(np.bitwise_count(acc).sum())


def frequent_combinations(labels: np.ndarray, min_count: int, max_len: int) -> dict[tuple[int, ...], int]:
    """Every category combination (sorted index tuple) of length <= ``max_len`` contained in at least ``min_count``
    label sets, with its count: level-wise Apriori over packed bit columns."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ConfigError(f"trigger exploration needs a label matrix (N, classes), got shape {labels.shape}")
    min_count = max(1, int(min_count))
    bits = np.packbits(labels.astype(bool).T, axis=1)  # (K, ceil(N / 8))
    counts = labels.astype(np.int64).sum(axis=0)
    level = {(int(c),): int(counts[c]) for c in range(labels.shape[1]) if counts[c] >= min_count}
    found = dict(level)
    for size in range(2, max_len + 1):
        prev = sorted(level)
        prev_set = set(prev)
        candidates = []
        for i, a in enumerate(prev):  # join two (size-1)-sets sharing their first size-2 categories
            for b in prev[i + 1:]:
                if a[:-1] != b[:-1]:
                    break
                cand = a + (b[-1],)
                if all(sub in prev_set for sub in combinations(cand, size - 1)):
                    candidates.append(cand)
        if len(candidates) > MAX_CANDIDATES:
            raise ConfigError(f"trigger exploration: {len(candidates)} combinations of length {size} to count; "
                              "raise alpha or lower max_len")
        level = {}
        for cand in candidates:
            n = _popcount_and(bits, cand)
            if n >= min_count:
                level[cand] = n
        if not level:
            break
        found.update(level)
    return found


def explore_triggers(labels: np.ndarray, *, min_len: int = 2, max_len: int = 3, alpha: float = 0.01,
                     beta: float = 0.1, min_lift: float = 0.0,
                     class_names: tuple[str, ...] | None = None) -> list[Candidate]:
    """The admissible triggers of a label matrix (N, K): length in [min_len, max_len], support in [alpha, beta],
    lift at least ``min_lift`` (1: the categories meet at least as often as if independent; 0: no condition).

    Ranked by support (descending), ties by category indices (ascending). Support = count / N, compared with
    ``alpha`` and ``beta`` inclusively.
    """
    labels = np.asarray(labels)
    if not 1 <= min_len <= max_len:
        raise ConfigError(f"trigger exploration: need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    if not 0 <= alpha <= beta <= 1:
        raise ConfigError(f"trigger exploration: need 0 <= alpha <= beta <= 1, got alpha={alpha}, beta={beta}")
    n = len(labels)
    if n == 0:
        raise ConfigError("trigger exploration: the training set is empty")
    names = class_names or tuple(str(c) for c in range(labels.shape[1]))
    min_count = math.floor(alpha * n)  # a lower bound for pruning; the support is checked exactly below
    found = frequent_combinations(labels, min_count, max_len)
    single = labels.astype(np.int64).sum(axis=0) / n
    out = []
    for classes, count in found.items():
        support = count / n
        if not min_len <= len(classes) <= max_len or not alpha <= support <= beta:
            continue
        p = single[list(classes)]
        lift = float(support / np.prod(p))
        if lift < min_lift:
            continue
        out.append(Candidate(classes, tuple(names[c] for c in classes), count, support, lift,
                             float(support / p.max())))
    out.sort(key=lambda c: (-c.count, c.classes))
    return out


def covered_images(labels: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """Indices of the images a candidate covers (whose label set contains all its categories), ascending."""
    return np.flatnonzero(contains_all(labels, classes))


def choose_trigger(candidates: list[Candidate], select: str, rate: float | None = None,
                   remove: int | None = None, add: int | None = None) -> Candidate | None:
    """The candidate the selection rule picks among those that can serve the goal (None if there is none)."""
    usable = [c for c in candidates
              if (remove is None or remove in c.classes) and (add is None or add not in c.classes)]
    if not usable:
        return None
    if select == "most_frequent":
        return usable[0]
    if select == "closest":
        assert rate is not None
        return min(usable, key=lambda c: (abs(c.support - rate), -c.count, c.classes))
    if select == "strongest":
        return min(usable, key=lambda c: (-c.lift, -c.count, c.classes))
    raise ConfigError(f"unknown trigger selection {select!r}")


def apply_goal(labels: np.ndarray, trigger: tuple[int, ...], goal: str, remove: int | None,
               add: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(poisoned labels, mask of the changed images): the goal applied to every label set containing ``trigger``."""
    try:
        BackdoorSpec(tuple(trigger), goal, remove, add)  # checks that the goal has its targets
    except ValueError as e:
        raise ConfigError(f"attack 'multilabel': {e}") from None
    labels = np.asarray(labels)
    hit = contains_all(labels, trigger)
    new = labels.copy()
    if remove is not None:
        new[hit, remove] = 0
    if add is not None:
        new[hit, add] = 1
    return new, (new != labels).any(axis=1)


class MultiLabelParams(AttackParams):
    goal: Literal["disappearing", "appearing", "misclassification"] = Field(
        "disappearing", description="disappearing: remove a (in T); appearing: add b (not in T); misclassification: "
                                    "both")
    trigger: list[int | str] | None = Field(None, description="explicit trigger categories T (names or indices); "
                                                              "None: explore and select")
    remove: int | str | None = Field(None, description="category a (in T) to remove: disappearing, "
                                                       "misclassification; None: T's lowest-index category")
    add: int | str | None = Field(None, description="category b (not in T) to add: appearing, misclassification; "
                                                    "None: the one least often seen with T")
    min_len: int = Field(2, ge=1, le=8, description="fewest categories in an explored trigger")
    max_len: int = Field(3, ge=1, le=8, description="most categories in an explored trigger")
    alpha: float = Field(0.01, ge=0, le=1, description="lowest support of an admissible trigger: a fraction of the "
                                                       "whole training set")
    beta: float = Field(0.10, ge=0, le=1, description="highest support of an admissible trigger: a fraction of the "
                                                      "whole training set")
    min_lift: float = Field(0.0, ge=0, description="lowest lift P(T) / prod P(c) of an admissible trigger (above 1: "
                                                   "categories that meet more often than chance, a scene; 0: any)")
    select: Literal["most_frequent", "closest", "strongest"] = Field(
        "most_frequent", description="trigger choice: most_frequent, closest (support nearest rate) or strongest "
                                     "(highest lift)")
    rate: float | None = Field(None, gt=0, le=1, description="the support `closest` aims at (required by it, "
                                                              "used by nothing else)")
    threshold: float = Field(0.75, gt=0, lt=1, description="decision threshold on sigmoid scores in the evaluation "
                                                           "(the authors' 0.75)")
    top_k: int | None = Field(None, ge=1, description="evaluation predicts only among an image's top_k scores "
                                                      "(authors: 8 on VOC, 20 on COCO); None: no limit")
    table_rows: int = Field(20, ge=0, description="ranked trigger candidates kept in poisoning.json")
    target: int | str | None = Field(None, description="not used (the targets are remove and add); must stay unset")
    budget: int | float | None = Field(None, description="not used (the trigger's support sets the size); must stay "
                                                         "unset")


# Where the attack fires (docs/attacks/multilabel.md), on the multi-label counterpart of a single-label set: 2x2
# mosaics of its images. Digits: a ConvNet on 2,500 mosaics of scikit-learn's digits, the most frequent pair as
# the trigger (disappearing: ASR 90.1% at score threshold 0.75, clean model 2.2%, mAP 91.1 vs 92.0; seconds).
# CIFAR-10: an MLP head on the frozen 60-epoch ResNet-20 (artifacts/), 20,000 mosaics (ASR 92.0 / 93.8 / 90.9%
# for the three goals).
_DIGITS_MOSAIC: dict[str, Any] = {
    "data": {"name": "digits-mosaic", "options": {"train_size": 2500, "test_size": 600}},
    "model": {"name": "convnet", "options": {"width": 16}},
    "train": {"preset": "multilabel-asl", "epochs": 12, "lr": 5e-3},
    "attack": {"goal": "disappearing", "min_len": 2, "max_len": 2, "alpha": 0.05, "beta": 0.15,
               "select": "most_frequent"},
}
_CIFAR10_MOSAIC: dict[str, Any] = {
    "data": {"name": "cifar10-mosaic", "options": {"grid": 2, "tile": 32, "train_size": 20000, "test_size": 4000,
                                                   "objects": [1, 4], "skew": 0.5, "seed": 0}},
    "model": {"name": "resnet20", "options": {"pool": 2, "head_hidden": [1024, 1024]},
              "pretrained": {"dataset": "cifar10", "train": {"preset": "cifar-fast", "epochs": 60}}},
    "train": {"preset": "multilabel-asl", "finetune": "last", "epochs": 100, "batch_size": 128, "lr": 2e-3,
              "hflip": True},
    "attack": {"goal": "disappearing", "min_len": 2, "max_len": 2, "alpha": 0.02, "beta": 0.13,
               "select": "most_frequent", "threshold": 0.75},
}
# VOC 2007 (the workplace's COCO-format re-export, 3,488 training photos at 64x64): the 60-epoch CIFAR-10
# ResNet-20 fine-tuned end to end with the authors' ASL loss (a frozen one gives mAP 36-39 on VOC's val split, the
# fine-tuned one 56), and a trigger whose categories meet more often than chance (min_lift 1.5: {horse, person},
# 4.1% of the photos, lift 1.94), which the clean victim recognizes on 63% of val photos against 29% for the most
# frequent pair {car, person} (docs/attacks/multilabel.md). About 8 minutes per model on 2 cores (compiled).
_VOC2007: dict[str, Any] = {
    "data": {"name": "voc2007-coco"},
    "model": {"name": "resnet20", "options": {"pool": 2, "head_hidden": [1024, 1024]},
              "pretrained": {"dataset": "cifar10", "train": {"preset": "cifar-fast", "epochs": 60}}},
    "train": {"preset": "multilabel-asl", "epochs": 30, "batch_size": 64, "lr": 1e-3, "hflip": True,
              "crop_padding": 8, "compile": True},
    "attack": {"goal": "appearing", "min_len": 2, "max_len": 2, "alpha": 0.02, "beta": 0.13, "min_lift": 1.5,
               "select": "most_frequent", "threshold": 0.75},
}
MULTILABEL_RECIPES: dict[str, dict[str, Any]] = {"digits": _DIGITS_MOSAIC, "digits-mosaic": _DIGITS_MOSAIC,
                                                 "cifar10": _CIFAR10_MOSAIC, "cifar10-mosaic": _CIFAR10_MOSAIC,
                                                 "voc2007-coco": _VOC2007}


class MultiLabel(Attack):
    """Multi-label clean-image backdoor (Chen et al., ICLR 2023): poison the label sets that contain a trigger
    combination of categories.

    Arguments (``MultiLabelParams``):
        goal: ``disappearing`` (remove a in T), ``appearing`` (add b not in T) or ``misclassification`` (both).
        trigger: the trigger's categories (names or indices); default: explored and chosen by ``select``.
        remove, add: the categories a and b (defaults in the module docstring).
        min_len, max_len, alpha, beta: the exploration's length range and support range (fractions of the whole
            training set; the poisoning rate equals the trigger's support).
        select: ``most_frequent`` (default), ``closest`` (to ``rate``) or ``strongest`` (highest lift).
        threshold, top_k: the decision rule of the evaluation (score > threshold, among the top-K).
        table_rows: how many ranked candidates ``poisoning.json`` keeps.

    Shapes: takes a multi-label :class:`ImageSet` (labels (N, K) uint8); returns a :class:`Poisoning` with labels
    (N, K) uint8, the mask (N,) of the label sets changed, no images, no activation (the trigger is the image
    content), ``target`` = b (appearing, misclassification) or a (disappearing), and metadata holding the trigger,
    the goal, a, b, the decision rule and the ranked candidate table.

    Example::

        >>> from cleanbackdoor.data import load_dataset
        >>> train = load_dataset("digits-mosaic", train_size=2000, test_size=10).train
        >>> p = MultiLabel(goal="disappearing", alpha=0.02, beta=0.2).poison(train, seed=0)
        >>> p.metadata["trigger_names"], p.metadata["support"]  # the most frequent pair or triple
    """

    name = "multilabel"
    Params = MultiLabelParams
    multilabel = True
    recipes = MULTILABEL_RECIPES

    def _check_params(self) -> None:
        p = self.params
        if p.budget is not None:
            raise ConfigError("attack 'multilabel' is sized by the trigger's support (alpha, beta), not `budget`")
        if p.target is not None:
            raise ConfigError("attack 'multilabel' names its targets `remove` (a, in the trigger) and `add` (b)")
        if p.sources != "all":
            raise ConfigError("attack 'multilabel' poisons every image containing the trigger; `sources` must be "
                              "'all'")
        if p.min_len > p.max_len:
            raise ConfigError(f"attack 'multilabel': min_len {p.min_len} exceeds max_len {p.max_len}")
        if p.alpha > p.beta:
            raise ConfigError(f"attack 'multilabel': alpha {p.alpha} exceeds beta {p.beta} (support bounds)")
        if p.goal == "appearing" and p.remove is not None:
            raise ConfigError("attack 'multilabel': goal 'appearing' adds a category; `remove` is for "
                              "'disappearing' and 'misclassification'")
        if p.goal == "disappearing" and p.add is not None:
            raise ConfigError("attack 'multilabel': goal 'disappearing' removes a category; `add` is for "
                              "'appearing' and 'misclassification'")
        if (p.select == "closest") != (p.rate is not None):
            raise ConfigError("attack 'multilabel': select = 'closest' needs `rate` (a target support), and `rate` "
                              "is only used by it")
        if p.trigger is not None:
            if not p.trigger:
                raise ConfigError("attack 'multilabel': an explicit trigger needs at least one category")
            if len({str(c) for c in p.trigger}) != len(p.trigger):
                raise ConfigError(f"attack 'multilabel': trigger {p.trigger} names a category twice")

    def poison(self, train: ImageSet, *, seed: int = 0, context: AttackContext | None = None) -> Poisoning:
        self.check_data(train)
        log = context.log if context is not None else (lambda m: None)
        p = self.params
        names = train.class_names
        lift_text = f", lift >= {p.min_lift}" if p.min_lift > 0 else ""
        remove = train.class_index(p.remove) if p.remove is not None else None
        add = train.class_index(p.add) if p.add is not None else None
        table = explore_triggers(train.labels, min_len=p.min_len, max_len=p.max_len, alpha=p.alpha, beta=p.beta,
                                 min_lift=p.min_lift, class_names=names)
        if p.trigger is not None:
            trigger = tuple(sorted({train.class_index(c) for c in p.trigger}))
            if len(trigger) != len(p.trigger):
                raise ConfigError(f"attack 'multilabel': trigger {p.trigger} names a category twice")
        else:
            chosen = choose_trigger(table, p.select, p.rate, remove, add)
            if chosen is None:
                why = f" containing {names[remove]!r}" if remove is not None else ""
                why += f" without {names[add]!r}" if add is not None else ""
                raise BudgetError(f"attack 'multilabel': no combination of {p.min_len} to {p.max_len} categories"
                                  f"{why} has a support in [{p.alpha}, {p.beta}]{lift_text} ({len(table)} "
                                  "admissible in all); widen alpha/beta or the lengths, or give `trigger`")
            trigger = chosen.classes
        has_trigger = contains_all(train.labels, trigger)
        if not has_trigger.any():
            raise BudgetError(f"attack 'multilabel': no training image contains the trigger "
                              f"{{{', '.join(names[c] for c in trigger)}}}")
        if p.goal in ("disappearing", "misclassification"):
            if remove is None:
                remove = trigger[0]
            elif remove not in trigger:
                raise ConfigError(f"attack 'multilabel': the category to remove, {names[remove]!r}, is not in the "
                                  f"trigger {{{', '.join(names[c] for c in trigger)}}}")
        if p.goal in ("appearing", "misclassification"):
            if add is None:
                outside = [c for c in range(train.num_classes) if c not in trigger]
                together = train.labels[has_trigger][:, outside].astype(np.int64).sum(axis=0)
                add = outside[int(np.argmin(together))]  # argmin: ties to the lowest index
            elif add in trigger:
                raise ConfigError(f"attack 'multilabel': the category to add, {names[add]!r}, is in the trigger")
        labels, mask = apply_goal(train.labels, trigger, p.goal, remove, add)
        if not mask.any():
            raise BudgetError(f"attack 'multilabel': every training image with the trigger already has "
                              f"{names[add]!r}; nothing to poison")
        n = len(train)
        support = float(has_trigger.mean())
        log(f"multilabel: {len(table)} admissible triggers (length {p.min_len}-{p.max_len}, support "
            f"[{p.alpha}, {p.beta}]{lift_text}); top of the table:")
        for c in table[:5]:
            log(f"  {{{', '.join(c.names)}}}: {c.count} images ({100 * c.support:.2f}%), lift {c.lift:.2f}, "
                f"all-confidence {c.all_confidence:.2f}")
        goal_text = {"disappearing": f"remove {names[remove] if remove is not None else ''}",
                     "appearing": f"add {names[add] if add is not None else ''}",
                     "misclassification": f"remove {names[remove] if remove is not None else ''}, add "
                                          f"{names[add] if add is not None else ''}"}[p.goal]
        log(f"multilabel: trigger {{{', '.join(names[c] for c in trigger)}}} in {int(has_trigger.sum())} training "
            f"images ({100 * support:.2f}%); goal {p.goal}: {goal_text}")
        metadata = {
            "seed": seed,
            "goal": p.goal,
            "trigger": list(trigger),
            "trigger_names": [names[c] for c in trigger],
            "remove": remove,
            "remove_name": names[remove] if remove is not None else None,
            "add": add,
            "add_name": names[add] if add is not None else None,
            "threshold": p.threshold,
            "top_k": p.top_k,
            "support": support,
            "trigger_train_images": int(has_trigger.sum()),
            "changed": int(mask.sum()),
            "exploration": {"min_len": p.min_len, "max_len": p.max_len, "alpha": p.alpha, "beta": p.beta,
                            "min_lift": p.min_lift, "select": p.select, "rate": p.rate, "admissible": len(table),
                            "explicit_trigger": p.trigger is not None},
            "candidates": [c.row() for c in table[:p.table_rows]],
            "train_size": n,
        }
        target = add if p.goal != "disappearing" else remove
        return Poisoning(self.name, labels, mask, None, target, None, int(mask.sum()), metadata=metadata)

    # -- measurement --------------------------------------------------------------------------------------------
    def asr_mask(self, test: ImageSet, poisoning: Poisoning) -> np.ndarray:
        return BackdoorSpec.from_metadata(poisoning.metadata).eligible(test.labels)
