"""Settings: a TOML file (path in ``GATEWAY_CONFIG``) with environment overrides.

Loaded and validated once at start-up so that a bad config stops the service with one clear line
instead of failing the first request. Only the standard library is imported here, because the
gunicorn master loads this module before the workers monkey-patch the network stack.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, date, datetime
from typing import Any

from app.translate.billing_header import MODES as BILLING_HEADER_MODES
from app.translate.dialect import DIALECTS, Dialect

DEFAULT_UPSTREAM_URL = "http://127.0.0.1:8000/v1"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A configuration problem, worded for the operator (names the key and what is wrong)."""


@dataclass(frozen=True)
class Upstream:
    """One backend. ``[upstream]`` is the backend named "default"; ``[[backends]]`` add more."""

    name: str = "default"
    url: str = DEFAULT_UPSTREAM_URL
    api_key: str = field(default="", repr=False)
    # [upstream] only: the backend model used when the client's name matches no alias.
    model: str = ""
    # "openai": Chat Completions, translated; "anthropic": Messages API, passed through.
    protocol: str = "openai"
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    connect_timeout: float = 5.0
    # Longest wait for the backend's first byte; also the longest gap between stream chunks
    # unless idle_timeout is set.
    read_timeout: float = 600.0
    idle_timeout: float = 0.0
    # Cap on a whole response, stream included (0: none).
    total_timeout: float = 0.0
    # Requests in flight to this backend per worker (0: no cap); beyond it, other targets.
    max_concurrency: int = 0
    pool_size: int = 0
    # Proxy settings: ``proxy`` (an http:// or https:// URL), or with ``trust_env`` the
    # environment's HTTP(S)_PROXY / NO_PROXY, read once at start.
    proxy: str = field(default="", repr=False)
    trust_env: bool = False
    # TLS: verified always; against this CA bundle (a file or directory) instead of the
    # bundled CAs, with an optional client certificate (and its key, if not in the same file).
    ca_bundle: str = ""
    client_cert: str = ""
    client_key: str = ""
    # Bounds on what the backend may send: a whole (non-streamed) body, after decompression,
    # and one line of a stream.
    max_response_bytes: int = 32 * 1024 * 1024
    max_line_bytes: int = 4 * 1024 * 1024
    dialect: Dialect = field(default_factory=Dialect)


@dataclass(frozen=True)
class Target:
    """Where a route sends a request: a backend, and the model name to ask it for."""

    backend: str
    model: str = ""  # "": the name the client asked for
    weight: float = 1.0


@dataclass(frozen=True)
class Route:
    name: str
    match: tuple[str, ...]
    targets: tuple[Target, ...]
    strategy: str = "failover"


@dataclass(frozen=True)
class Routing:
    """Retry, failover and circuit-breaker policy, shared by every route."""

    retries: int = 2
    backoff: float = 0.2
    max_backoff: float = 2.0
    max_retry_after: float = 10.0
    breaker_failures: int = 5
    breaker_cooldown: float = 30.0


@dataclass(frozen=True)
class Limits:
    """A client key's limits, for the whole service (every worker and host: app/state).

    0 means no limit. ``burst`` is how many requests may arrive at once; 0 means a minute's
    worth (``requests_per_minute`` rounded up), as with Anthropic's own limits. Token limits
    count a request's estimated input and its ``max_tokens`` when it is admitted, and its real
    usage once it is over.
    """

    requests_per_minute: float = 0.0
    burst: int = 0
    max_concurrent: int = 0
    input_tokens_per_minute: int = 0
    output_tokens_per_minute: int = 0
    tokens_per_day: int = 0
    tokens_per_month: int = 0

    @property
    def any(self) -> bool:
        return any(getattr(self, name) for name in LIMIT_FIELDS if name != "burst")


@dataclass(frozen=True)
class ClientKey:
    """A key clients may use: its name (for logs, metrics and usage), the SHA-256 of the key
    and its limits, and when it stops working (``expires``, epoch seconds; a revoked key
    stays listed, refused). The key itself is never kept, only its digest."""

    name: str
    sha256: bytes = field(repr=False)
    limits: Limits = field(default_factory=Limits)
    expires: float | None = None
    revoked: bool = False


