"""The plain kinds of setting value, each checked the same way wherever it is declared: a
TOML value or an environment variable's text in, the typed value out, or a ConfigError that
names the key."""

from __future__ import annotations

import math
from typing import Any, Literal, get_args, get_origin

from app.config.setting import ConfigError

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def parse(key: str, value: Any, kind: Any, minimum: float) -> Any:
    """``value`` as a ``kind`` (bool, int, float, str or a Literal of strings)."""
    if kind is bool:
        return boolean(key, value)
    if kind is int:
        return integer(key, value, int(minimum))
    if kind is float:
        return number(key, value, minimum)
    if kind is str:
        return text(key, value)
    if get_origin(kind) is Literal:
        return choice(key, value, get_args(kind))
    raise TypeError(f"{key}: a {kind!r} setting needs a check of its own")


def boolean(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in TRUE:
        return True
    if word in FALSE:
        return False
    raise ConfigError(f"{key}: must be true or false (got {value!r})")


def integer(key: str, value: Any, minimum: int) -> int:
    """A whole number. A float is one only when it has no fraction (TOML's ``2.0``): ``2.7``
    is not silently 2, and ``inf`` or ``nan`` are errors, not an OverflowError."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: must be a whole number, not a boolean")
    result: int
    if isinstance(value, int):
        result = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        result = int(value)
    elif isinstance(value, str) and _is_integer(value):
        result = int(value)
    else:
        raise ConfigError(f"{key}: must be a whole number (got {value!r})")
    if result < minimum:
        raise ConfigError(f"{key}: must be at least {minimum} (got {result})")
    return result


def _is_integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def number(key: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: must be a number, not a boolean")
    if not isinstance(value, int | float | str):
        raise ConfigError(f"{key}: must be a number (got {value!r})")
    try:
        result = float(value)
    except ValueError:
        raise ConfigError(f"{key}: must be a number (got {value!r})") from None
    if not math.isfinite(result):
        raise ConfigError(f"{key}: must be a finite number (got {value!r})")
    if result < minimum:
        raise ConfigError(f"{key}: must be at least {minimum:g} (got {result:g})")
    return result


def text(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a string (got {value!r})")
    return value


def choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    """One of ``choices``, whatever its case and surrounding spaces."""
    word = str(value).strip().lower()
    if word not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(choices)} (got {value!r})")
    return word
