"""Components built from validated parameters: the base class of attacks and defenses (:class:`Configured`), the
help their docstrings and signatures are made from, and the one-line form of a validation error. Nothing here
imports PyTorch or any layer of the toolkit above the error types, so that every layer can use it."""

from __future__ import annotations

import inspect
import sys
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from cleanbackdoor.errors import ConfigError


class Configured:
    """A named component whose ``Params`` (a pydantic model) are validated when it is built: unknown keys and
    out-of-range values become one ConfigError naming the component (``{role} {name!r}: ...``), then
    :meth:`_check_params` checks what field constraints cannot. Attacks and defenses share it."""

    role: ClassVar[str] = "component"
    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Params" in cls.__dict__ or "name" in cls.__dict__:
            cls.__signature__ = params_signature(cls.Params)
            own = cls.__dict__.get("__doc__") or doc_summary(sys.modules[cls.__module__].__doc__)
            cls.__doc__ = own.rstrip() + "\n\n" + params_doc(cls.Params)

    def __init__(self, params: BaseModel | dict | None = None, **kwargs: Any) -> None:
        if isinstance(params, BaseModel):
            params = params.model_dump()
        merged = {**(params or {}), **kwargs}
        merged.pop("name", None)
        try:
            self.params = self.Params(**merged)
        except ValidationError as e:
            raise ConfigError(f"{self.role} {self.name!r}: {format_validation_error(e)}") from None
        self._check_params()

    def _check_params(self) -> None:
        """Checks across parameters that pydantic's field constraints cannot express."""


def doc_summary(doc: str | None) -> str:
    """A module docstring's first paragraph (a class without its own docstring takes it: it names the paper)."""
    return (doc or "").strip().split("\n\n")[0]


def field_default(info: Any, missing: Any = None) -> Any:
    """A pydantic field's default (its factory called), or ``missing`` for a required field."""
    if info.default_factory is not None:
        return info.default_factory()
    return missing if info.default is PydanticUndefined else info.default


def params_signature(params: type[BaseModel]) -> inspect.Signature:
    """The constructor's signature as help() and IDEs show it: ``params`` (a dict or the Params model), then every
    parameter as a keyword with its type and default."""
    keywords = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=field_default(info),
                                  annotation=info.annotation)
                for name, info in params.model_fields.items()]
    first = inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                              annotation=f"{params.__name__} | dict | None")
    return inspect.Signature([first, *keywords])


def type_name(t: Any) -> str:
    """A type annotation as a reader writes it: ``int | 'all' | None`` rather than ``Union[...]``."""
    origin, args = get_origin(t), get_args(t)
    if origin is Annotated:
        return type_name(args[0])
    if origin in (Union, UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if t is type(None):
        return "None"
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return t.__name__ if isinstance(t, type) else str(t).replace("typing.", "")


def params_doc(params: type[BaseModel]) -> str:
    """One line per parameter: name, type, default and description (``Field(description=...)``)."""
    lines = [f"Parameters ({params.__name__}, keywords or a dict; unknown keys are errors):"]
    for name, info in params.model_fields.items():
        kind = type_name(info.annotation)
        lines.append(f"    {name} ({kind}, default {field_default(info)!r}): {info.description or ''}".rstrip(": "))
    return "\n".join(lines)


def format_validation_error(e: ValidationError) -> str:
    """One line from pydantic's error: the field path and the message."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    msg = err.get("msg", str(e))
    if err.get("type") == "extra_forbidden":
        msg = "unknown key"
    return f"{loc}: {msg}" if loc else msg
