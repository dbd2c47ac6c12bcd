"""``cleanbackdoor describe NAME``: what an attack, defense, trigger or model is and which parameters it takes.

Each component documents its parameters where they are declared, so the description cannot drift from the code:
attacks and defenses in their pydantic ``Params`` (``Field(description=...)``), triggers in their dataclass fields
(``field(metadata={"description": ...})``), models in a ``param_help`` dict beside their constructor. This module
only reads them: :func:`parameters` gives one :class:`Param` per parameter of any registered component and
:func:`describe` renders a component as text (kind, paper or summary, parameters, recipes).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import textwrap
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from cleanbackdoor.attacks import ATTACKS
from cleanbackdoor.components import doc_summary, field_default, type_name
from cleanbackdoor.defenses import DEFENSES
from cleanbackdoor.errors import unknown_name
from cleanbackdoor.models import MODELS
from cleanbackdoor.triggers import TRIGGERS

WIDTH = 118
_NO_DEFAULT = object()


@dataclass(frozen=True)
class Param:
    """One parameter: its name, type (as text), default (``required`` when there is none) and description."""

    name: str
    type: str
    default: Any
    description: str

    @property
    def required(self) -> bool:
        return self.default is _NO_DEFAULT


def registries() -> dict[str, dict[str, Any]]:
    """Kind -> registry (name -> class or builder), in the order :func:`describe` searches them."""
    return {"attack": ATTACKS, "defense": DEFENSES, "trigger": TRIGGERS, "model": MODELS}


def _pydantic_params(model: type[BaseModel]) -> list[Param]:
    return [Param(name, type_name(info.annotation), field_default(info, _NO_DEFAULT), info.description or "")
            for name, info in model.model_fields.items()]


def _dataclass_params(cls: type) -> list[Param]:
    out = []
    for f in dataclasses.fields(cls):
        if f.name in ("image_shape", "seed"):  # given by the experiment, not by the user
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = _NO_DEFAULT
        kind = f.type if isinstance(f.type, str) else type_name(f.type)  # a string under postponed annotations
        out.append(Param(f.name, kind, default, f.metadata.get("description", "")))
    return out


def _builder_target(builder: Any) -> tuple[Any, dict[str, Any]]:
    """A model builder's class and the keywords the registry fixes (``functools.partial(CifarResNet, depth=20)``)."""
    fixed: dict[str, Any] = {}
    while isinstance(builder, functools.partial):
        fixed = {**builder.keywords, **fixed}
        builder = builder.func
    return builder, fixed


def _signature_params(builder: Any) -> list[Param]:
    target, fixed = _builder_target(builder)
    help_ = getattr(target, "param_help", {}) or {}
    out = []
    for name, p in inspect.signature(target).parameters.items():
        if name in ("self", "in_channels", "image_size") or name in fixed:
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        kind = p.annotation if isinstance(p.annotation, str) else type_name(p.annotation)
        default = _NO_DEFAULT if p.default is p.empty else p.default
        out.append(Param(name, kind, default, help_.get(name, "")))
    return out


def parameters(component: Any) -> list[Param]:
    """The parameters of a registered attack or defense class, trigger class or model builder."""
    params = getattr(component, "Params", None)
    if isinstance(params, type) and issubclass(params, BaseModel):
        return _pydantic_params(params)
    if isinstance(component, type) and dataclasses.is_dataclass(component):
        return _dataclass_params(component)
    return _signature_params(component)


def find(name: str) -> tuple[str, Any]:
    """(kind, component) for a registered name; a ConfigError listing every name otherwise."""
    regs = registries()
    for kind, registry in regs.items():
        if name in registry:
            return kind, registry[name]
    every = [n for registry in regs.values() for n in registry]
    raise unknown_name("attack, defense, trigger or model", name, every)


def summary(component: Any) -> str:
    """A component's own docstring's first paragraph (it names the paper), else its module's."""
    target, _ = _builder_target(component)
    own = vars(target).get("__doc__") if isinstance(target, type) else None
    first = inspect.cleandoc(own).split("\n\n")[0] if own else doc_summary(sys.modules[target.__module__].__doc__)
    return " ".join(first.split())


def _flatten(tree: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "trigger" and key != "pretrained":
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={_toml(value)}")
    return out


def _toml(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _param_line(p: Param, width: int) -> list[str]:
    default = "required" if p.required else f"default {_toml(p.default) if p.default is not None else 'none'}"
    head = f"  {p.name:{width}}  {p.type}, {default}"
    body = p.description or "(no description)"
    return textwrap.wrap(f"{head}: {body}", WIDTH, subsequent_indent=" " * (width + 4))


def describe(name: str) -> str:
    """The text ``cleanbackdoor describe NAME`` prints."""
    kind, component = find(name)
    lines = [f"{name} ({kind})"]
    lines += textwrap.wrap(summary(component), WIDTH, initial_indent="  ", subsequent_indent="  ")
    params = parameters(component)
    lines.append("")
    if kind == "model":
        _, fixed = _builder_target(component)
        fixed_text = ", ".join(f"{k}={_toml(v)}" for k, v in fixed.items())
        lines.append(f"options (model.options{'; fixed here: ' + fixed_text if fixed_text else ''}):")
    elif kind == "trigger":
        lines.append("parameters (e.g. attack.trigger = {name = \"%s\", ...}):" % name)
    elif kind == "defense":
        lines.append(f'parameters (defenses = [{{name = "{name}", NAME = VALUE}}] in a config):')
    else:
        lines.append("parameters (attack.NAME in a config, --set attack.NAME=VALUE on the command line):")
    width = max((len(p.name) for p in params), default=0)
    for p in params:
        lines += _param_line(p, width)
    if not params:
        lines.append("  (none)")
    recipes = getattr(component, "recipes", None)
    if kind == "attack" and recipes:
        lines += ["", f"recipes (cleanbackdoor run --attack {name} --recipe KEY; without --recipe, the dataset's):"]
        for key, tree in recipes.items():
            lines += textwrap.wrap(f"{key}: " + " ".join(_flatten(tree)), WIDTH, initial_indent="  ",
                                   subsequent_indent="      ")
    return "\n".join(lines)
