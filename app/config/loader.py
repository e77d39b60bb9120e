"""Settings from a TOML file (path in ``GATEWAY_CONFIG``) with environment overrides, read
by walking the declarations in app/config/schema.py.

Loaded and validated once at start-up so that a bad config stops the service with one clear line
instead of failing the first request. Each table is read the same way: unknown keys refused,
each declared setting parsed by its type (or its check) when present, its default otherwise.
What ties tables together (backends, routes and their targets, client keys and their limits, the
state engine) is in the small functions below.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from functools import cache
from typing import Any, TypeVar, get_type_hints

from app.config import checks, values
from app.config.schema import (
    API_KEYS_ENV,
    DEFAULT_BACKEND,
    ENV_OVERRIDES,
    KEY_NOTES,
    LISTS,
    TABLES,
    ClientKey,
    Limits,
    Route,
    Settings,
    StateSettings,
    Target,
    Upstream,
    table_keys,
    top_level_keys,
)
from app.config.setting import (
    NO_DEFAULT,
    ConfigError,
    Place,
    Setting,
    Table,
    declared,
    default_of,
    default_value,
    known_keys,
    sections,
)

D = TypeVar("D")
# Where the route for unmatched names is named ("routing.default"), as Settings declares it.
DEFAULT_ROUTE_KEY = next(
    place.path
    for field, meta in sections(Settings)
    if field.name == "default_route"
    for place in meta.places
)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file named by ``GATEWAY_CONFIG`` (if any), apply env overrides, validate."""
    env = os.environ if environ is None else environ
    return build_settings(read_raw(env), env)


def read_raw(env: Mapping[str, str]) -> dict[str, Any]:
    """The config as plain data: the TOML file with the environment overrides applied."""
    raw = _read_toml(env.get("GATEWAY_CONFIG", ""))
    _check_layout(raw)
    for var, (section, key) in ENV_OVERRIDES.items():
        if env.get(var, "") != "":
            target = raw.setdefault(section, {}) if section else raw
            target[key] = env[var]
    if env.get(API_KEYS_ENV, "").strip():
        raw.setdefault("auth", {})["keys"] = _keys_from_env(env[API_KEYS_ENV])
    elif isinstance(raw.get("auth"), dict) and raw["auth"].get("keys_file"):
        raw["auth"]["keys"] = [*raw["auth"].get("keys", []), *read_keys_file(raw["auth"])]
    return raw


