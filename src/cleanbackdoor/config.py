"""Typed, validated experiment configuration, from a TOML file, a Python object, or ``--set key=value`` overrides.

Everything has a default, so ``ExperimentConfig()`` is the plainest experiment (BadNets on digits). The command
line without a config file starts from an attack's *recipe* for the dataset instead (FLIP on digits by default;
:func:`recipe_base`), and a config file can with ``extends = "recipe:ATTACK/DATASET"``.
Unknown keys and out-of-range values are errors that name the key. The resolved configuration (defaults and
presets filled in) is written next to the results as ``config.toml``, so a run can be repeated from its folder.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from cleanbackdoor.attacks import ATTACKS, recipe, require_recipe
from cleanbackdoor.components import format_validation_error
from cleanbackdoor.cache import default_root
from cleanbackdoor.defenses import build_defenses, defense_spec
from cleanbackdoor.errors import ConfigError
from cleanbackdoor.recipes import TrainConfig, expand_preset, preset
from cleanbackdoor.specs import DataConfig, ModelConfig
from cleanbackdoor.training import resolve_device

# The training recipe a dataset gets when the config names none.
DEFAULT_PRESET = {"digits": "digits", "mnist": "digits", "cifar10": "cifar-fast", "cifar100": "cifar-fast",
                  "folder": "cifar-fast"}
DEFAULT_MODEL = {"digits": {"name": "convnet", "options": {"width": 32}}}


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    seed: int = Field(0, ge=0)
    device: str = "auto"
    out: str | None = None
    cache_dir: str | None = None
    progress: bool = True
    clean_baseline: bool = True
    # label-only attacks: also train BadNets with the same trigger, target, sources and count (the bound no
    # label-only attack can beat in this setting)
    dirty_label_control: bool = True
    examples: int = Field(8, ge=0, le=32)
    data: DataConfig = Field(default_factory=DataConfig)
    attack: dict[str, Any] = Field(default_factory=lambda: {"name": "badnets"})
    model: ModelConfig | None = None
    train: TrainConfig | None = None
    # run after the victim is trained: specs like the attack's, a name plus options (see cleanbackdoor.defenses)
    defenses: list[dict[str, Any]] = Field(default_factory=list)
    # which recipe a config without a file started from (the run's log says it); not part of the config itself
    _recipe_note: str | None = PrivateAttr(None)

    @field_validator("defenses", mode="before")
    @classmethod
    def _defenses_known(cls, value: Any) -> Any:
        if not isinstance(value, list):
            raise PydanticCustomError("defenses", 'a list of defenses, e.g. [{name = "spectral"}, "strip"]')
        try:
            specs = [defense_spec(v) for v in value]
            build_defenses(specs)  # unknown names and options are errors before anything runs
        except ConfigError as e:
            raise PydanticCustomError("defenses", str(e)) from None
        return specs

    @field_validator("device")
    @classmethod
    def _device_exists(cls, value: str) -> str:
        try:
            resolve_device(value)
        except ConfigError as e:
            raise PydanticCustomError("device", str(e)) from None
        return value

    @field_validator("train", mode="before")
    @classmethod
    def _expand_preset(cls, value: Any) -> Any:
        return expand_preset(value)

    @field_validator("attack", mode="before")
    @classmethod
    def _attack_named(cls, value: Any) -> Any:
        if isinstance(value, dict) and "name" not in value:
            return {"name": "badnets", **value}  # `--set attack.budget=...` keeps the default attack
        return value

    @model_validator(mode="after")
    def _fill_defaults(self) -> ExperimentConfig:
        if self.model is None:
            self.model = ModelConfig(**DEFAULT_MODEL.get(self.data.name, {}))
        if self.train is None:
            self.train = preset(DEFAULT_PRESET.get(self.data.name, "cifar-fast"))
        pretrained = self.model.pretrained
        if pretrained is not None and pretrained.dataset is None:  # the source task comes from the same files
            pretrained.dataset, pretrained.root = self.data.name, self.data.root
            pretrained.options = dict(self.data.options)
        elif pretrained is not None and pretrained.root is None:  # another dataset of the same files (the
            pretrained.root = self.data.root                      # single images a mosaic set is composed of)
        return self

    @property
    def recipe_note(self) -> str | None:
        """Which recipe the config started from, when it came from the command line without a file."""
        return self._recipe_note

    @property
    def attack_name(self) -> str:
        return str(self.attack["name"])

    def output_dir(self) -> Path:
        return Path(self.out or f"runs/{self.attack_name}-{self.data.name}-seed{self.seed}")

    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else default_root()


# The attack a command line without a config file runs: the first of the four papers, with its digits recipe.
DEFAULT_ATTACK = "flip"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                recipe: bool | str = False, **fields: Any) -> ExperimentConfig:
    """Config from a TOML file (optional), then keyword fields, then ``key=value`` overrides (dotted keys).

    ``recipe``: without a file, start from the attack's recipe for the dataset (:func:`recipe_base`), as the
    command line does, or from the recipe of that name (e.g. "cifar10-paper"); False: from the plain defaults."""
    given: dict[str, Any] = {}
    for key, value in fields.items():
        if value is not None:
            set_dotted(given, key, value)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set takes key=value, got {item!r}")
        key, text = item.split("=", 1)
        set_dotted(given, key.strip(), parse_value(text.strip()))
    note = None
    if path is not None:
        base = read_toml(Path(path))
    elif recipe:
        base, note = recipe_base(given, recipe if isinstance(recipe, str) else None)
    else:
        base = {}
    cfg = validate_config(merge_configs(base, given))
    cfg._recipe_note = note or None
    return cfg



def recipe_base(given: dict[str, Any], key: str | None = None) -> tuple[dict[str, Any], str]:
    """The config a command line without a file starts from, and a line that says which: the recipe of the
    attack it names (``DEFAULT_ATTACK`` when none) for the dataset it names (digits when none), or, where the
    attack has no recipe for that dataset, the attack's own defaults. ``key`` names another recipe of the attack
    (an error when it has none)."""
    attack = (given.get("attack") or {}).get("name") or DEFAULT_ATTACK
    dataset = (given.get("data") or {}).get("name") or "digits"
    if attack not in ATTACKS:  # the config's validation names the allowed attacks
        return {"attack": {"name": attack}}, ""
    if key is not None:
        return require_recipe(attack, key), f"the {attack} recipe {key!r} (`cleanbackdoor describe {attack}`)"
    found = recipe(attack, dataset)
    if found is None:
        have = ", ".join(sorted(ATTACKS[attack].recipes)) or "none"
        return {"attack": {"name": attack}}, (f"{attack} has no recipe for {dataset!r} (it has: {have}): the "
                                             "attack's defaults")
    note = f"the {attack} recipe for {dataset} (`cleanbackdoor describe {attack}`)"
    if found["data"]["name"] != dataset:
        note += f": it runs on {found['data']['name']}, the multi-label counterpart of {dataset}"
    return found, note


def read_toml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a dict. ``extends = "other.toml"`` (a path relative to the file) starts from that file:
    its tables are merged key by key with this file's, and this file's values win; a table that names another
    component (another ``name``: an attack, a model) replaces the parent's instead."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"config file {path} extends itself (through {' -> '.join(p.name for p in _seen)})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"config file {path}: extends takes the path of another config file")
    if parent.startswith("recipe:"):  # an attack's recipe: "recipe:flip/digits"
        attack, _, key = parent.removeprefix("recipe:").partition("/")
        if not key:
            raise ConfigError(f"config file {path}: extends = 'recipe:ATTACK/DATASET', got {parent!r}")
        try:
            return merge_configs(require_recipe(attack, key), raw)
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from None
    return merge_configs(read_toml(path.parent / parent, (*_seen, path.resolve())), raw)


def merge_configs(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, table by table; a table that names another component (``name``) or another
    training preset (``preset``) replaces the base's: its other keys were written for that one."""
    out = dict(base)
    for key, value in over.items():
        base_value = out.get(key)
        same = isinstance(value, dict) and isinstance(base_value, dict) and all(
            value.get(k, base_value.get(k)) == base_value.get(k) for k in ("name", "preset"))
        out[key] = merge_configs(base_value, value) if same else value
    return out


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig(**raw)
    except ValidationError as e:
        raise ConfigError(f"config: {format_validation_error(e)}") from None


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML literal (number, bool, string, array, inline table) or else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {p!r} is not a table")
        node = child
    node[parts[-1]] = value


# -- TOML output ---------------------------------------------------------------------------------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def dump_toml(data: dict[str, Any]) -> str:
    """Write a nested dict as TOML (None values are left out: TOML has no null)."""
    lines: list[str] = []

    def table(d: dict[str, Any], prefix: str) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and v is not None}
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        if prefix and (scalars or not tables):
            lines.append(f"\n[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in tables.items():
            table(v, f"{prefix}.{_toml_key(k)}" if prefix else _toml_key(k))

    table(data, "")
    return "\n".join(lines).lstrip("\n") + "\n"


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
