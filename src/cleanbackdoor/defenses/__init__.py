"""Defense registry: name -> class. Config files (``defenses = [...]``) and the CLI use these names.

Modules, one method each: :mod:`.spectral` (spectral signatures, Tran et al. 2018), :mod:`.activation_clustering`
(Chen et al. 2018), :mod:`.strip` (STRIP, Gao et al. 2019, inference time), :mod:`.confident_learning`
(cleanlab's confident learning for label errors); :mod:`.base` holds the contract, :mod:`.metrics` the detection
figures, :mod:`.internal` private helpers. The experiment's defenses stage and the attack x defense table run them
(:mod:`cleanbackdoor.experiment.defense_stage`, :mod:`cleanbackdoor.experiment.defense_table`).
"""

from __future__ import annotations

from typing import Any

from cleanbackdoor.defenses.activation_clustering import ActivationClustering
from cleanbackdoor.defenses.base import Defense, DefenseContext, DefenseParams, Detection, FilterParams
from cleanbackdoor.defenses.confident_learning import ConfidentLearning
from cleanbackdoor.defenses.metrics import detection_metrics, roc_auc
from cleanbackdoor.defenses.spectral import SpectralSignatures
from cleanbackdoor.defenses.strip import STRIP
from cleanbackdoor.errors import ConfigError, unknown_name

DEFENSES: dict[str, type[Defense]] = {cls.name: cls for cls in (SpectralSignatures, ActivationClustering, STRIP,
                                                                 ConfidentLearning)}


def build_defense(name: str, params: dict | None = None) -> Defense:
    if name not in DEFENSES:
        raise unknown_name("defense", name, DEFENSES)
    return DEFENSES[name](params or {})


def defense_spec(spec: Any) -> dict[str, Any]:
    """A config entry as ``{name, **options}``: a bare name is accepted for a defense with default options."""
    if isinstance(spec, str):
        return {"name": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ConfigError(f"a defense is a name or a table with a `name` key (e.g. {{name = \"spectral\"}}), "
                          f"got {spec!r}")
    return dict(spec)


def build_defenses(specs: list[Any]) -> list[Defense]:
    """The defenses of a config's ``defenses`` list, validated (unknown names and options are ConfigErrors)."""
    out = []
    for spec in specs:
        spec = defense_spec(spec)
        out.append(build_defense(spec["name"], {k: v for k, v in spec.items() if k != "name"}))
    return out


__all__ = [
    "DEFENSES",
    "STRIP",
    "ActivationClustering",
    "ConfidentLearning",
    "Defense",
    "DefenseContext",
    "DefenseParams",
    "Detection",
    "FilterParams",
    "SpectralSignatures",
    "build_defense",
    "build_defenses",
    "defense_spec",
    "detection_metrics",
    "roc_auc",
]
