"""The defense contract: a :class:`Defense` scores examples and flags the suspicious ones.

A *training-set* defense (spectral signatures, activation clustering, confident learning) takes the poisoned
training set (images as the victim saw them, the labels it was given) and, where it needs one, a model trained on
it, and returns a :class:`Detection`: one suspicion score per example (higher = more suspicious, finite) and the
boolean mask of the examples it flags at its own threshold. The experiment scores the detection against the
attack's true mask (:func:`cleanbackdoor.defenses.metrics.detection_metrics`) and, when ``retrain`` is on,
removes the flagged examples, retrains the victim with the same recipe and seed, and measures CTA and ASR again.

An *inference-time* defense (STRIP) scores inputs presented to a deployed model instead: its ``data`` are test
inputs, and it borrows the defender's small set of clean held-out images from :attr:`DefenseContext.reference`.

Every defense validates its parameters up front (pydantic, unknown keys are errors) and states its deviations
from the paper in its module docstring.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cleanbackdoor.components import Configured
from cleanbackdoor.cache import FEATURES
from cleanbackdoor.data.imageset import ImageSet
from cleanbackdoor.errors import ConfigError


class DefenseParams(BaseModel):
    """Parameters every defense shares (none); subclasses add their own. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FilterParams(DefenseParams):
    """Parameters of a defense that removes training data: whether the experiment retrains without the flagged
    examples (a victim's full training run per defense: turn it off where the attack did not work anyway)."""

    retrain: bool = Field(True, description="in an experiment, retrain the victim without the flagged examples and "
                                            "measure it again")


@dataclass
class DefenseContext:
    """What a defense may borrow from its caller: the victim's recipe (for defenses that train models of their
    own, e.g. confident learning's cross-validation), clean held-out images (inference-time defenses), where to
    cache, the device, and how to report progress."""

    model: Any = None  # ModelConfig of the victim's architecture
    train: Any = None  # TrainConfig of the victim's recipe
    # seed -> a fresh model built exactly as the victim is (e.g. from a pretrained extractor); None: from `model`
    model_factory: Callable[[int], nn.Module] | None = None
    reference: np.ndarray | None = None  # clean held-out uint8 images (N, H, W, C)
    cache_dir: Path | None = None
    device: str = "auto"
    progress: bool = False
    log: Callable[[str], None] = lambda message: None

    @property
    def feature_cache(self) -> Path | None:
        """Where a frozen extractor's features are cached, when the victim trains its head alone on one
        (``train.finetune = "last"``): its penultimate features are then those, computed once per image."""
        if self.cache_dir is None or self.train is None or self.train.finetune != "last":
            return None
        return Path(self.cache_dir) / FEATURES


@dataclass
class Detection:
    """What a defense returns: ``scores`` (N,) float (higher = more suspicious), ``flagged`` (N,) bool."""

    defense: str
    scores: np.ndarray
    flagged: np.ndarray
    threshold: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # arrays a caller may use beyond the detection (confident learning's out-of-sample probabilities, (N, K))
    diagnostics: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        self.flagged = np.asarray(self.flagged, dtype=bool)
        if self.scores.ndim != 1 or self.flagged.shape != self.scores.shape:
            raise ValueError(f"{self.defense}: scores {self.scores.shape} and flagged {self.flagged.shape} must be "
                             "(N,) arrays of one length")
        if not np.isfinite(self.scores).all():
            raise ValueError(f"{self.defense}: {int((~np.isfinite(self.scores)).sum())} scores are not finite")

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def num_flagged(self) -> int:
        return int(self.flagged.sum())


def result_keys(names: list[str]) -> list[str]:
    """One result key per defense: its name, with -2, -3 ... when a name is repeated (with other options)."""
    seen: dict[str, int] = {}
    keys = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        keys.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return keys


class Defense(Configured, ABC):
    """Base class of all defenses.

    Subclasses set ``name``, ``Params`` (validated up front: unknown keys and out-of-range values are
    ConfigErrors), ``kind`` ("training" or "inference"), ``needs_model`` and implement :meth:`detect`.
    """

    role: ClassVar[str] = "defense"
    name: ClassVar[str]
    Params: ClassVar[type[DefenseParams]] = DefenseParams
    kind: ClassVar[Literal["training", "inference"]] = "training"
    needs_model: ClassVar[bool] = True
    multilabel: ClassVar[bool] = True  # whether it handles multi-label sets

    @property
    def retrain(self) -> bool:
        """Whether the experiment removes this defense's flagged examples and retrains."""
        return self.kind == "training" and bool(getattr(self.params, "retrain", False))

    def spec(self) -> dict[str, Any]:
        """``{name, **params}``: the config entry that rebuilds this defense."""
        return {"name": self.name, **self.params.model_dump(mode="json")}

    def _check_inputs(self, data: ImageSet, model: nn.Module | None) -> None:
        if self.needs_model and model is None:
            raise ConfigError(f"defense {self.name!r} needs a model trained on the data")
        if data.multilabel and not self.multilabel:
            raise ConfigError(f"defense {self.name!r} works on single-label data only")
        if len(data) < 2:
            raise ConfigError(f"defense {self.name!r} needs at least 2 examples, got {len(data)}")

    @abstractmethod
    def detect(self, data: ImageSet, model: nn.Module | None = None, *, seed: int = 0,
               context: DefenseContext | None = None) -> Detection:
        """Score every example of ``data`` and flag the suspicious ones. Deterministic for a seed on CPU."""
