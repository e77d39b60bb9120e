"""The admin surface, answered only to the admin token: ``GET /status`` (this worker's view
of the backends, the routes and the keys in flight across the service) and
``GET /admin/usage`` (the usage records of the state store, summed as asked).

Without an admin token configured these routes do not exist (404), so a gateway set up without
one shows nothing about itself.
"""

from __future__ import annotations

import gc
import hmac
import os
import time
from collections.abc import Mapping
from typing import Any

import greenlet
from flask import Blueprint, Response, request

from app import jsonc
from app.backends.dispatch import Dispatcher
from app.config import Settings
from app.errors import AuthenticationFailed, GatewayError, InvalidRequest, NotFound
from app.policy.auth import bearer_token
from app.policy.limits import KeyPolicy
from app.policy.usage import GROUPS, BadPeriod, period, report
from app.state.batch_queue import BATCH_FLIGHTS
from app.state.guard import GuardedStore

JSON = "application/json"


def create_admin_blueprint(
    settings: Settings,
    dispatcher: Dispatcher,
    keys: Mapping[bytes, KeyPolicy],
    store: GuardedStore,
) -> Blueprint:
    bp = Blueprint("admin", __name__)

    @bp.get("/status")
    def status() -> Response:
        _require_admin(settings)
        return Response(jsonc.dumps(_status(settings, dispatcher, keys, store)), mimetype=JSON)

    @bp.get("/admin/usage")
    def usage() -> Response:
        """``?since=&until=`` (2026-12-01, today or 7d), ``&key=&model=``, and ``&by=`` (day,
        key, model: comma separated, default all three)."""
        _require_admin(settings)
        args = request.args
        by = [name for name in args.get("by", ",".join(GROUPS)).split(",") if name]
        try:
            since, until = period(args.get("since"), args.get("until"), time.time())
            rows = store.usage(since, until, args.get("key"), args.get("model"))
            body = report(rows, since, until, by)
        except BadPeriod as exc:
            raise InvalidRequest(str(exc)) from None
        return Response(jsonc.dumps(body), mimetype=JSON)

    return bp


def _require_admin(settings: Settings) -> None:
    """Admin routes exist only with an admin token configured, and answer only to it."""
    if not settings.admin_token:
        raise NotFound(f"no route for {request.method} {request.path}")
    headers = request.headers
    offered = bearer_token(headers.get("authorization")) or headers.get("x-api-key") or ""
    if not hmac.compare_digest(offered.encode(), settings.admin_token.encode()):
        raise AuthenticationFailed("admin token required")


def _status(
    settings: Settings,
    dispatcher: Dispatcher,
    keys: Mapping[bytes, KeyPolicy],
    store: GuardedStore,
) -> dict[str, Any]:
    health = dispatcher.balancer.snapshot()
    names = list(dispatcher.clients)
    service = _service_in_flight(names + [BATCH_FLIGHTS + name for name in names], store)
    backends = {
        name: {
            "url": client.name,
            "protocol": client.config.protocol,
            "dialect": client.config.dialect.name,
            **health[name],
            "service_in_flight": service.get(name),
            "batch_in_flight": service.get(BATCH_FLIGHTS + name),
        }
        for name, client in dispatcher.clients.items()
    }
    routes = [
        {
            "name": route.name,
            "match": list(route.match),
            "strategy": route.strategy,
            "targets": [
                {"backend": t.backend, "model": t.model, "weight": t.weight} for t in route.targets
            ],
        }
        for route in (*settings.routes, *(r for r in (settings.default_route,) if r))
    ]
    return {
        "worker_pid": os.getpid(),
        "time": time.time(),
        "backends": backends,
        "routes": routes,
        "keys": _key_status(keys, store),
        "state": {"engine": settings.state.engine, "up": store.up},
        "process": _process(),
    }


def _service_in_flight(names: list[str], store: GuardedStore) -> dict[str, int]:
    """Each backend's requests in flight across the service, as ``least_busy`` and
    ``affinity`` routes count them (every route's while batches are on), and its batch items
    apart (empty while the store is down)."""
    try:
        return store.backend_loads(names)
    except GatewayError:
        return {}


def _key_status(keys: Mapping[bytes, KeyPolicy], store: GuardedStore) -> dict[str, Any]:
    """Each key's requests in flight across the service (its live leases in the store)."""
    names = [key.name for key in keys.values()]
    try:
        counts = store.in_flight(names) if names else {}
    except GatewayError:
        return {name: {"in_flight": None} for name in names}  # the store is down
    return {name: {"in_flight": counts.get(name, 0)} for name in names}


def _process() -> dict[str, int]:
    """What a leak would show first: open file descriptors and live greenlets (found by a
    collection and a walk of the heap, which is fine for an admin endpoint and nowhere else;
    the hub and the objects frozen at start are not among them)."""
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else -1
    gc.collect()
    live = sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and not o.dead)
    return {"open_fds": fds, "greenlets": live}
