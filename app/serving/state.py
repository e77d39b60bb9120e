"""What the gateway keeps about one request, from its first hook to its access line.

It lives in the WSGI environ, which every layer reaches through Flask's public
``request.environ``: one lookup through the request proxy, then plain attributes.
"""

from __future__ import annotations

from typing import Any

from flask import request

from app.limits import Lease

ENVIRON_KEY = "gateway.request"


class RequestState:
    __slots__ = ("started", "request_id", "access", "lease", "access_deferred")

    def __init__(self, started: float, request_id: str) -> None:
        self.started = started  # monotonic
        self.request_id = request_id
        # The access-log entry; None for probes and scrapes, which get no access line.
        self.access: dict[str, Any] | None = None
        self.lease: Lease | None = None  # the client key's hold, when its limits apply
        self.access_deferred = False  # a stream writes its own access line when it is over


def current() -> RequestState | None:
    """This request's state; None only if the first hook never ran for it."""
    return request.environ.get(ENVIRON_KEY)