@dataclass(frozen=True)
class StateSettings:
    """Where the shared state lives (app/state): SQLite in ``directory`` (the default, for
    every worker on one host), or Redis at ``redis_url`` (several hosts)."""

    engine: str = "sqlite"
    directory: str = "state"  # relative to the working directory; systemd sets STATE_DIRECTORY
    redis_url: str = field(default="", repr=False)
    on_failure: str = "open"  # or "closed": what requests get while the store cannot answer
    lease_seconds: float = 900.0  # how long a dead worker's concurrency slot stays taken


@dataclass(frozen=True)
class ThreadSettings:
    """Message threads (the ``thread`` field of the message-threads beta)."""

    enabled: bool = True
    ttl: float = 86400.0  # seconds a conversation is kept after its last turn
    max_bytes: int = 8 * 1024 * 1024  # a longer conversation is not kept (the SDK replays it)


@dataclass(frozen=True)
class TranslateSettings:
    """How requests are reworded for OpenAI-style backends, whichever backend it is."""

    # Claude Code's attribution line in the system prompt: "normalize" its per-request values,
    # "drop" it or "keep" it (app/translate/billing_header.py).
    billing_header: str = "normalize"


ENGINES = ("sqlite", "redis")
STRATEGIES = ("failover", "weighted", "least_busy")
PROTOCOLS = ("openai", "anthropic")


@dataclass(frozen=True)
class Settings:
    backends: Mapping[str, Upstream] = field(default_factory=lambda: {"default": Upstream()})
    routes: tuple[Route, ...] = ()
    default_route: Route | None = Route("default", (), (Target("default"),))
    routing: Routing = field(default_factory=Routing)
    models: Mapping[str, str] = field(default_factory=dict)
    max_body_bytes: int = 32 * 1024 * 1024
    log_level: str = "info"
    admin_token: str = field(default="", repr=False)
    # Seconds of backend silence after which a stream gets a ping event (0: never).
    ping_interval: float = 15.0
    # Seconds a request body may take to arrive (0: no limit); nginx normally buffers it.
    body_timeout: float = 30.0
    # Keys clients must present on /v1/ routes; none: no authentication.
    keys: tuple[ClientKey, ...] = ()
    state: StateSettings = field(default_factory=StateSettings)
    threads: ThreadSettings = field(default_factory=ThreadSettings)
    translate: TranslateSettings = field(default_factory=TranslateSettings)

    @property
    def upstream(self) -> Upstream:
        """The default backend (or the first one declared)."""
        return self.backends.get("default") or next(iter(self.backends.values()))


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
    "GATEWAY_ADMIN_TOKEN": ("admin", "token"),
    "GATEWAY_RETRIES": ("routing", "retries"),
    "GATEWAY_PING_INTERVAL": ("", "ping_interval"),
    "GATEWAY_BODY_TIMEOUT": ("", "body_timeout"),
    "GATEWAY_STATE_DIR": ("state", "directory"),
    "GATEWAY_REDIS_URL": ("state", "redis_url"),
    "GATEWAY_STATE_ON_FAILURE": ("state", "on_failure"),
    "GATEWAY_BILLING_HEADER": ("translate", "billing_header"),
}
# Fields app/keys.py writes for the operator; the gateway ignores them.
KEY_NOTES = ("created", "revoked_at")
TABLES = (
    "upstream",
    "models",
    "routing",
    "admin",
    "auth",
    "limits",
    "state",
    "threads",
    "translate",
)
LISTS = ("backends", "routes")
# Client keys without a file: comma-separated name:sha256 pairs; they replace [[auth.keys]].
API_KEYS_ENV = "GATEWAY_API_KEYS"
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
LIMIT_FIELDS = (
    "requests_per_minute",
    "burst",
    "max_concurrent",
    "input_tokens_per_minute",
    "output_tokens_per_minute",
    "tokens_per_day",
    "tokens_per_month",
)


