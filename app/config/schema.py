"""The settings, each declared once: its type, default, bounds, environment variable, whether it
is a secret and what it does (app/config/setting.py says how). The loader (app/config/loader.py)
and the README's reference (app/config/reference.py) are driven by these declarations, and the
tables below are derived from them.

The TOML file's layout: top-level keys and tables are Settings' own fields; ``[upstream]`` and
``[[backends]]`` hold Upstream's settings, ``[[routes]]`` Route's, ``[routing]`` Routing's,
``[[auth.keys]]`` ClientKey's, ``[limits]`` Limits', and so on, as each Section field names.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from functools import cache
from typing import Literal, get_args

from app.config import checks
from app.config.setting import (
    Place,
    declared,
    flat,
    inline,
    known_keys,
    required,
    section,
    sections,
    setting,
)
from app.translate.billing_header import Mode as BillingHeader
from app.translate.dialect import DIALECTS, Dialect

BackendProtocol = Literal["openai", "anthropic"]
Strategy = Literal["failover", "weighted", "least_busy", "affinity"]
Engine = Literal["sqlite", "redis"]
OnFailure = Literal["open", "closed"]
LogLevel = Literal["debug", "info", "warning", "error"]

PROTOCOLS: tuple[BackendProtocol, ...] = get_args(BackendProtocol)
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)
ENGINES: tuple[Engine, ...] = get_args(Engine)
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)
BILLING_HEADER_MODES: tuple[BillingHeader, ...] = get_args(BillingHeader)

DEFAULT_BACKEND = "default"  # the name [upstream] gets, and what the default route sends to
DIALECT_NAMES = ", ".join(f"`{name}`" for name in DIALECTS)


@dataclass(frozen=True)
class Timeouts:
    """How long a backend may take, in seconds: to connect, to send its first byte, between two
    chunks of a stream, and for a whole answer."""

    connect: float = setting(
        5.0,
        key="connect_timeout",
        minimum=0.01,
        env="GATEWAY_CONNECT_TIMEOUT",
        doc="seconds to connect",
    )
    read: float = setting(
        600.0,
        key="read_timeout",
        minimum=0.01,
        env="GATEWAY_READ_TIMEOUT",
        doc="seconds to wait for the first byte; also between chunks unless `idle_timeout` is set",
    )
    idle: float = setting(
        0.0, key="idle_timeout", doc="seconds between two stream chunks (0: `read_timeout`)"
    )
    total: float = setting(
        0.0, key="total_timeout", doc="seconds for a whole answer, stream included (0: no cap)"
    )

    @property
    def between_chunks(self) -> float:
        return self.idle or self.read

    @property
    def first_byte(self) -> float:
        return min(self.read, self.total) if self.total else self.read


# gunicorn's worker_connections, from GATEWAY_WORKER_CONNECTIONS (gunicorn.conf.py; not in the
# TOML file): a worker's open streams and idle keep-alives, and its backend connections too
# when ``pool_size`` is 0.
WORKER_CONNECTIONS = 1000


@dataclass(frozen=True)
class Upstream:
    """One backend. ``[upstream]`` is the backend named "default"; ``[[backends]]`` add more."""

    name: str = setting(
        DEFAULT_BACKEND,
        doc="`[[backends]]`: the name routes send to (required); `[upstream]` is `default`",
    )
    url: str = setting(
        "http://127.0.0.1:8000/v1",
        env="GATEWAY_UPSTREAM_URL",
        check=checks.backend_url,
        doc="the backend's base URL, ending in `/v1`",
    )
    api_key: str = setting(
        "",
        env="GATEWAY_UPSTREAM_API_KEY",
        secret=True,
        doc="the backend's API key, or `api_key_env`: the name of a variable holding it",
        shown="none",
    )
    model: str = setting(
        "",
        env="GATEWAY_UPSTREAM_MODEL",
        doc="`[upstream]` only: the backend model for every name no alias or route maps",
        shown="the client's model name",
    )
    protocol: BackendProtocol = setting(
        "openai",
        doc="`openai`: Chat Completions, translated; `anthropic`: Messages API, passed through",
    )
    headers: Mapping[str, str] = setting(
        {},
        hidden=True,
        check=checks.header_table,
        doc='extra headers sent to the backend (`{ "X-Team" = "ml" }`)',
        shown="none",
    )
    timeouts: Timeouts = inline(Timeouts())
    max_concurrency: int = setting(
        0, doc="requests in flight to it per worker (0: no cap); beyond it, the route's next target"
    )
    capacity: int = setting(
        0,
        doc="requests it runs at once for the whole service (vLLM's `--max-num-seqs`, "
        "llama.cpp's `--parallel`); batch items take a share of it",
        shown="`max_concurrency`, else 1",
    )
    batch_priority: int = setting(
        0,
        doc="`priority` sent with batch items (vLLM with `--scheduling-policy priority`: a "
        "positive number runs after interactive requests; SGLang: a negative one); 0: not sent",
    )
    pool_size: int = setting(
        0,
        doc="connections kept per worker",
        shown="`GATEWAY_WORKER_CONNECTIONS`",
    )
    proxy: str = setting(
        "",
        hidden=True,
        check=checks.proxy_url,
        doc="an `http://` or `https://` proxy URL; `https://` backends are tunnelled with CONNECT",
        shown="none",
    )
    trust_env: bool = setting(
        False,
        doc="take the proxy from `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY`, read once at start",
    )
    ca_bundle: str = setting(
        "",
        check=checks.readable_path,
        doc="a PEM file or directory of CAs to verify an `https://` backend (always verified)",
        shown="the bundled CAs (certifi)",
    )
    client_cert: str = setting(
        "",
        check=checks.readable_path,
        doc="a client certificate, for backends that ask for mutual TLS",
        shown="none",
    )
    client_key: str = setting(
        "",
        check=checks.readable_path,
        doc="the client certificate's key, if not in the same file",
        shown="none",
    )
    max_response_bytes: int = setting(
        32 << 20,
        minimum=1024,
        doc="the most a whole answer may be, after decompression; above it, a 500 `api_error`",
    )
    max_line_bytes: int = setting(
        4 << 20,
        minimum=1024,
        doc="the longest line of a streamed answer; above it, the stream ends with an error",
    )
    dialect: Dialect = setting(
        DIALECTS["generic"],
        env="GATEWAY_UPSTREAM_DIALECT",
        reader=checks.dialect,
        also=("quirks",),
        doc=f"the backend's flavour of the API: {DIALECT_NAMES}; `quirks`: a table of "
        "per-field overrides of it (the quirks above)",
        shown="`generic`",
    )


@dataclass(frozen=True)
class Target:
    """Where a route sends a request: a backend, and the model name to ask it for."""

    backend: str = required(doc="the backend's name")
    model: str = setting("", doc="the model to ask it for", shown="the client's model name")
    weight: float = setting(1.0, doc="share of requests under `weighted` (0: only as a spare)")


@dataclass(frozen=True)
class Route:
    name: str = required(
        doc="the route's name, for `routing.default`, logs and `/status`",
        shown="`routes.<index>`",
    )
    match: tuple[str, ...] = required(doc="a model name or glob, or a list of them")
    targets: tuple[Target, ...] = required(
        doc="`{ backend, model, weight }` tables, in order; or `backend` and `model` for one",
        also=("backend", "model"),
        entries=Target,
    )
    strategy: Strategy = setting(
        "failover",
        doc="`failover`, `weighted`, `least_busy` or `affinity` (replicas of one model: each "
        "conversation to the replica that holds its prefix, within a load bound)",
    )


@dataclass(frozen=True)
class Routing:
    """Retry, failover and circuit-breaker policy, shared by every route."""

    retries: int = setting(
        2, env="GATEWAY_RETRIES", doc="extra attempts after the first, for one request in all"
    )
    backoff: float = setting(
        0.2, doc="seconds before a retry, doubled per attempt, full jitter, capped by max_backoff"
    )
    max_backoff: float = setting(2.0, doc="longest wait before a retry, in seconds")
    max_retry_after: float = setting(
        10.0, doc="a backend's `retry-after` up to this many seconds is honoured"
    )
    breaker_failures: int = setting(5, doc="consecutive failures that open a backend's breaker")
    breaker_cooldown: float = setting(
        30.0, doc="seconds a backend's breaker stays open before one probe request"
    )
    affinity_ttl: float = setting(
        1800.0,
        minimum=1,
        doc="seconds an `affinity` route remembers which replica served a conversation",
    )
    affinity_max_entries: int = setting(
        200_000, minimum=1, doc="conversations (and sessions) remembered at most, the oldest go"
    )
    affinity_hit_factor: float = setting(
        1.5,
        minimum=1,
        doc="a replica keeps a conversation whose prefix it holds while its requests in flight "
        "stay within this factor of the route's average",
    )
    affinity_new_factor: float = setting(
        1.25,
        minimum=1,
        doc="the same for a conversation known only by the client's session id",
    )


@dataclass(frozen=True)
class Limits:
    """A client key's limits, for the whole service (every worker and host: app/state).

    0 means no limit. ``burst`` is how many requests may arrive at once; 0 means a minute's
    worth (``requests_per_minute`` rounded up), as with Anthropic's own limits. Token limits
    count a request's estimated input and its ``max_tokens`` when it is admitted, and its real
    usage once it is over.
    """

    requests_per_minute: float = setting(
        0.0, doc="`POST /v1/messages` and `count_tokens` per key, from one bucket"
    )
    burst: int = setting(
        0, doc="requests at once", shown="`requests_per_minute` (a minute's worth)"
    )
    max_concurrent: int = setting(0, doc="requests in flight, a stream until its last byte")
    input_tokens_per_minute: int = setting(0, doc="estimated input tokens, settled to real usage")
    output_tokens_per_minute: int = setting(0, doc="`max_tokens`, settled to real usage")
    tokens_per_day: int = setting(0, doc="input + output, per UTC calendar day")
    tokens_per_month: int = setting(0, doc="input + output, per UTC calendar month")

    @property
    def any(self) -> bool:
        return any(getattr(self, name) for name in LIMIT_FIELDS if name != "burst")


@dataclass(frozen=True)
class ClientKey:
    """A key clients may use: its name (for logs, metrics and usage), the SHA-256 of the key
    and its limits, and when it stops working (``expires``, epoch seconds; a revoked key
    stays listed, refused). The key itself is never kept, only its digest."""

    name: str = required(
        check=checks.key_name, doc="up to 64 letters, digits and `. _ @ + -`; shows in logs"
    )
    sha256: bytes = required(
        reader=checks.key_digest,
        also=("key_env",),
        doc="the key's SHA-256 in hex (`python -m app.keys hash`); or `key_env`: the name of "
        "a variable holding the key",
    )
    limits: Limits = inline(Limits(), doc="this key's own limits, instead of `[limits]`")
    expires: float | None = setting(
        None,
        check=checks.parse_instant,
        doc="a date or time (TOML's, or ISO 8601 text); after it the key is a 401",
        shown="never",
    )
    revoked: bool = setting(False, doc="a revoked key stays listed and is refused")


@dataclass(frozen=True)
class StateSettings:
    """Where the shared state lives (app/state): SQLite in ``directory`` (the default, for
    every worker on one host), or Redis at ``redis_url`` (several hosts)."""

    engine: Engine = setting(
        "sqlite", doc="`sqlite` or `redis`", shown="`redis` when `redis_url` is set, else `sqlite`"
    )
    directory: str = setting(
        "state",
        env="GATEWAY_STATE_DIR",
        doc="where the SQLite file is, relative to the working directory",
        shown="`$STATE_DIRECTORY` (systemd's StateDirectory), else `state`",
    )
    redis_url: str = setting(
        "",
        env="GATEWAY_REDIS_URL",
        secret=True,
        doc="a `redis://`, `rediss://` or `unix://` URL, for several hosts; or `redis_url_env`",
        shown="none",
    )
    on_failure: OnFailure = setting(
        "open",
        env="GATEWAY_STATE_ON_FAILURE",
        doc="while the store cannot answer: `open` lets requests in unlimited, `closed` is 503",
    )
    lease_seconds: float = setting(
        900.0, minimum=1, doc="how long a dead worker's concurrency slot stays taken"
    )


@dataclass(frozen=True)
class ThreadSettings:
    """Message threads (the ``thread`` field of the message-threads beta)."""

    enabled: bool = setting(True, doc="`false`: every threaded request is refused as unsupported")
    ttl: float = setting(
        86400.0, minimum=1, doc="seconds a conversation is kept after its last turn"
    )
    max_bytes: int = setting(
        8 << 20, minimum=1024, doc="a longer conversation is not kept (the SDK replays it)"
    )


@dataclass(frozen=True)
class BatchSettings:
    """The Message Batches API (app/batches): where batches' files live, and how much of the
    backends' capacity their items may use."""

    enabled: bool = setting(True, doc="`false`: the batch routes answer 404 and no batch runs")
    directory: str = setting(
        "",
        env="GATEWAY_BATCH_DIR",
        doc="where batches' requests and results are kept; shared storage for several hosts",
        shown="`batches` in the state directory",
    )
    max_body_bytes: int = setting(
        256 << 20, minimum=1024, doc="the largest `create` body (413 above it)"
    )
    max_requests: int = setting(100_000, minimum=1, doc="requests in one batch at most")
    share: float = setting(
        0.5, doc="the share of each backend's `capacity` batch items may use (at least one item)"
    )
    lease_seconds: float = setting(
        60.0, minimum=1, doc="how long a dead worker's item stays claimed (renewed while it runs)"
    )
    backoff: float = setting(
        5.0, doc="seconds an item waits after its backend was busy or failed, doubled each time"
    )
    max_backoff: float = setting(300.0, doc="the longest such wait")
    max_attempts: int = setting(
        10, minimum=1, doc="attempts before an item that keeps failing is an `errored` result"
    )
    poll_interval: float = setting(
        1.0, doc="seconds between a worker's looks for work when it found none"
    )
    public_url: str = setting(
        "",
        doc="the base of `results_url` (e.g. `https://llm.example.com`); none: a relative path",
        shown="none: `/v1/messages/batches/{id}/results`",
    )


