"""Readiness: is at least one backend reachable? Checked with a TCP connect, cached briefly.

A TCP connect says the backend's server is up without costing it a request or a token; the
answer is cached so that a load balancer polling /readyz does not turn into connection churn.
"""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

CACHE_SECONDS = 5.0
CONNECT_TIMEOUT = 1.0

_cache: dict[str, tuple[float, bool]] = {}


def reachable(url: str, now: float | None = None) -> bool:
    now = time.monotonic() if now is None else now
    cached = _cache.get(url)
    if cached and now - cached[0] < CACHE_SECONDS:
        return cached[1]
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=CONNECT_TIMEOUT):
            ok = True
    except OSError:
        ok = False
    _cache[url] = (now, ok)
    return ok