def read_keys_file(auth: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``[[keys]]`` of the file ``auth.keys_file`` names (app/keys.py writes it): read
    with the config, so a reload (HUP) takes the keys added or revoked since."""
    path = str(auth["keys_file"])
    if not os.path.exists(path):
        return []  # no key created yet
    try:
        with open(path, "rb") as fh:
            keys = tomllib.load(fh).get("keys", [])
    except OSError as exc:
        raise ConfigError(f"auth.keys_file: cannot read {path} ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"auth.keys_file: {path} is not valid TOML ({exc})") from None
    if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
        raise ConfigError(f"auth.keys_file: {path} must hold [[keys]] tables")
    return keys


def _keys_from_env(value: str) -> list[dict[str, str]]:
    """``GATEWAY_API_KEYS``: ``name:sha256,name:sha256``; checked further by build_settings.

    Errors never repeat the entry: a plaintext key pasted by mistake must not reach the log.
    """
    entries = []
    for number, item in enumerate(value.split(","), 1):
        name, colon, digest = item.strip().partition(":")
        if not colon:
            raise ConfigError(f"{API_KEYS_ENV}: entry {number} is not name:sha256")
        entries.append({"name": name.strip(), "sha256": digest.strip()})
    return entries


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


def _check_layout(raw: Mapping[str, Any]) -> None:
    for key in TABLES:
        if key in raw and not isinstance(raw[key], dict):
            raise ConfigError(f"{key}: must be a table")
    for key in LISTS:
        if key in raw and not (
            isinstance(raw[key], list) and all(isinstance(x, dict) for x in raw[key])
        ):
            raise ConfigError(f"{key}: must be an array of tables ([[{key}]])")


def build_settings(raw: Mapping[str, Any], env: Mapping[str, str]) -> Settings:
    """Validate a parsed config mapping; every error names the offending key."""
    _reject_unknown(Table(raw, "", env), top_level_keys())
    _check_layout(raw)
    backends = _backends(raw, env)
    models = _models(raw.get("models", {}), backends)
    routes = _routes(raw.get("routes", []), models, backends, env)
    return Settings(
        backends=backends,
        routes=routes,
        default_route=_default_route(raw, routes, backends, env),
        models=models,
        keys=_keys(raw, env),
        **_single_tables(raw, env),
        **_top_level(raw, env),
    )


def _single_tables(raw: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Each section of Settings that is one table of its own with a schema ([routing],
    [state], [threads], [translate]...), read as its schema declares: a new one needs no
    line here."""
    found: dict[str, Any] = {}
    for field, meta in sections(Settings):
        match meta.places:
            case (Place(kind="table", schema=type() as schema, path=path),):
                table = _table(raw, path, env)
                found[field.name] = (
                    _state(table) if schema is StateSettings else read(schema, table)
                )
    return found


# --- the generic reader ------------------------------------------------------------------------


def read(cls: type[D], table: Table, base: D | None = None, /, **given: Any) -> D:
    """A ``cls`` from ``table``: each setting as the table gives it, else as ``base`` has it,
    else its default; ``given`` settles some beforehand."""
    found = dict(given)
    for field, meta in declared(cls):
        if field.name not in found and not meta.table:
            fallback = getattr(base, field.name) if base is not None else default_of(field)
            found[field.name] = _read_one(cls, field.name, meta, table, fallback)
    return cls(**found)


def _read_one(cls: type, name: str, meta: Setting, table: Table, fallback: Any) -> Any:
    if meta.inline:
        return read(type(fallback), table, fallback)
    key = meta.toml_key(name)
    if meta.reader is not None:
        return meta.reader(table, key, fallback)
    if meta.secret:
        return _secret(table, key, fallback)
    if key not in table.values:
        if fallback is NO_DEFAULT:
            raise ConfigError(f"{table.key(key)}: required")
        return fallback
    value = table.values[key]
    if meta.check is not None:
        return meta.check(table.key(key), value)
    return values.parse(table.key(key), value, _types(cls)[name], meta.minimum)


@cache
def _types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _secret(table: Table, key: str, fallback: Any) -> str:
    """``key`` inline, or ``key_env``: the name of an environment variable holding it."""
    value = table.values.get(key, "")
    if not isinstance(value, str):
        raise ConfigError(f"{table.key(key)}: must be a string")
    variable = table.values.get(f"{key}_env")
    if not value and variable:
        value = table.env.get(str(variable), "")
        if not value:
            raise ConfigError(f"{table.key(key)}_env: environment variable {variable} is empty")
    return value or str(fallback)


def _table(raw: Mapping[str, Any], path: str, env: Mapping[str, str]) -> Table:
    """The top-level table ``path`` (empty if absent), its unknown keys refused."""
    table = Table(raw.get(path, {}), path, env)
    known = table_keys(path)
    if known is not None:
        _reject_unknown(table, known)
    return table


def _reject_unknown(table: Table, known: frozenset[str]) -> None:
    for key in table.values:
        if key not in known:
            raise ConfigError(
                f"{table.key(key)}: unknown setting; known: {', '.join(sorted(known))}"
            )


def _top_level(raw: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Settings' own settings: at the top of the file, or in a table of their own ([admin])."""
    found: dict[str, Any] = {}
    for field, meta in declared(Settings):
        table = _table(raw, meta.table, env) if meta.table else Table(raw, "", env)
        found[field.name] = _read_one(Settings, field.name, meta, table, default_of(field))
    return found


# --- what ties tables together -----------------------------------------------------------------


def _backends(raw: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Upstream]:
    backends: dict[str, Upstream] = {}
    declared_backends = raw.get("backends", [])
    if "upstream" in raw or not declared_backends:
        upstream = _table(raw, "upstream", env)
        backends[DEFAULT_BACKEND] = _upstream(upstream, name=DEFAULT_BACKEND)
    for i, entry in enumerate(declared_backends):
        table = Table(entry, f"backends.{i}", env)
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{table.key('name')}: required, a non-empty string")
        if name in backends:
            raise ConfigError(f"{table.key('name')}: {name!r} is declared twice")
        if "model" in entry:
            raise ConfigError(f"{table.key('model')}: set models on routes, not on backends")
        backends[name] = _upstream(table, name=name)
    return backends


def _upstream(table: Table, name: str) -> Upstream:
    _reject_unknown(table, known_keys(Upstream))
    if table.values.get("client_key") and not table.values.get("client_cert"):
        raise ConfigError(f"{table.key('client_key')}: given without client_cert")
    return read(Upstream, table, name=name)


def _models(models: Any, backends: Mapping[str, Upstream]) -> dict[str, str]:
    if not isinstance(models, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in models.items()
    ):
        raise ConfigError("models: must be a table of client model name = backend model name")
    if models and DEFAULT_BACKEND not in backends:
        raise ConfigError("models: aliases map to the default backend; add an [upstream] table")
    return dict(models)


def _routes(
    entries: list[dict[str, Any]],
    models: Mapping[str, str],
    backends: Mapping[str, Upstream],
    env: Mapping[str, str],
) -> tuple[Route, ...]:
    routes = [
        Route(alias, (alias,), (Target(DEFAULT_BACKEND, backend_model),))
        for alias, backend_model in models.items()
    ]
    for i, entry in enumerate(entries):
        routes.append(_route(Table(entry, f"routes.{i}", env), backends))
    return tuple(routes)


def _route(table: Table, backends: Mapping[str, Upstream]) -> Route:
    _reject_unknown(table, known_keys(Route))
    entry = table.values
    match = entry.get("match")
    patterns = [match] if isinstance(match, str) else match
    if (
        not isinstance(patterns, list)
        or not patterns
        or not all(isinstance(p, str) and p for p in patterns)
    ):
        raise ConfigError(f"{table.key('match')}: a model name or glob, or a list of them")
    raw_targets = entry.get("targets")
    if raw_targets is None:
        raw_targets = [{k: entry[k] for k in ("backend", "model") if k in entry}]
    elif "backend" in entry or "model" in entry:
        raise ConfigError(f"{table.where}: give either targets or backend/model, not both")
    if not isinstance(raw_targets, list) or not raw_targets:
        raise ConfigError(
            f"{table.key('targets')}: a non-empty array of {{backend, model, weight}}"
        )
    targets = tuple(
        _target(Table(t, table.key(f"targets.{j}"), table.env), backends)
        for j, t in enumerate(raw_targets)
    )
    name = str(entry.get("name") or table.where)
    return read(Route, table, name=name, match=tuple(patterns), targets=targets)


def _target(table: Table, backends: Mapping[str, Upstream]) -> Target:
    if not isinstance(table.values, dict):
        raise ConfigError(f"{table.where}: must be a table {{backend, model, weight}}")
    _reject_unknown(table, known_keys(Target))
    backend = table.values.get("backend")
    if backend not in backends:
        known = ", ".join(backends)
        raise ConfigError(
            f"{table.key('backend')}: no backend named {backend!r} (backends: {known})"
        )
    return read(Target, table)


def _default_route(
    raw: Mapping[str, Any],
    routes: tuple[Route, ...],
    backends: Mapping[str, Upstream],
    env: Mapping[str, str],
) -> Route | None:
    """The route for model names nothing matches: named in [routing], else the default backend."""
    path, _, key = DEFAULT_ROUTE_KEY.rpartition(".")
    name = _table(raw, path, env).values.get(key)
    if name is not None:
        for route in routes:
            if route.name == name:
                return route
        known = ", ".join(r.name for r in routes) or "none"
        raise ConfigError(f"{DEFAULT_ROUTE_KEY}: no route named {name!r} (routes: {known})")
    if DEFAULT_BACKEND in backends:
        target = Target(DEFAULT_BACKEND, backends[DEFAULT_BACKEND].model)
        return Route(DEFAULT_BACKEND, (), (target,))
    return None


def _keys(raw: Mapping[str, Any], env: Mapping[str, str]) -> tuple[ClientKey, ...]:
    """``[[auth.keys]]``, each with the ``[limits]`` defaults unless it sets its own."""
    entries = _table(raw, "auth", env).values.get("keys", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError("auth.keys: must be an array of tables ([[auth.keys]])")
    limits = _table(raw, "limits", env)
    if limits.values and not entries:
        raise ConfigError("limits: limits apply per client key; add [[auth.keys]]")
    default = read(Limits, limits)
    keys: list[ClientKey] = []
    for i, entry in enumerate(entries):
        key = _key(Table(entry, f"auth.keys.{i}", env), default)
        for j, other in enumerate(keys):
            if other.name == key.name:
                raise ConfigError(f"auth.keys.{i}.name: {key.name!r} is declared twice")
            if other.sha256 == key.sha256:
                raise ConfigError(
                    f"auth.keys.{i}: key {key.name!r} is the same key as auth.keys.{j} "
                    f"({other.name!r})"
                )
        keys.append(key)
    return tuple(keys)


def _key(table: Table, limits: Limits) -> ClientKey:
    name = checks.key_name(table.key("name"), table.values.get("name"))
    try:
        if "key" in table.values or "api_key" in table.values:
            raise ConfigError(
                f"{table.where}: plaintext keys are not accepted; give sha256 (python -m "
                "app.keys create makes a key and its line) or key_env"
            )
        _reject_unknown(table, known_keys(ClientKey) | set(KEY_NOTES))
        limits = read(Limits, table, limits)
        return read(ClientKey, table, name=name, limits=limits)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (key {name!r})") from None


def _state(table: Table) -> StateSettings:
    """The engine is Redis when a Redis URL is given and no engine named; the directory is
    systemd's StateDirectory when the file names none."""
    given: dict[str, Any] = {}
    if not table.values.get("directory"):
        given["directory"] = table.env.get("STATE_DIRECTORY") or default_value(
            StateSettings, "directory"
        )
    state = read(StateSettings, table, **given)
    if "engine" not in table.values and state.redis_url:
        state = dataclasses.replace(state, engine="redis")
    if state.engine == "redis":
        checks.redis_url(table.key("redis_url"), state.redis_url)
    return state
