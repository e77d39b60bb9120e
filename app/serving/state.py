"""What the gateway keeps about one request, from its first hook to its access line.

It lives in the WSGI environ, which every layer reaches through Flask's public
``request.environ``: one lookup through the request proxy, then plain attributes.
"""

from __future__ import annotations

import time
from typing import Any

from flask import request

from app.limits import KeyState, Lease, LimitExceeded

ENVIRON_KEY = "gateway.request"


class RequestState:
    __slots__ = (
        "started",
        "request_id",
        "access",
        "key",
        "lease",
        "access_deferred",
        "body_read",
        "answered",
    )

    def __init__(self, started: float, request_id: str) -> None:
        self.started = started  # monotonic
        self.request_id = request_id
        # The access-log entry; None for probes and scrapes, which get no access line.
        self.access: dict[str, Any] | None = None
        self.key: KeyState | None = None  # the client key, when keys are configured
        self.lease: Lease | None = None  # the key's hold, once its limits admitted the request
        self.access_deferred = False  # a stream writes its own access line when it is over
        self.body_read = False  # the whole request body was read
        self.answered = False  # a response left the app (after_request ran)

    def admit(self) -> None:
        """Hold the request to its key's limits: a lease on one of its slots, or a 429
        ``rate_limit_error`` that says which limit, with the rate headers of a 200."""
        key = self.key
        if key is None or not key.limited:
            return
        now = time.monotonic()
        try:
            self.lease = key.admit(now)
        except LimitExceeded as exc:
            if self.access is not None:
                self.access["rejected"] = exc.reason
            if key.interval:
                exc.headers.update(key.rate_headers(now, time.time()))
            raise


def current() -> RequestState | None:
    """This request's state; None only if the first hook never ran for it."""
    return request.environ.get(ENVIRON_KEY)
