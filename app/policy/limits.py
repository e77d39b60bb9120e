"""A client key's limits as the store keeps them: what a request asks of them at admission,
what its end gives back, and the ``anthropic-ratelimit-*`` headers that describe them.

Every limit holds for the whole service, every worker and host (app/state):

- ``requests_per_minute`` with a ``burst``: a GCRA bucket of requests;
- ``input_tokens_per_minute`` and ``output_tokens_per_minute``: buckets of tokens, a minute's
  worth at most; a request reserves its estimated input and its ``max_tokens`` (as Anthropic's
  own output limits do), and its end gives back what it did not use, or takes what it used
  beyond the estimate;
- ``tokens_per_day`` and ``tokens_per_month``: input and output together, per UTC calendar day
  and month, reserved and corrected the same way;
- ``max_concurrent``: requests in flight, a stream until its last byte.

Pure: the standard library, app.config, app.errors and app.state.store only; the clock is
passed in.
"""

from __future__ import annotations

import calendar
import functools
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from app.config import ClientKey, Limits
from app.errors import RateLimited
from app.state.store import Ask, Bucket, Budget, Settlement, Standing, Verdict

RESET_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
HEADER_FAMILIES = {
    "requests": "requests",
    "input_tokens": "input-tokens",
    "output_tokens": "output-tokens",
}
# Why a request was refused, as the rejection metric counts it.
REASONS = {
    "requests": "rate_limited",
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "tokens_per_day": "tokens_per_day",
    "tokens_per_month": "tokens_per_month",
    "concurrent": "concurrency",
}


class LimitExceeded(RateLimited):
    """429 ``rate_limit_error`` that says which limit; ``reason`` feeds the rejection metric."""

    def __init__(self, reason: str, message: str, retry_after: float | None) -> None:
        headers = {"retry-after": str(max(math.ceil(retry_after), 1))} if retry_after else {}
        # A request that can never fit must not be retried: the SDKs obey x-should-retry.
        should_retry = False if retry_after is None else None
        super().__init__(message, headers=headers, should_retry=should_retry)
        self.reason = reason


@dataclass
class Reservation:
    """What an admitted request reserved, for its settlement."""

    key: str
    lease: str | None
    input_tokens: int
    output_tokens: int
    budgets: list[Budget] = field(default_factory=list)


class KeyPolicy:
    """One client key: its name, its limits as buckets and budgets, and whether it still
    opens the door."""

    __slots__ = (
        "name",
        "limits",
        "expires",
        "revoked",
        "limited",
        "requests",
        "input",
        "output",
    )

    def __init__(self, key: ClientKey) -> None:
        self.name = key.name
        self.limits = limits = key.limits
        self.expires = key.expires
        self.revoked = key.revoked
        self.limited = limits.any
        self.requests = _requests_bucket(limits)
        self.input = _token_bucket("input_tokens", limits.input_tokens_per_minute)
        self.output = _token_bucket("output_tokens", limits.output_tokens_per_minute)

    def refusal(self, now: float) -> str | None:
        """Why this key no longer opens the door, if it does not."""
        if self.revoked:
            return "this API key was revoked"
        if self.expires is not None and now >= self.expires:
            return "this API key has expired"
        return None

    def ask(self, input_estimate: int, max_tokens: int, now: float, lease_ttl: float) -> Ask:
        """What a request of this size asks of the key's limits at ``now`` (epoch seconds)."""
        takes: list[tuple[Bucket, float]] = []
        if self.requests is not None:
            takes.append((self.requests, 1))
        if self.input is not None:
            takes.append((self.input, input_estimate))
        if self.output is not None:
            takes.append((self.output, max_tokens))
        cost = input_estimate + max_tokens
        spends = [(budget, cost) for budget in budgets(self.limits, now)]
        return Ask(self.name, takes, spends, self.limits.max_concurrent, lease_ttl)

    def count_ask(self, lease_ttl: float) -> Ask:
        """What a token count asks: a request of the rate, and a slot while it runs; no
        tokens (counting spends none) and no budget."""
        takes: list[tuple[Bucket, float]] = []
        if self.requests is not None:
            takes.append((self.requests, 1))
        return Ask(self.name, takes, [], self.limits.max_concurrent, lease_ttl)

    def reservation(
        self, ask: Ask, verdict: Verdict, input_estimate: int, max_tokens: int
    ) -> Reservation:
        return Reservation(
            self.name, verdict.lease, input_estimate, max_tokens, [b for b, _ in ask.spends]
        )

    def refused(self, verdict: Verdict, max_tokens: int) -> LimitExceeded:
        """The 429 for a refusal, worded for the limit that refused."""
        name = verdict.refused or "requests"
        limits, key = self.limits, f"key {self.name!r}"
        wait = verdict.retry_after
        when = f"; retry in {max(math.ceil(wait), 1)} s" if wait else ""
        if name == "requests":
            burst = self.requests.capacity if self.requests else 0
            what = f"{limits.requests_per_minute:g} requests per minute (burst {burst:g})"
        elif name == "concurrent":
            return LimitExceeded(
                REASONS[name],
                f"{key} already has {limits.max_concurrent} requests in flight, its limit; "
                "retry when one has finished",
                1.0,
            )
        elif name in ("input_tokens", "output_tokens"):
            per_minute = getattr(limits, f"{name}_per_minute")
            what = f"{per_minute:,} {name.replace('_', ' ')} per minute"
            if wait is None:
                asked = "max_tokens" if name == "output_tokens" else "its estimated input"
                what += f", less than this request reserves ({asked}); send a smaller one"
        else:
            period = "daily" if name == "tokens_per_day" else "monthly"
            what = f"{period} budget of {getattr(limits, name):,} tokens"
            if wait is None:
                what += f", less than this request reserves (input and max_tokens {max_tokens:,})"
        return LimitExceeded(REASONS[name], f"{key} is over its {what}{when}", wait)


