"""Settings: a TOML file (path in ``GATEWAY_CONFIG``) with environment overrides.

Loaded and validated once at start-up so that a bad config stops the service with one clear line
instead of failing the first request. Only the standard library is imported here, because the
gunicorn master loads this module before the workers monkey-patch the network stack.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from app.translate.dialect import DIALECTS, Dialect

DEFAULT_UPSTREAM_URL = "http://127.0.0.1:8000/v1"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A configuration problem, worded for the operator (names the key and what is wrong)."""


@dataclass(frozen=True)
class Upstream:
    url: str = DEFAULT_UPSTREAM_URL
    api_key: str = field(default="", repr=False)
    model: str = ""
    connect_timeout: float = 5.0
    read_timeout: float = 600.0
    pool_size: int = 0
    trust_env: bool = False
    dialect: Dialect = field(default_factory=Dialect)


@dataclass(frozen=True)
class Settings:
    upstream: Upstream = field(default_factory=Upstream)
    models: Mapping[str, str] = field(default_factory=dict)
    max_body_bytes: int = 32 * 1024 * 1024
    log_level: str = "info"

    def backend_model(self, requested: str) -> str:
        """The backend's name for the model the client asked for."""
        return self.models.get(requested) or self.upstream.model or requested


# Environment variable -> (section, key). Sections are the TOML tables; "" is the top level.
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "GATEWAY_UPSTREAM_URL": ("upstream", "url"),
    "GATEWAY_UPSTREAM_API_KEY": ("upstream", "api_key"),
    "GATEWAY_UPSTREAM_MODEL": ("upstream", "model"),
    "GATEWAY_UPSTREAM_DIALECT": ("upstream", "dialect"),
    "GATEWAY_CONNECT_TIMEOUT": ("upstream", "connect_timeout"),
    "GATEWAY_READ_TIMEOUT": ("upstream", "read_timeout"),
    "GATEWAY_MAX_BODY_BYTES": ("", "max_body_bytes"),
    "GATEWAY_LOG_LEVEL": ("", "log_level"),
}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file named by ``GATEWAY_CONFIG`` (if any), apply env overrides, validate."""
    env = os.environ if environ is None else environ
    raw = _read_toml(env.get("GATEWAY_CONFIG", ""))
    _check_tables(raw)
    for var, (section, key) in ENV_OVERRIDES.items():
        if env.get(var, "") != "":
            target = raw.setdefault(section, {}) if section else raw
            target[key] = env[var]
    return build_settings(raw, env)


def _check_tables(raw: Mapping[str, Any]) -> None:
    for key in ("upstream", "models"):
        if key in raw and not isinstance(raw[key], dict):
            raise ConfigError(f"{key}: must be a table")


def _read_toml(path: str) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"GATEWAY_CONFIG={path}: cannot read file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"GATEWAY_CONFIG={path}: invalid TOML ({exc})") from None


def build_settings(raw: Mapping[str, Any], env: Mapping[str, str]) -> Settings:
    """Validate a parsed config mapping; every error names the offending key."""
    known = {"upstream", "models", "max_body_bytes", "log_level"}
    _reject_unknown("", raw, known)
    _check_tables(raw)
    upstream = _build_upstream(dict(raw.get("upstream", {})), env)
    models = raw.get("models", {})
    if not isinstance(models, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in models.items()
    ):
        raise ConfigError("models: must be a table of client model name = backend model name")
    settings = Settings(
        upstream=upstream,
        models=dict(models),
        max_body_bytes=_number("max_body_bytes", raw.get("max_body_bytes", 32 << 20), int, 1024),
        log_level=str(raw.get("log_level", "info")).lower(),
    )
    if settings.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level: must be one of {', '.join(LOG_LEVELS)}")
    return settings


def _build_upstream(raw: dict[str, Any], env: Mapping[str, str]) -> Upstream:
    defaults = Upstream()
    _reject_unknown(
        "upstream.",
        raw,
        {f.name for f in fields(Upstream)} | {"api_key_env", "quirks"},
    )
    url = str(raw.get("url", defaults.url)).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"upstream.url: must start with http:// or https:// (got {url!r})")
    api_key = str(raw.get("api_key", ""))
    if not api_key and raw.get("api_key_env"):
        api_key = env.get(str(raw["api_key_env"]), "")
        if not api_key:
            raise ConfigError(
                f"upstream.api_key_env: environment variable {raw['api_key_env']} is empty"
            )
    return Upstream(
        url=url,
        api_key=api_key,
        model=str(raw.get("model", "")),
        connect_timeout=_number(
            "upstream.connect_timeout", raw.get("connect_timeout", 5.0), float, 0.01
        ),
        read_timeout=_number("upstream.read_timeout", raw.get("read_timeout", 600.0), float, 0.01),
        pool_size=_number("upstream.pool_size", raw.get("pool_size", 0), int, 0),
        trust_env=_boolean("upstream.trust_env", raw.get("trust_env", False)),
        dialect=_build_dialect(raw.get("dialect", "generic"), raw.get("quirks", {})),
    )


def _build_dialect(name: Any, quirks: Any) -> Dialect:
    if not isinstance(name, str) or name not in DIALECTS:
        raise ConfigError(
            f"upstream.dialect: unknown dialect {name!r}; one of {', '.join(DIALECTS)}"
        )
    if not isinstance(quirks, dict):
        raise ConfigError("upstream.quirks: must be a table")
    base = DIALECTS[name]
    allowed = {f.name for f in fields(Dialect)}
    changes: dict[str, Any] = {}
    for key, value in quirks.items():
        if key not in allowed or key == "name":
            raise ConfigError(
                f"upstream.quirks.{key}: unknown setting; one of {', '.join(sorted(allowed))}"
            )
        current = getattr(base, key)
        if isinstance(current, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"upstream.quirks.{key}: must be a list of strings")
            changes[key] = tuple(value)
        elif isinstance(current, bool):
            changes[key] = _boolean(f"upstream.quirks.{key}", value)
        elif isinstance(current, int):
            changes[key] = _number(f"upstream.quirks.{key}", value, int, 0)
        elif not isinstance(value, str):
            raise ConfigError(f"upstream.quirks.{key}: must be a string")
        else:
            changes[key] = value
    try:
        return replace(base, **changes)
    except ValueError as exc:
        raise ConfigError(f"upstream.quirks.{exc}") from None


def _reject_unknown(prefix: str, raw: Mapping[str, Any], known: set[str]) -> None:
    for key in raw:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown setting; known: {', '.join(sorted(known))}")


def _number(key: str, value: Any, kind: type, minimum: float) -> Any:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: must be a number, not a boolean")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: must be a number (got {value!r})") from None
    if not math.isfinite(number) or number < minimum:
        raise ConfigError(f"{key}: must be at least {minimum} (got {number})")
    return number


def _boolean(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}: must be true or false (got {value!r})")
