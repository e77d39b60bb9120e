"""Readiness: does at least one backend answer? Asked through the backend's own client (its
adapter, TLS and proxy settings), and remembered briefly.

The question is one ``GET /models`` per backend, which costs the backend no tokens; the
answer is kept for a few seconds so that a load balancer polling /readyz does not turn into a
stream of requests to the backends.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CACHE_SECONDS = 5.0


class Readiness:
    """Each backend's last answer to ``ready()``, asked again once it is older than
    ``CACHE_SECONDS``."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.answers: dict[str, tuple[float, bool]] = {}

    def check(self, name: str, ask: Callable[[], bool]) -> bool:
        now = self.clock()
        cached = self.answers.get(name)
        if cached and now - cached[0] < CACHE_SECONDS:
            return cached[1]
        ok = ask()
        self.answers[name] = (self.clock(), ok)
        return ok
