"""The model list served at ``GET /v1/models`` and ``GET /v1/models/{id}``: the names clients may
send.

Clients (and Claude Code's model picker) see the Anthropic-side names: every alias and exact
route name, the default route's backend model, and, where a route passes the client's name on
unchanged (a glob route or a default route with no fixed model, as with only
``GATEWAY_UPSTREAM_URL`` set), the names that backend lists itself. A backend's list is asked
for lazily and kept per worker for ``FRESH_FOR`` seconds, so a model picker polling the list
does not become a stream of backend requests; a backend that fails to answer leaves the last
good list (or none) and is asked again ``RETRY_AFTER`` seconds later. Listing never fails
because of a backend.

``GET /v1/models/{id}`` answers for every name ``POST /v1/messages`` would serve (whatever
routing resolves, globs and a default route included), and 404 ``not_found_error`` only for
names it would refuse: a client that checks a model before using it must not be told "no" for
a name that works. It never asks a backend.

Pagination follows the API: ``limit``, ``after_id``, ``before_id``, and ``has_more`` always
present, because the SDK's auto-pager keeps asking while it is missing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.backends.client import BackendClient
from app.backends.routing import is_glob, resolve
from app.config import Route, Settings
from app.errors import GatewayError, InvalidRequest, NotFound

log = logging.getLogger("gateway")

CREATED_AT = "2025-01-01T00:00:00Z"  # backends rarely say; a fixed RFC 3339 date is allowed
FRESH_FOR = 60.0  # seconds a backend's list is served before it is asked again
RETRY_AFTER = 5.0  # seconds before a backend that failed to list is asked again
MAX_CREATED = 1e11  # an epoch beyond this (year 5138) is not a time a backend meant


@dataclass
class _Listed:
    """One backend's last good list, and when to ask it again."""

    models: list[dict[str, Any]] = field(default_factory=list)
    ask_at: float = float("-inf")  # monotonic; -inf: never asked
    lock: threading.Lock = field(default_factory=threading.Lock)