# The last configuration the gunicorn master validated, as JSON, for its workers: a reload
# (HUP) with a broken file must not leave the service without workers.
LAST_GOOD_ENV = "GATEWAY_LAST_GOOD_CONFIG"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file named by ``GATEWAY_CONFIG`` (if any), apply env overrides, validate."""
    env = os.environ if environ is None else environ
    return build_settings(read_raw(env), env)


def load_settings_or_last_good(environ: Mapping[str, str] | None = None) -> Settings:
    """``load_settings``, falling back to the master's last validated config if the file has
    gone bad since (the master already said so in its log)."""
    env = os.environ if environ is None else environ
    try:
        return load_settings(env)
    except ConfigError:
        if not env.get(LAST_GOOD_ENV):
            raise
        return build_settings(json.loads(env[LAST_GOOD_ENV]), env)


def validate_for_master(environ: MutableMapping[str, str]) -> str | None:
    """Check the config in the gunicorn master; remember it when good, else say why.

    Returns the problem, or None. The first start with a bad config must fail; a reload with
    one keeps the last good config for the new workers.
    """
    try:
        raw = read_raw(environ)
        build_settings(raw, environ)
    except ConfigError as exc:
        return str(exc)
    environ[LAST_GOOD_ENV] = json.dumps(raw, default=str)
    return None


def read_raw(env: Mapping[str, str]) -> dict[str, Any]:
    """The config as plain data: the TOML file with the environment overrides applied."""
    raw = _read_toml(env.get("GATEWAY_CONFIG", ""))
    _check_tables(raw)
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


def _check_tables(raw: Mapping[str, Any]) -> None:
    for key in TABLES:
        if key in raw and not isinstance(raw[key], dict):
            raise ConfigError(f"{key}: must be a table")
    for key in LISTS:
        if key in raw and not (
            isinstance(raw[key], list) and all(isinstance(x, dict) for x in raw[key])
        ):
            raise ConfigError(f"{key}: must be an array of tables ([[{key}]])")


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
    top_level = {"max_body_bytes", "log_level", "ping_interval", "body_timeout"}
    _reject_unknown("", raw, set(TABLES) | set(LISTS) | top_level)
    _check_tables(raw)
    backends = _build_backends(raw, env)
    models = raw.get("models", {})
    if not all(isinstance(k, str) and isinstance(v, str) and v for k, v in models.items()):
        raise ConfigError("models: must be a table of client model name = backend model name")
    if models and "default" not in backends:
        raise ConfigError("models: aliases map to the default backend; add an [upstream] table")
    routes = _build_routes(raw.get("routes", []), models, backends)
    settings = Settings(
        backends=backends,
        routes=routes,
        default_route=_default_route(raw.get("routing", {}), routes, backends),
        routing=_build_routing(raw.get("routing", {})),
        models=dict(models),
        max_body_bytes=_number("max_body_bytes", raw.get("max_body_bytes", 32 << 20), int, 1024),
        log_level=str(raw.get("log_level", "info")).lower(),
        admin_token=_admin_token(raw.get("admin", {}), env),
        ping_interval=_number("ping_interval", raw.get("ping_interval", 15.0), float, 0),
        body_timeout=_number("body_timeout", raw.get("body_timeout", 30.0), float, 0),
        keys=_build_keys(raw.get("auth", {}), raw.get("limits", {}), env),
        state=_build_state(raw.get("state", {}), env),
        threads=_build_threads(raw.get("threads", {})),
        translate=_build_translate(raw.get("translate", {})),
    )
    if settings.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level: must be one of {', '.join(LOG_LEVELS)}")
    return settings


def _build_state(raw: Mapping[str, Any], env: Mapping[str, str]) -> StateSettings:
    _reject_unknown("state.", raw, {f.name for f in fields(StateSettings)} | {"redis_url_env"})
    redis_url = _secret("state", raw, env, "redis_url")
    engine = str(raw.get("engine", "redis" if redis_url else "sqlite"))
    if engine not in ENGINES:
        raise ConfigError(f"state.engine: must be one of {', '.join(ENGINES)}")
    if engine == "redis" and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("state.redis_url: a redis://, rediss:// or unix:// URL is required")
    on_failure = str(raw.get("on_failure", "open"))
    if on_failure not in ("open", "closed"):
        raise ConfigError("state.on_failure: must be open or closed")
    # systemd's StateDirectory= sets STATE_DIRECTORY; otherwise ./state beside the process.
    directory = str(raw.get("directory") or env.get("STATE_DIRECTORY", "") or "state")
    return StateSettings(
        engine=engine,
        directory=directory,
        redis_url=redis_url,
        on_failure=on_failure,
        lease_seconds=_number("state.lease_seconds", raw.get("lease_seconds", 900), float, 1),
    )


def _build_threads(raw: Mapping[str, Any]) -> ThreadSettings:
    _reject_unknown("threads.", raw, {f.name for f in fields(ThreadSettings)})
    return ThreadSettings(
        enabled=_boolean("threads.enabled", raw.get("enabled", True)),
        ttl=_number("threads.ttl", raw.get("ttl", 86400), float, 1),
        max_bytes=_number("threads.max_bytes", raw.get("max_bytes", 8 << 20), int, 1024),
    )


def _build_translate(raw: Mapping[str, Any]) -> TranslateSettings:
    _reject_unknown("translate.", raw, {f.name for f in fields(TranslateSettings)})
    mode = str(raw.get("billing_header", "normalize")).strip().lower()
    if mode not in BILLING_HEADER_MODES:
        choices = ", ".join(BILLING_HEADER_MODES)
        raise ConfigError(f"translate.billing_header: must be one of {choices} (got {mode!r})")
    return TranslateSettings(billing_header=mode)


def _admin_token(raw: Mapping[str, Any], env: Mapping[str, str]) -> str:
    _reject_unknown("admin.", raw, {"token", "token_env"})
    return _secret("admin", raw, env, "token")


def _build_keys(
    auth: Mapping[str, Any], limits: Mapping[str, Any], env: Mapping[str, str]
) -> tuple[ClientKey, ...]:
    """``[[auth.keys]]``, each with the ``[limits]`` defaults unless it sets its own."""
    _reject_unknown("auth.", auth, {"keys", "keys_file"})
    entries = auth.get("keys", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError("auth.keys: must be an array of tables ([[auth.keys]])")
    _reject_unknown("limits.", limits, set(LIMIT_FIELDS))
    if limits and not entries:
        raise ConfigError("limits: limits apply per client key; add [[auth.keys]]")
    default = _build_limits("limits", limits, Limits())
    keys: list[ClientKey] = []
    for i, entry in enumerate(entries):
        key = _build_key(entry, f"auth.keys.{i}", default, env)
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


def _build_key(
    raw: Mapping[str, Any], where: str, default: Limits, env: Mapping[str, str]
) -> ClientKey:
    name = raw.get("name")
    if not isinstance(name, str) or not KEY_NAME.fullmatch(name):
        raise ConfigError(
            f"{where}.name: required; up to 64 letters, digits and . _ @ + - "
            "(it shows in logs and metrics)"
        )
    try:
        if "key" in raw or "api_key" in raw:
            raise ConfigError(
                f"{where}: plaintext keys are not accepted; give sha256 (python -m app.keys "
                "create makes a key and its line) or key_env"
            )
        known = {"name", "sha256", "key_env", "expires", "revoked", *KEY_NOTES, *LIMIT_FIELDS}
        _reject_unknown(f"{where}.", raw, known)
        return ClientKey(
            name,
            _key_digest(raw, where, env),
            _build_limits(where, raw, default),
            expires=parse_instant(f"{where}.expires", raw.get("expires")),
            revoked=_boolean(f"{where}.revoked", raw.get("revoked", False)),
        )
    except ConfigError as exc:
        raise ConfigError(f"{exc} (key {name!r})") from None


def parse_instant(key: str, value: Any) -> float | None:
    """A date or date and time (TOML's own, or ISO 8601 text), as epoch seconds (UTC when
    no zone is given); a bare date means its first second."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"{key}: must be a date like 2027-01-31 (got {value!r})") from None
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if not isinstance(value, datetime):
        raise ConfigError(f"{key}: must be a date like 2027-01-31")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def _key_digest(raw: Mapping[str, Any], where: str, env: Mapping[str, str]) -> bytes:
    """The SHA-256 of the key: given in hex, or computed from the variable ``key_env`` names."""
    if ("sha256" in raw) == ("key_env" in raw):
        raise ConfigError(f"{where}: give either sha256 or key_env")
    if "sha256" in raw:
        digest = raw["sha256"]
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise ConfigError(
                f"{where}.sha256: must be 64 hexadecimal digits (python -m app.keys hash)"
            )
        return bytes.fromhex(digest)
    variable = str(raw["key_env"])
    value = env.get(variable, "")
    if not value:
        raise ConfigError(f"{where}.key_env: environment variable {variable} is empty")
    if not (value.isascii() and value.isprintable()) or value != value.strip():
        raise ConfigError(
            f"{where}.key_env: the key in {variable} must be printable ASCII without spaces "
            "around it"
        )
    return hashlib.sha256(value.encode()).digest()