def settlement(
    reservation: Reservation,
    policy: KeyPolicy,
    used_input: int,
    used_output: int,
) -> Settlement:
    """The correction of what ``reservation`` took, given what the request really used; a
    bucket that took what was used has nothing to correct (a token count, which reserves and
    uses none, gives back only its slot)."""
    corrections: list[tuple[Bucket, float]] = []
    if policy.input is not None and reservation.input_tokens != used_input:
        corrections.append((policy.input, reservation.input_tokens - used_input))
    if policy.output is not None and reservation.output_tokens != used_output:
        corrections.append((policy.output, reservation.output_tokens - used_output))
    spent = used_input + used_output - reservation.input_tokens - reservation.output_tokens
    budget_corrections = [(budget, spent) for budget in reservation.budgets if spent]
    return Settlement(reservation.key, reservation.lease, corrections, budget_corrections)


def budgets(limits: Limits, now: float) -> list[Budget]:
    """The key's budgets for the calendar day and month (UTC) that ``now`` falls in."""
    found: list[Budget] = []
    if not (limits.tokens_per_day or limits.tokens_per_month):
        return found
    day, day_end, month, month_end = _calendar(int(now // 86400))
    if limits.tokens_per_day:
        found.append(Budget("tokens_per_day", day, limits.tokens_per_day, day_end - now))
    if limits.tokens_per_month:
        found.append(Budget("tokens_per_month", month, limits.tokens_per_month, month_end - now))
    return found


@functools.lru_cache(maxsize=4)
def _calendar(day_number: int) -> tuple[str, int, str, int]:
    """The UTC day ``day_number`` days after the epoch: its name and end, and its month's."""
    start = day_number * 86400
    moment = datetime.fromtimestamp(start, UTC)
    year, month = divmod(moment.year * 12 + moment.month, 12)  # the next month's
    month_end = calendar.timegm((year, month + 1, 1, 0, 0, 0))
    return moment.strftime("%Y-%m-%d"), start + 86400, moment.strftime("%Y-%m"), month_end


def rate_headers(standing: dict[str, Standing], wall: float) -> list[tuple[str, str]]:
    """``anthropic-ratelimit-*`` for the limits a key has: requests, input and output tokens,
    and ``tokens`` for whichever of the two has less left (RFC 3339 resets, rounded up)."""
    headers: list[tuple[str, str]] = []
    for name, family in HEADER_FAMILIES.items():
        state = standing.get(name)
        if state is not None:
            headers.extend(_family(family, state, wall))
    tokens = [standing[n] for n in ("input_tokens", "output_tokens") if n in standing]
    if tokens:
        headers.extend(_family("tokens", min(tokens, key=lambda s: s.remaining), wall))
    return headers


def key_table(keys: Iterable[ClientKey]) -> dict[bytes, KeyPolicy]:
    """Digest -> the key's policy: what app.policy.auth.identify looks keys up in."""
    return {key.sha256: KeyPolicy(key) for key in keys}


def _family(family: str, state: Standing, wall: float) -> list[tuple[str, str]]:
    prefix = f"anthropic-ratelimit-{family}"
    return [
        (f"{prefix}-limit", str(int(state.limit))),
        (f"{prefix}-remaining", str(int(state.remaining + 1e-9))),
        (f"{prefix}-reset", _rfc3339(math.ceil(wall + state.reset))),
    ]


def _requests_bucket(limits: Limits) -> Bucket | None:
    if not limits.requests_per_minute:
        return None
    burst = limits.burst or math.ceil(limits.requests_per_minute)
    return Bucket("requests", 60.0 / limits.requests_per_minute, burst)


def _token_bucket(name: str, per_minute: int) -> Bucket | None:
    return Bucket(name, 60.0 / per_minute, per_minute) if per_minute else None


_last_reset: tuple[int, str] = (0, time.strftime(RESET_FORMAT, time.gmtime(0)))


def _rfc3339(seconds: int) -> str:
    """UTC time of day, formatted once per second rather than once per request."""
    global _last_reset
    if _last_reset[0] != seconds:
        _last_reset = (seconds, time.strftime(RESET_FORMAT, time.gmtime(seconds)))
    return _last_reset[1]