class Catalog:
    """The worker's model list: the configured names, then those the pass-through backends
    list, each as an Anthropic model object."""

    def __init__(
        self,
        settings: Settings,
        clients: Mapping[str, BackendClient],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.clients = clients
        self.clock = clock
        self.listed = {name: _Listed() for name in listing_backends(settings)}

    def page(self, args: Mapping[str, str]) -> dict[str, Any]:
        """One page of ``GET /v1/models``."""
        return paginate(self.models(), args)

    def find(self, model_id: str) -> dict[str, Any]:
        """``GET /v1/models/{id}``: any name routing resolves (NotFound otherwise), with what
        a backend said of it when its list, as this worker last had it, names it."""
        resolve(self.settings, model_id)
        for listed in self.listed.values():
            for model in listed.models:
                if model["id"] == model_id:
                    return model
        return model_object(model_id, self.settings)

    def models(self) -> list[dict[str, Any]]:
        """Every model listed: configured names first, in config order, then each backend's."""
        found = {i: model_object(i, self.settings) for i in model_ids(self.settings)}
        for backend in self.listed:
            for model in self._backend_models(backend):
                found.setdefault(model["id"], model)
        return list(found.values())

    def _backend_models(self, backend: str) -> list[dict[str, Any]]:
        """The backend's list as last fetched, fetched again first if it is due. One request
        per worker asks; the others wait for its answer rather than ask too."""
        listed = self.listed[backend]
        if self.clock() < listed.ask_at:
            return listed.models
        with listed.lock:
            if self.clock() >= listed.ask_at:  # not refreshed while this request waited
                self._refresh(backend, listed)
        return listed.models

    def _refresh(self, backend: str, listed: _Listed) -> None:
        try:
            answer = self.clients[backend].models()
        except GatewayError as exc:
            log.warning("backend %s did not list its models (%s)", backend, exc.message)
            listed.ask_at = self.clock() + RETRY_AFTER
            return
        models = [backend_object(m) for m in answer if isinstance(m.get("id"), str) and m["id"]]
        listed.models = [m for m in models if serves_unchanged(self.settings, m["id"], backend)]
        listed.ask_at = self.clock() + FRESH_FOR


def listing_backends(settings: Settings) -> list[str]:
    """Backends whose own model names clients may send: targets that keep the client's name
    (no fixed model) of a route that takes names it does not list (globs, or the default)."""
    routes = [r for r in settings.routes if any(is_glob(p) for p in r.match)]
    if settings.default_route is not None:
        routes.append(settings.default_route)
    names = [t.backend for route in routes for t in route.targets if not t.model]
    return list(dict.fromkeys(names))


def serves_unchanged(settings: Settings, model_id: str, backend: str) -> bool:
    """Whether ``POST /v1/messages`` with this name can reach ``backend`` under this very
    name: only then is the backend's name one the client may send."""
    try:
        route = resolve(settings, model_id)
    except NotFound:
        return False
    return any(t.backend == backend and not t.model for t in route.targets)


def model_ids(settings: Settings) -> list[str]:
    """The configured names: aliases and exact route names, and the default route's models."""
    names = [p for route in settings.routes for p in route.match if not is_glob(p)]
    default = settings.default_route
    if default is not None:
        names += [t.model for t in default.targets if t.model]
    return list(dict.fromkeys(names))


def model_object(model_id: str, settings: Settings) -> dict[str, Any]:
    """A name routing resolves, as a model object whose display name says what serves it."""
    return _object(model_id, _display_name(model_id, resolve(settings, model_id)), CREATED_AT)


def backend_object(listed: Mapping[str, Any]) -> dict[str, Any]:
    """A backend's model entry (OpenAI's ``{"id", "created"}``, or Anthropic's own shape)."""
    model_id = listed["id"]
    display = listed.get("display_name")
    return _object(
        model_id,
        display if isinstance(display, str) and display else model_id,
        _created_at(listed),
    )


def paginate(models: list[dict[str, Any]], args: Mapping[str, str]) -> dict[str, Any]:
    """A page as the Messages API gives it: ``after_id`` and ``before_id`` cut the list,
    ``limit`` takes from the front (from the back before ``before_id``)."""
    ids = [m["id"] for m in models]
    limit = _limit(args.get("limit"))
    after, before = args.get("after_id"), args.get("before_id")
    start = ids.index(after) + 1 if after in ids else 0
    if before in ids[start:]:
        end = ids.index(before, start)
        page = models[max(start, end - limit) : end]
    else:
        end = len(ids)
        page = models[start : start + limit]
    return {
        "data": page,
        "has_more": end - start > limit,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
    }


def _object(model_id: str, display_name: str, created_at: str) -> dict[str, Any]:
    return {
        "type": "model",
        "id": model_id,
        "display_name": display_name,
        "created_at": created_at,
    }


def _display_name(model_id: str, route: Route) -> str:
    backend_models = {t.model or model_id for t in route.targets}
    if backend_models == {model_id}:
        return model_id
    return f"{model_id} ({', '.join(sorted(backend_models))})"


def _created_at(listed: Mapping[str, Any]) -> str:
    """RFC 3339 from an OpenAI-style epoch, an Anthropic-style date as it is, else the fixed
    date."""
    created = listed.get("created")
    if isinstance(created, int | float) and not isinstance(created, bool):
        if 0 < created < MAX_CREATED:
            return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
    given = listed.get("created_at")
    return given if isinstance(given, str) and given else CREATED_AT


def _limit(value: str | None) -> int:
    if value is None:
        return 20
    try:
        limit = int(value)
    except ValueError:
        raise InvalidRequest("limit: must be an integer between 1 and 1000") from None
    if not 1 <= limit <= 1000:
        raise InvalidRequest("limit: must be an integer between 1 and 1000")
    return limit