def _build_limits(where: str, raw: Mapping[str, Any], base: Limits) -> Limits:
    """The limits ``raw`` sets, the others from ``base``."""

    values = {}
    for name in LIMIT_FIELDS:
        kind = float if name == "requests_per_minute" else int
        values[name] = _number(f"{where}.{name}", raw.get(name, getattr(base, name)), kind, 0)
    return Limits(**values)


def _build_backends(raw: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Upstream]:
    backends: dict[str, Upstream] = {}
    declared = raw.get("backends", [])
    if "upstream" in raw or not declared:
        backends["default"] = _build_upstream(dict(raw.get("upstream", {})), env, "upstream")
    for i, entry in enumerate(declared):
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"backends.{i}.name: required, a non-empty string")
        if name in backends:
            raise ConfigError(f"backends.{i}.name: {name!r} is declared twice")
        if "model" in entry:
            raise ConfigError(f"backends.{i}.model: set models on routes, not on backends")
        backends[name] = replace(_build_upstream(dict(entry), env, f"backends.{i}"), name=name)
    return backends


def _build_upstream(raw: dict[str, Any], env: Mapping[str, str], where: str) -> Upstream:
    defaults = Upstream()
    _reject_unknown(
        f"{where}.", raw, {f.name for f in fields(Upstream)} | {"api_key_env", "quirks"}
    )
    url = str(raw.get("url", defaults.url)).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.url: must start with http:// or https:// (got {url!r})")
    protocol = raw.get("protocol", "openai")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"{where}.protocol: must be one of {', '.join(PROTOCOLS)}")
    headers = raw.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise ConfigError(f"{where}.headers: must be a table of header name = string value")

    def seconds(key: str, default: float, minimum: float = 0.01) -> float:
        return _number(f"{where}.{key}", raw.get(key, default), float, minimum)

    if raw.get("client_key") and not raw.get("client_cert"):
        raise ConfigError(f"{where}.client_key: given without client_cert")

    return Upstream(
        url=url,
        api_key=_secret(where, raw, env, "api_key"),
        model=str(raw.get("model", "")),
        protocol=protocol,
        headers=dict(headers),
        connect_timeout=seconds("connect_timeout", 5.0),
        read_timeout=seconds("read_timeout", 600.0),
        idle_timeout=seconds("idle_timeout", 0.0, 0.0),
        total_timeout=seconds("total_timeout", 0.0, 0.0),
        max_concurrency=_number(f"{where}.max_concurrency", raw.get("max_concurrency", 0), int, 0),
        pool_size=_number(f"{where}.pool_size", raw.get("pool_size", 0), int, 0),
        proxy=_proxy_url(where, raw.get("proxy", "")),
        trust_env=_boolean(f"{where}.trust_env", raw.get("trust_env", False)),
        ca_bundle=_path(f"{where}.ca_bundle", raw.get("ca_bundle", "")),
        client_cert=_path(f"{where}.client_cert", raw.get("client_cert", "")),
        client_key=_path(f"{where}.client_key", raw.get("client_key", "")),
        max_response_bytes=_number(
            f"{where}.max_response_bytes", raw.get("max_response_bytes", 32 << 20), int, 1024
        ),
        max_line_bytes=_number(
            f"{where}.max_line_bytes", raw.get("max_line_bytes", 4 << 20), int, 1024
        ),
        dialect=_build_dialect(raw.get("dialect", "generic"), raw.get("quirks", {}), where),
    )


