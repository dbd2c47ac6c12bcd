"""Errors a user can act on.

Every problem caused by the user's input (a config typo, a class that does not exist, a budget larger than the
data, a corrupt file) is raised as a :class:`CleanBackdoorError` subclass with one sentence that names the problem
and, where there is a closed set of choices, what is allowed. The CLI prints that sentence and exits with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class CleanBackdoorError(Exception):
    """Base class of the errors caused by user input."""


class ConfigError(CleanBackdoorError, ValueError):
    """A configuration value is unknown, missing or out of range."""


class DataError(CleanBackdoorError, ValueError):
    """A dataset file or folder is missing, corrupt, or not in the expected format."""


class BudgetError(ConfigError):
    """An attack was asked to change more examples than it can."""


def unknown_name(kind: str, name: str, allowed: Iterable[str]) -> ConfigError:
    """The error for a name that is not in a registry: says what was asked and what exists."""
    choices = ", ".join(sorted(allowed))
    return ConfigError(f"unknown {kind} {name!r}; allowed: {choices}")