@dataclass(frozen=True)
class TranslateSettings:
    """How requests are reworded for OpenAI-style backends, whichever backend it is."""

    billing_header: BillingHeader = setting(
        "normalize",
        env="GATEWAY_BILLING_HEADER",
        doc="Claude Code's attribution line in the system prompt: `normalize` its per-request "
        "values, `drop` it or `keep` it (app/translate/billing_header.py)",
    )


@dataclass(frozen=True)
class Settings:
    backends: Mapping[str, Upstream] = section(
        lambda: {DEFAULT_BACKEND: Upstream()},
        Place("upstream", "table", Upstream),
        Place("backends", "array", Upstream),
        doc="the backends; `[upstream]` is the one named `default`",
    )
    routes: tuple[Route, ...] = section(
        tuple, Place("routes", "array", Route), doc="model names sent to backends"
    )
    default_route: Route | None = section(
        lambda: Route(DEFAULT_BACKEND, (), (Target(DEFAULT_BACKEND),)),
        Place("routing.default", "key"),
        doc="the route for names nothing matches (none named: the default backend, else a 404)",
    )
    routing: Routing = section(
        Routing, Place("routing", "table", Routing), doc="retries, failover and breakers"
    )
    models: Mapping[str, str] = section(
        dict, Place("models", "table"), doc="client model name = backend model name"
    )
    max_body_bytes: int = setting(
        32 << 20,
        minimum=1024,
        env="GATEWAY_MAX_BODY_BYTES",
        doc="the largest request body (413 above it); keep nginx's client_max_body_size as big",
    )
    log_level: LogLevel = setting(
        "info", env="GATEWAY_LOG_LEVEL", doc="`debug`, `info`, `warning` or `error`"
    )
    admin_token: str = setting(
        "",
        table="admin",
        key="token",
        env="GATEWAY_ADMIN_TOKEN",
        secret=True,
        doc="enables `/status`, `/admin/usage` and the console at `/admin/` for this bearer token; "
        "or `token_env`",
        shown="none: `/status` and the console disabled",
    )
    ping_interval: float = setting(
        15.0,
        env="GATEWAY_PING_INTERVAL",
        doc="seconds of backend silence after which a stream gets a `ping` event (0: never)",
    )
    body_timeout: float = setting(
        30.0,
        env="GATEWAY_BODY_TIMEOUT",
        doc="seconds a request body may take to arrive (0: no limit); nginx normally buffers it",
    )
    keys_file: str = setting(
        "",
        table="auth",
        doc="a file of `[[keys]]` that `python -m app.keys` writes, read with the config",
        shown="none",
    )
    keys: tuple[ClientKey, ...] = section(
        tuple,
        Place("auth.keys", "array", ClientKey, env="GATEWAY_API_KEYS"),
        Place("limits", "table", Limits),
        doc="keys clients must present on `/v1/` routes, each with `[limits]` unless its own",
    )
    state: StateSettings = section(
        StateSettings, Place("state", "table", StateSettings), doc="the shared state store"
    )
    threads: ThreadSettings = section(
        ThreadSettings, Place("threads", "table", ThreadSettings), doc="message threads"
    )
    batches: BatchSettings = section(
        BatchSettings, Place("batches", "table", BatchSettings), doc="message batches"
    )
    translate: TranslateSettings = section(
        TranslateSettings,
        Place("translate", "table", TranslateSettings),
        doc="how requests are reworded",
    )

    @property
    def upstream(self) -> Upstream:
        """The default backend (or the first one declared)."""
        return self.backends.get(DEFAULT_BACKEND) or next(iter(self.backends.values()))


