"""What every config section is made of: the field helper whose metadata the flag generator reads, the error every
validation raises, and the one rule most sections share (a positive number)."""
from __future__ import annotations

from dataclasses import field
from typing import Any, Callable, List, Optional


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


def parse_layer_pattern(text: str, num_layers: int, flag: str, every: Callable[[int, int], bool],
                        example: str = "") -> List[bool]:
    """One bool per layer from Megatron's pattern syntax: an integer N (``every(layer, N)`` says which layers it
    picks) or one 0/1 per layer, ``'[0,1,1]'``, ``'0 1 1'``, or a repeated list ``'[1,0]*3'``."""
    text = str(text).strip()
    if text.isdigit():
        n = int(text)
        if n < 1:
            raise ConfigError(f"{flag} {text}: an integer must be at least 1")
        return [every(i, n) for i in range(num_layers)]
    body, times = text, 1
    if "]*" in text:
        body, count = text.rsplit("*", 1)
        times = int(count) if count.strip().isdigit() else 0
    items = body.strip().strip("[]").replace(",", " ").split() * times
    if times < 1 or any(i not in ("0", "1") for i in items) or len(items) != num_layers:
        raise ConfigError(f"{flag} {text!r}: give an integer N or one 0/1 per layer ({num_layers} layers){example}")
    return [i == "1" for i in items]

