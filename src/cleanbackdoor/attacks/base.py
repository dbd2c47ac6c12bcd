"""The attack contract: an :class:`Attack` turns a training set into a :class:`Poisoning`.

An attack never trains the victim and never evaluates it; the experiment does both, identically for every attack,
so the numbers are comparable across attacks.

**Budget.** Every attack states how many training examples it may change in one way: ``budget`` is either a count
of training examples (an int >= 0), or a fraction of the *whole* training set (a float in (0, 1)), never of one
class. :func:`resolve_budget` turns it into a count; asking for more than the attack can change is a
:class:`~cleanbackdoor.errors.BudgetError`. Attacks whose size is set by something else (the clean-image attack's
poisoning ratio, the multi-label trigger's support) report the count they changed in ``Poisoning.budget``.

**Poisoning.** The new labels (hard (N,), soft (N, C) or multi-label (N, K)), the boolean mask of the examples the
attacker changed, the poisoned images where the attack changes pixels (hidden trigger, BadNets), the test-time
activation (a function of uint8 images), the target and source classes, the metadata that reproduces it, and the
attack's own diagnostics (``diagnostics``: figures and arrays about how the attack went, e.g. FLIP's experts'
accuracy and attack success per epoch and its flip scores; the experiment copies the figures into
``metrics.json``).

**What counts as success.** The experiment measures every model (the victim, the clean model, a model retrained
after a defense) the same way (``cleanbackdoor.experiment.evaluation``): CTA, and the ASR on
:meth:`Attack.asr_mask`'s test images under the poisoning's activation, with and without it. An attack with figures
of its own declares them, never computing a prediction: :meth:`Attack.probes` (test inputs and what a model should
answer on them, e.g. the clean-image attack's natural-feature images and target) and :meth:`Attack.test_figures`
(figures of the test inputs alone, e.g. the size of the test-time change).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cleanbackdoor.components import Configured
from cleanbackdoor.data.imageset import ImageSet
from cleanbackdoor.errors import BudgetError, ConfigError
from cleanbackdoor.metrics import asr_eligible
from cleanbackdoor.triggers import TRIGGERS, Trigger, build_trigger

Activation = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Probe:
    """Test inputs on which the evaluation measures one figure of an attack, for every model alike: the share of
    ``images`` predicted as ``target`` or, with ``labels`` instead, the accuracy on them (NaN when ``images`` is
    empty). ``name`` is the figure's key in ``metrics.json``; ``"group/key"`` puts it under ``group``."""

    name: str
    images: np.ndarray
    target: int | None = None
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.target is None) == (self.labels is None):
            raise ValueError(f"probe {self.name!r}: give a target or labels, not both or neither")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise ValueError(f"probe {self.name!r}: {len(self.labels)} labels for {len(self.images)} images")


