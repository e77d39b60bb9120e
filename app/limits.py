"""Per-key limits on ``POST /v1/messages``: a request rate with a burst, and requests in flight.

The rate is a GCRA (generic cell rate algorithm), which is a token bucket kept as one number:
the theoretical arrival time ``tat`` of the next request if the key sent at exactly its rate.
A request at ``now`` is admitted when ``max(tat, now) + interval - now`` fits in the burst
window (``burst`` intervals); admitting it moves ``tat`` on by one interval. So a rested key may
send ``burst`` requests at once, then one per interval; nothing is stored per request.

``max_concurrent`` counts requests in flight, a stream until its last byte or until the client
leaves. Every admitted request holds a ``Lease`` on its key; ``release`` may be called from
every place a request can end (app/web.py and the stream's end in app/api.py) and acts once.

Kept in memory, per gunicorn worker, and that has a price. Workers do not share state, so each
one holds 1/N of every limit (N = ``GATEWAY_WORKERS``, which gunicorn.conf.py exports): a rate
of ``requests_per_minute / N`` with a burst and a concurrency of ``value / N`` rounded up. The
service as a whole admits about the configured figures when a key's requests spread evenly over
the workers; a client whose requests all reach one worker (one keep-alive connection does) gets
only its 1/N, and the rounding up lets the service admit up to N - 1 more than the configured
burst or concurrency. With one worker the limits are exact. Nothing here locks: a gevent worker
runs one thread, and no function here yields to another greenlet.

Pure: the standard library, app.config and app.errors only; the clock is passed in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping

from app.config import ClientKey, ConfigError, Limits
from app.errors import RateLimited

RESET_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class LimitExceeded(RateLimited):
    """429 ``rate_limit_error`` with ``retry-after``; ``reason`` feeds the rejection metric."""

    def __init__(self, reason: str, message: str, retry_after: int) -> None:
        super().__init__(message, headers={"retry-after": str(retry_after)})
        self.reason = reason


def worker_count(environ: Mapping[str, str]) -> int:
    """The number of gunicorn workers, as gunicorn.conf.py read it; 1 outside gunicorn."""
    value = environ.get("GATEWAY_WORKERS", "")
    try:
        workers = int(value) if value else 1
    except ValueError:
        raise ConfigError(f"GATEWAY_WORKERS: must be an integer (got {value!r})") from None
    return max(workers, 1)


class Lease:
    """An admitted request's hold on its key: one of the key's requests in flight until
    ``release``, which acts once however often it is called."""

    __slots__ = ("key", "_held")

    def __init__(self, key: KeyState) -> None:
        self.key = key
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.key.in_flight -= 1


class KeyState:
    """A client key as one worker sees it: its share of the limits and what is used of them."""

    __slots__ = (
        "name",
        "limited",
        "interval",
        "window",
        "burst",
        "max_concurrent",
        "in_flight",
        "tat",
        "_rate_text",
        "_busy_text",
        "_limit_text",
    )

    def __init__(self, name: str, limits: Limits, workers: int = 1) -> None:
        self.name = name
        rate = limits.requests_per_minute / workers
        burst = limits.burst or limits.requests_per_minute
        self.burst = math.ceil(burst / workers) if rate else 0
        self.interval = 60.0 / rate if rate else 0.0  # seconds between requests at the rate
        self.window = self.interval * self.burst
        self.max_concurrent = math.ceil(limits.max_concurrent / workers)
        self.limited = bool(rate or self.max_concurrent)
        self._limit_text = str(self.burst)
        self.in_flight = 0
        self.tat = 0.0
        share = f", this worker's 1/{workers} share" if workers > 1 else ""
        self._rate_text = f"{rate:g} requests per minute with a burst of {self.burst}{share}"
        self._busy_text = (
            f"key {name!r} already has {self.max_concurrent} requests in flight, its limit"
            f"{share}; retry when one has finished"
        )

    def admit(self, now: float) -> Lease:
        """Take a request at ``now`` (monotonic seconds), or raise ``LimitExceeded``.

        Returns the lease to release when the request is over. A refused request uses up
        nothing.
        """
        if self.max_concurrent and self.in_flight >= self.max_concurrent:
            raise LimitExceeded("concurrency", self._busy_text, 1)
        if self.interval:
            tat = (self.tat if self.tat > now else now) + self.interval
            early = tat - now - self.window
            if early > 1e-9:
                wait = max(math.ceil(early), 1)
                message = f"key {self.name!r} is limited to {self._rate_text}; retry in {wait} s"
                raise LimitExceeded("rate_limited", message, wait)
            self.tat = tat
        self.in_flight += 1
        return Lease(self)

    def remaining(self, now: float) -> int:
        """Requests this worker would admit at once right now, by the rate alone."""
        backlog = self.tat - now if self.tat > now else 0.0
        return int((self.window - backlog) / self.interval + 1e-9)

    def rate_headers(self, now: float, wall: float) -> list[tuple[str, str]]:
        """``anthropic-ratelimit-requests-*`` as the answering worker sees them: its burst,
        what is left of it, and when it is whole again (RFC 3339, rounded up to the second).
        Only for a key with a rate; ``wall`` is ``time.time()`` at ``now``."""
        backlog = self.tat - now if self.tat > now else 0.0
        return [
            ("anthropic-ratelimit-requests-limit", self._limit_text),
            ("anthropic-ratelimit-requests-remaining", str(self.remaining(now))),
            ("anthropic-ratelimit-requests-reset", _rfc3339(math.ceil(wall + backlog))),
        ]


_last_reset: tuple[int, str] = (0, time.strftime(RESET_FORMAT, time.gmtime(0)))


def _rfc3339(seconds: int) -> str:
    """UTC time of day, formatted once per second rather than once per request."""
    global _last_reset
    if _last_reset[0] != seconds:
        _last_reset = (seconds, time.strftime(RESET_FORMAT, time.gmtime(seconds)))
    return _last_reset[1]


def key_table(keys: Iterable[ClientKey], workers: int) -> dict[bytes, KeyState]:
    """Digest -> the key's state in this worker: what app.auth.identify looks keys up in."""
    return {key.sha256: KeyState(key.name, key.limits, workers) for key in keys}