# --- derived from the declarations above ------------------------------------------------------

# Fields app/keys.py writes for the operator; the gateway ignores them.
KEY_NOTES = ("created", "revoked_at")
LIMIT_FIELDS = tuple(field.name for field in fields(Limits))


def places() -> Iterator[Place]:
    for _, meta in sections(Settings):
        yield from meta.places


# Client keys without a file: comma-separated name:sha256 pairs; they replace [[auth.keys]].
API_KEYS_ENV = next(place.env for place in places() if place.path == "auth.keys")


def _tables() -> tuple[str, ...]:
    """Top-level names that must be tables: the sections' tables, the tables dotted places sit
    in (``auth`` for ``auth.keys``) and the tables single settings live in (``admin``)."""
    names: dict[str, None] = {}
    for place in places():
        if place.kind == "table" or len(place.parts) > 1:
            names[place.parts[0]] = None
    for _, meta in declared(Settings):
        if meta.table:
            names[meta.table] = None
    return tuple(names)


def _env_overrides() -> dict[str, tuple[str, str]]:
    """Environment variable -> (table, key); "" is the top level. The variables of a schema
    whose first place is a table (Upstream's) override that table ([upstream])."""
    found: dict[str, tuple[str, str]] = {}
    for field, meta in declared(Settings):
        if meta.env:
            found[meta.env] = (meta.table, meta.toml_key(field.name))
    for place in places():
        if place.kind == "table" and place.schema is not None:
            for field, meta in flat(place.schema):
                if meta.env and meta.env not in found:
                    found[meta.env] = (place.path, meta.toml_key(field.name))
    return found


@cache
def table_keys(path: str) -> frozenset[str] | None:
    """The keys the TOML table at ``path`` may hold; None for a free-form table ([models])."""
    keys: set[str] = set()
    free = False
    for place in places():
        if place.path == path and place.kind == "table":
            if place.schema is None:
                free = True
            else:
                keys |= known_keys(place.schema)
        elif place.path.startswith(f"{path}.") and len(place.parts) == len(path.split(".")) + 1:
            keys.add(place.parts[-1])
    for field, meta in declared(Settings):
        if meta.table == path:
            name = meta.toml_key(field.name)
            keys.update((name, f"{name}_env") if meta.secret else (name,))
    return None if free else frozenset(keys)


def top_level_keys() -> frozenset[str]:
    own = {meta.toml_key(f.name) for f, meta in declared(Settings) if not meta.table}
    return frozenset(own | set(TABLES) | set(LISTS))


TABLES = _tables()
LISTS = tuple(p.path for p in places() if p.kind == "array" and len(p.parts) == 1)
ENV_OVERRIDES = _env_overrides()