def relabel(labels: np.ndarray, chosen: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    """A copy of ``labels`` with the ``chosen`` indices set to ``target``, and the mask of ``chosen``."""
    out = labels.copy()
    out[chosen] = target
    mask = np.zeros(len(labels), dtype=bool)
    mask[chosen] = True
    return out, mask


def resolve_budget(budget: int | float, n_total: int, n_available: int, what: str = "examples") -> int:
    """A budget (count, or fraction of the whole training set) as a count, checked against what can be changed."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
        raise ConfigError(f"budget must be a count (int) or a fraction in (0, 1) (float), got {budget!r}")
    if isinstance(budget, (float, np.floating)):
        if 0 < budget < 1:
            count = int(round(float(budget) * n_total))
        elif budget >= 1 and float(budget).is_integer():
            count = int(budget)
        else:
            raise ConfigError(f"a float budget is a fraction of the training set in (0, 1), got {budget}")
    else:
        count = int(budget)
    if count < 0:
        raise ConfigError(f"budget must not be negative, got {budget}")
    if count > n_available:
        raise BudgetError(f"budget {budget} means {count} {what}, but only {n_available} can be changed "
                          f"(training set of {n_total})")
    return count


class TriggerSpec(BaseModel):
    """``name`` plus the trigger's own parameters, e.g. ``{name = "patch", size = 3, position = "top-left"}``."""

    model_config = ConfigDict(extra="allow")
    name: str = Field("patch", description="trigger name: patch, sinusoidal, pixels, turner or blend; other keys are "
                                           "its parameters")

    def build(self, image_shape: tuple[int, int, int], seed: int) -> Trigger:
        return build_trigger(self.name, image_shape, seed=seed, **(self.model_extra or {}))


class AttackParams(BaseModel):
    """Parameters every attack with a target class shares. Subclasses add their own; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    target: int | str = Field(0, description="target class the backdoor leads to, by index or name")
    sources: list[int | str] | Literal["all"] = Field(
        "all", description='source classes (indices or names) the trigger acts on; "all": every class but the target')
    budget: int | float = Field(0.05, ge=0, description="examples the attack may change: a count (int) or a fraction "
                                                        "of the whole training set (float in (0, 1))")
    trigger: TriggerSpec = Field(default_factory=TriggerSpec,
                                 description="pixel trigger as {name, ...its parameters}; default: a checkerboard "
                                             "patch at the bottom-right corner")


@dataclass
class Poisoning:
    attack: str
    labels: np.ndarray
    mask: np.ndarray
    activation: Activation | None
    target: int | None
    sources: tuple[int, ...] | None
    budget: int
    image_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    images: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # how the attack went: JSON figures (saved in poisoning.json, copied into metrics.json) and numpy arrays
    # (saved in poisoning.npz as diagnostics/<name>)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask, dtype=bool)
        if self.mask.ndim != 1 or len(self.mask) != len(self.labels):
            raise ValueError(f"mask {self.mask.shape} does not match labels {np.shape(self.labels)}")
        self.image_indices = np.asarray(self.image_indices, dtype=np.int64)
        if self.images is not None and len(self.images) != len(self.image_indices):
            raise ValueError("poisoned images and their indices differ in number")

    @property
    def poisoned_examples(self) -> int:
        return int(self.mask.sum())

    @property
    def soft(self) -> bool:
        return self.labels.ndim == 2 and np.issubdtype(self.labels.dtype, np.floating)

    def apply(self, train: ImageSet) -> tuple[np.ndarray, np.ndarray]:
        """The poisoned training set as (images, targets): what the victim trains on."""
        if len(train) != len(self.labels):
            raise ValueError(f"poisoning is for {len(self.labels)} examples, the training set has {len(train)}")
        images = train.images
        if self.images is not None and len(self.image_indices):
            images = images.copy()
            images[self.image_indices] = self.images
        return images, self.labels

    def hard_labels(self) -> np.ndarray:
        """Hard labels (argmax of soft labels)."""
        return self.labels.argmax(1) if self.soft else self.labels

    def figures(self) -> dict[str, Any]:
        """The diagnostics that are not arrays: what ``metrics.json`` reports as ``attack_diagnostics``."""
        return {k: v for k, v in self.diagnostics.items() if not isinstance(v, np.ndarray)}

    # -- persistence ---------------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"labels": self.labels, "mask": self.mask, "image_indices": self.image_indices}
        if self.images is not None:
            arrays["images"] = self.images
        arrays.update({f"{_DIAGNOSTIC}{k}": v for k, v in self.diagnostics.items() if isinstance(v, np.ndarray)})
        np.savez_compressed(folder / "poisoning.npz", **arrays)
        info = {"attack": self.attack, "target": self.target, "sources": list(self.sources) if self.sources else None,
                "budget": self.budget, "poisoned_examples": self.poisoned_examples,
                "activation": getattr(self.activation, "params", lambda: None)(), "metadata": self.metadata,
                "diagnostics": self.figures()}
        (folder / "poisoning.json").write_text(json.dumps(info, indent=2, default=_json_default))

    @classmethod
    def load(cls, folder: str | Path, image_shape: tuple[int, int, int] | None = None) -> Poisoning:
        """Load a saved poisoning (arrays only: no pickle). Pixel triggers are rebuilt from their parameters."""
        folder = Path(folder)
        info = json.loads((folder / "poisoning.json").read_text())
        with np.load(folder / "poisoning.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        activation = None
        spec = info.get("activation")
        if spec and image_shape is not None and spec.get("name") in TRIGGERS:
            spec = dict(spec)
            name, seed = spec.pop("name"), spec.pop("seed", 0)
            spec.pop("image_shape", None)
            activation = build_trigger(name, image_shape, seed=seed, **spec)
        diagnostics = {**info.get("diagnostics", {}),
                       **{k[len(_DIAGNOSTIC):]: v for k, v in arrays.items() if k.startswith(_DIAGNOSTIC)}}
        return cls(info["attack"], arrays["labels"], arrays["mask"], activation, info["target"],
                   tuple(info["sources"]) if info["sources"] else None, info["budget"], arrays["image_indices"],
                   arrays.get("images"), info.get("metadata", {}), diagnostics)


_DIAGNOSTIC = "diagnostics/"  # prefix of the diagnostic arrays in poisoning.npz


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


@dataclass
class AttackContext:
    """What an attack may borrow from the experiment: where to cache, which device, the victim's architecture and
    recipe (the attacker's default guess of them), and how to report progress.

    ``victim(seed)`` builds a fresh victim network as the experiment does (with its pretrained extractor, if it has
    one). ``heldout`` is a labelled set the attack may use to *report* on its own products (FLIP's experts' accuracy
    and attack success per epoch), never to choose its poisoning; the experiment passes its test set."""

    cache_dir: Path | None = None
    device: str = "auto"
    progress: bool = True
    log: Callable[[str], None] = print
    model: Any = None  # ModelConfig of the victim (an attacker's default guess)
    train: Any = None  # TrainConfig of the victim
    victim: Callable[[int], Any] | None = None  # seed -> a fresh victim network (nn.Module)
    heldout: ImageSet | None = None  # for diagnostics only
    features_dir: Path | None = None  # where frozen extractors' features are cached (FrozenFeatures)
    executor: Any = None  # runs the attack's independent jobs (cleanbackdoor.executor; None: one after another)


class Attack(Configured, ABC):
    """Base class of all attacks.

    Subclasses set ``name``, ``Params`` (a pydantic model, validated up front: unknown keys and out-of-range values
    are ConfigErrors) and implement :meth:`poison`. Attacks with a test-time trigger other than a pixel trigger
    override :meth:`asr_mask`, and attacks with figures of their own :meth:`probes` and :meth:`test_figures`.
    """

    role: ClassVar[str] = "attack"
    name: ClassVar[str]
    Params: ClassVar[type[AttackParams]] = AttackParams
    multilabel: ClassVar[bool] = False
    label_only: ClassVar[bool] = False  # changes labels only, with a pixel trigger at test time
    # Dataset name -> the experiment this attack runs on that dataset when the user gives no config file: a partial
    # experiment config (an "attack" table without its name, and the "data", "model", "train" tables the recipe
    # needs), each one measured on the attack's results page. ``cleanbackdoor run --attack NAME [--dataset D]``
    # starts from it, and a config file can with ``extends = "recipe:NAME/D"`` (see
    # :func:`cleanbackdoor.attacks.recipe`). A recipe may name another dataset (a multi-label attack runs on the
    # multi-label counterpart of a single-label set) and keys other than dataset names ("cifar10-paper").
    recipes: ClassVar[dict[str, dict[str, Any]]] = {}

    # -- helpers for subclasses -----------------------------------------------------------------------------
    def check_data(self, train: ImageSet) -> None:
        """A ConfigError unless ``train`` is of the kind the attack takes (label sets when ``multilabel``)."""
        if self.multilabel and not train.multilabel:
            raise ConfigError(f"attack {self.name!r} needs multi-label data (label sets); e.g. dataset "
                              "'cifar10-mosaic', 'voc', 'coco' or 'yolo'")
        if not self.multilabel and train.multilabel:
            raise ConfigError(f"attack {self.name!r} needs single-label data; use the 'multilabel' attack for "
                              "label sets")

    def prologue(self, train: ImageSet) -> tuple[int, tuple[int, ...] | None]:
        """What every single-label attack does first: :meth:`check_data`, then (target, sources) resolved
        (:meth:`resolve_classes`)."""
        self.check_data(train)
        return self.resolve_classes(train)

    def resolve_classes(self, train: ImageSet) -> tuple[int, tuple[int, ...] | None]:
        """(target, sources or None for all classes), resolved against the dataset's classes."""
        target = train.class_index(self.params.target)
        if self.params.sources == "all":
            return target, None
        sources = tuple(sorted({train.class_index(s) for s in self.params.sources}))
        if sources == (target,):
            raise ConfigError(f"attack {self.name!r}: the only source class is the target class {target}")
        return target, sources

    def eligible(self, train: ImageSet, target: int, sources: tuple[int, ...] | None) -> np.ndarray:
        return asr_eligible(train.labels, target, sources)

    def sample_sources(self, train: ImageSet, target: int, sources: tuple[int, ...] | None,
                       seed: int) -> np.ndarray:
        """``budget`` training indices drawn at random (seeded) among the source-class images, sorted."""
        candidates = np.flatnonzero(self.eligible(train, target, sources))
        m = resolve_budget(self.params.budget, len(train), len(candidates), "source-class images")
        return np.sort(np.random.default_rng(seed).choice(candidates, size=m, replace=False))

    # -- the contract ---------------------------------------------------------------------------------------
    @abstractmethod
    def poison(self, train: ImageSet, *, seed: int = 0, context: AttackContext | None = None) -> Poisoning:
        """Return the poisoning of ``train``. Deterministic for a given seed on CPU."""

    def asr_mask(self, test: ImageSet, poisoning: Poisoning) -> np.ndarray:
        """Test images over which ASR is measured (default: true class a source class, not the target)."""
        return asr_eligible(test.labels, poisoning.target, poisoning.sources)

    def probes(self, test: ImageSet, poisoning: Poisoning) -> list[Probe]:
        """The attack's own figures that depend on a model (e.g. the clean-image attack's NASR), as the inputs and
        the answers the evaluation measures on every model."""
        return []

    def test_figures(self, test: ImageSet, poisoning: Poisoning) -> dict[str, Any]:
        """The attack's own figures of the test inputs alone (counts, the size of the test-time change)."""
        return {}

    def dirty_label_spec(self, poisoning: Poisoning, train: ImageSet) -> dict[str, Any] | None:
        """The parameters of BadNets as this label-only attack's dirty-label control: the same trigger, target and
        sources, on as many source images as the attack changed (at most all of them). None for attacks that
        change pixels or whose test-time trigger is not a pixel trigger."""
        if not self.label_only or poisoning.target is None or not isinstance(poisoning.activation, Trigger):
            return None
        trigger = poisoning.activation.params()
        for key in ("image_shape", "seed"):  # BadNets builds it for the same images with the same seed
            trigger.pop(key, None)
        available = int(asr_eligible(train.labels, poisoning.target, poisoning.sources).sum())
        count = min(poisoning.poisoned_examples, available)
        if count == 0:
            return None
        return {"target": poisoning.target, "sources": list(poisoning.sources) if poisoning.sources else "all",
                "trigger": trigger, "budget": count}