def _proxy_url(where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}.proxy: must be a string URL")
    if value and not value.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.proxy: must start with http:// or https:// (got {value!r})")
    return value.rstrip("/")


def _path(key: str, value: Any) -> str:
    """A file (or directory) the gateway must be able to read: checked at start, so that a
    wrong path stops the service with its key named instead of failing every request."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a path")
    if value and not os.access(value, os.R_OK):
        raise ConfigError(f"{key}: cannot read {value!r}")
    return value


def _secret(where: str, raw: Mapping[str, Any], env: Mapping[str, str], key: str) -> str:
    """``key`` inline, or ``key_env``: the name of an environment variable holding it."""
    value = str(raw.get(key, ""))
    variable = raw.get(f"{key}_env")
    if not value and variable:
        value = env.get(str(variable), "")
        if not value:
            raise ConfigError(f"{where}.{key}_env: environment variable {variable} is empty")
    return value


def _build_routes(
    entries: list[dict[str, Any]], models: Mapping[str, str], backends: Mapping[str, Upstream]
) -> tuple[Route, ...]:
    routes = [
        Route(alias, (alias,), (Target("default", backend_model),))
        for alias, backend_model in models.items()
    ]
    for i, entry in enumerate(entries):
        routes.append(_build_route(entry, f"routes.{i}", backends))
    return tuple(routes)


def _build_route(entry: dict[str, Any], where: str, backends: Mapping[str, Upstream]) -> Route:
    _reject_unknown(
        f"{where}.", entry, {"name", "match", "strategy", "targets", "backend", "model"}
    )
    match = entry.get("match")
    patterns = [match] if isinstance(match, str) else match
    if (
        not isinstance(patterns, list)
        or not patterns
        or not all(isinstance(p, str) and p for p in patterns)
    ):
        raise ConfigError(f"{where}.match: a model name or glob, or a list of them")
    strategy = entry.get("strategy", "failover")
    if strategy not in STRATEGIES:
        raise ConfigError(f"{where}.strategy: must be one of {', '.join(STRATEGIES)}")
    raw_targets = entry.get("targets")
    if raw_targets is None:
        raw_targets = [{k: entry[k] for k in ("backend", "model") if k in entry}]
    elif "backend" in entry or "model" in entry:
        raise ConfigError(f"{where}: give either targets or backend/model, not both")
    if not isinstance(raw_targets, list) or not raw_targets:
        raise ConfigError(f"{where}.targets: a non-empty array of {{backend, model, weight}}")
    targets = tuple(
        _build_target(t, f"{where}.targets.{j}", backends) for j, t in enumerate(raw_targets)
    )
    return Route(str(entry.get("name") or where), tuple(patterns), targets, strategy)


def _build_target(raw: Any, where: str, backends: Mapping[str, Upstream]) -> Target:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table {{backend, model, weight}}")
    _reject_unknown(f"{where}.", raw, {"backend", "model", "weight"})
    backend = raw.get("backend")
    if backend not in backends:
        known = ", ".join(backends)
        raise ConfigError(f"{where}.backend: no backend named {backend!r} (backends: {known})")
    model = raw.get("model", "")
    if not isinstance(model, str):
        raise ConfigError(f"{where}.model: must be a string")
    return Target(backend, model, _number(f"{where}.weight", raw.get("weight", 1.0), float, 0.0))


def _default_route(
    routing: Mapping[str, Any], routes: tuple[Route, ...], backends: Mapping[str, Upstream]
) -> Route | None:
    """The route for model names nothing matches: named in [routing], else the default backend."""
    name = routing.get("default")
    if name is not None:
        for route in routes:
            if route.name == name:
                return route
        known = ", ".join(r.name for r in routes) or "none"
        raise ConfigError(f"routing.default: no route named {name!r} (routes: {known})")
    if "default" in backends:
        return Route("default", (), (Target("default", backends["default"].model),))
    return None


def _build_routing(raw: Mapping[str, Any]) -> Routing:
    known = {f.name for f in fields(Routing)} | {"default"}
    _reject_unknown("routing.", raw, known)
    base = Routing()
    values: dict[str, Any] = {}
    for f in fields(Routing):
        kind = int if isinstance(getattr(base, f.name), int) else float
        values[f.name] = _number(
            f"routing.{f.name}", raw.get(f.name, getattr(base, f.name)), kind, 0
        )
    return Routing(**values)


def _build_dialect(name: Any, quirks: Any, where: str) -> Dialect:
    if not isinstance(name, str) or name not in DIALECTS:
        raise ConfigError(
            f"{where}.dialect: unknown dialect {name!r}; one of {', '.join(DIALECTS)}"
        )
    if not isinstance(quirks, dict):
        raise ConfigError(f"{where}.quirks: must be a table")
    base = DIALECTS[name]
    allowed = {f.name for f in fields(Dialect)}
    changes: dict[str, Any] = {}
    for key, value in quirks.items():
        if key not in allowed or key == "name":
            raise ConfigError(
                f"{where}.quirks.{key}: unknown setting; one of {', '.join(sorted(allowed))}"
            )
        current = getattr(base, key)
        if isinstance(current, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}.quirks.{key}: must be a list of strings")
            changes[key] = tuple(value)
        elif isinstance(current, bool):
            changes[key] = _boolean(f"{where}.quirks.{key}", value)
        elif isinstance(current, int):
            changes[key] = _number(f"{where}.quirks.{key}", value, int, 0)
        elif not isinstance(value, str):
            raise ConfigError(f"{where}.quirks.{key}: must be a string")
        else:
            changes[key] = value
    try:
        return replace(base, **changes)
    except ValueError as exc:
        raise ConfigError(f"{where}.quirks.{exc}") from None


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
