"""What every config section is made of: the field helper whose metadata the flag generator reads, the error every
validation raises, and the one rule most sections share (a positive number)."""
from __future__ import annotations

from dataclasses import field
from typing import Any, Optional


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the flag and the rule."""


def opt(default: Any = None, help: str = "", *, choices: Optional[tuple] = None, flag: Optional[str] = None,
        negate: bool = False, nargs: Optional[str] = None):
    """A config field with the metadata the flag generator reads.

    ``flag`` overrides the generated flag name; ``negate`` makes a True-default bool a ``--disable-x`` switch.
    """
    meta = {"help": help, "choices": choices, "flag": flag, "negate": negate, "nargs": nargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def positive(value, flag: str) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{flag} must be positive, got {value}")


def positive_if_set(pairs) -> None:
    """``positive`` for each (value, flag) whose value is not None (an option left unset)."""
    for value, flag in pairs:
        if value is not None:
            positive(value, flag)
