"""Per-key limits, pure (app/policy/limits.py): what a key's limits ask of the store and how
their refusals read. The same limits, exact across gunicorn's workers:
tests/system/test_limits_gunicorn.py."""

from __future__ import annotations

import calendar
import time
from typing import Any

import pytest

from app.config import ClientKey, Limits
from app.policy.limits import KeyPolicy, budgets, rate_headers, settlement
from app.state.store import Standing, Verdict


def policy(**limits: Any) -> KeyPolicy:
    return KeyPolicy(ClientKey("k", b"\0" * 32, Limits(**limits)))


def at(text: str) -> float:
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))


# --- what a request asks, and how a refusal reads --------------------------------------------


def test_a_request_reserves_its_estimated_input_and_its_max_tokens() -> None:
    key = policy(
        requests_per_minute=60,
        burst=5,
        input_tokens_per_minute=10_000,
        output_tokens_per_minute=2_000,
        tokens_per_day=100_000,
        max_concurrent=2,
    )
    ask = key.ask(300, 1_000, at("2026-12-01T10:00:00"), lease_ttl=900)
    assert [(bucket.name, cost) for bucket, cost in ask.takes] == [
        ("requests", 1),
        ("input_tokens", 300),
        ("output_tokens", 1_000),
    ]
    requests_bucket = ask.takes[0][0]
    assert requests_bucket.per == 1.0 and requests_bucket.capacity == 5
    assert [(budget.period, cost) for budget, cost in ask.spends] == [("2026-12-01", 1_300)]
    assert ask.max_concurrent == 2 and ask.lease_ttl == 900


def test_budgets_are_the_utc_calendar_day_and_month() -> None:
    limits = Limits(tokens_per_day=1, tokens_per_month=2)
    day, month = budgets(limits, at("2026-12-31T23:59:00"))
    assert (day.period, day.ends_in) == ("2026-12-31", 60)
    assert (month.period, month.ends_in) == ("2026-12", 60)  # December ends with the year
    assert day.keep == 60 + 86400  # the count outlives its period by a day
    _, month = budgets(limits, at("2027-02-10T00:00:00"))
    assert (month.period, month.ends_in) == ("2027-02", 19 * 86400)  # to 1 March


def test_a_key_without_limits_asks_nothing() -> None:
    key = policy()
    assert not key.limited
    ask = key.ask(10, 10, time.time(), 900)
    assert ask.takes == [] and ask.spends == [] and ask.max_concurrent == 0


@pytest.mark.parametrize(
    ("refused", "wait", "limits", "words", "retry_after"),
    [
        ("requests", 2.2, {"requests_per_minute": 60, "burst": 2}, "60 requests per minute", "3"),
        ("concurrent", 1.0, {"max_concurrent": 3}, "already has 3 requests in flight", "1"),
        ("output_tokens", 5, {"output_tokens_per_minute": 100}, "100 output tokens per", "5"),
        ("output_tokens", None, {"output_tokens_per_minute": 100}, "send a smaller one", None),
        ("input_tokens", 1, {"input_tokens_per_minute": 900}, "900 input tokens per minute", "1"),
        ("tokens_per_day", 3600, {"tokens_per_day": 5000}, "daily budget of 5,000", "3600"),
        ("tokens_per_month", None, {"tokens_per_month": 10}, "monthly budget of 10", None),
    ],
)
def test_a_refusal_names_its_limit_and_when_to_retry(
    refused: str, wait: float | None, limits: dict, words: str, retry_after: str | None
) -> None:
    error = policy(**limits).refused(Verdict(False, refused=refused, retry_after=wait), 50)
    assert error.status == 429 and error.error_type == "rate_limit_error"
    assert words in error.message and "'k'" in error.message
    assert error.headers.get("retry-after") == retry_after
    # A request that can never fit must not be retried (the SDKs honour x-should-retry).
    assert error.headers.get("x-should-retry") == (None if retry_after else "false")


def test_rate_headers_describe_each_family_and_tokens_is_the_scarcer() -> None:
    wall = at("2026-12-01T10:00:00")
    headers = dict(
        rate_headers(
            {
                "requests": Standing(10, 9, 6.0),
                "input_tokens": Standing(1000, 700, 18.2),
                "output_tokens": Standing(500, 120, 45.0),
                "tokens_per_day": Standing(10**6, 10**5, 50_000),
            },
            wall,
        )
    )
    assert headers["anthropic-ratelimit-requests-limit"] == "10"
    assert headers["anthropic-ratelimit-requests-remaining"] == "9"
    assert headers["anthropic-ratelimit-requests-reset"] == "2026-12-01T10:00:06Z"
    assert headers["anthropic-ratelimit-input-tokens-reset"] == "2026-12-01T10:00:19Z"  # up
    assert headers["anthropic-ratelimit-output-tokens-remaining"] == "120"
    assert headers["anthropic-ratelimit-tokens-remaining"] == "120"
    assert headers["anthropic-ratelimit-tokens-limit"] == "500"


def test_settlement_gives_back_the_unused_reservation_and_takes_the_overrun() -> None:
    key = policy(input_tokens_per_minute=1000, output_tokens_per_minute=1000, tokens_per_day=10**6)
    ask = key.ask(100, 500, time.time(), 900)
    reservation = key.reservation(ask, Verdict(True, lease="l1"), 100, 500)
    settled = settlement(reservation, key, used_input=130, used_output=20)
    assert settled.lease == "l1"
    assert [(b.name, units) for b, units in settled.corrections] == [
        ("input_tokens", -30),  # 30 more than estimated: taken
        ("output_tokens", 480),  # 480 of max_tokens unused: given back
    ]
    assert [tokens for _, tokens in settled.budget_corrections] == [130 + 20 - 600]


def test_a_revoked_or_expired_key_no_longer_opens_the_door() -> None:
    now = time.time()
    assert KeyPolicy(ClientKey("k", b"", Limits(), revoked=True)).refusal(now) == (
        "this API key was revoked"
    )
    expired = KeyPolicy(ClientKey("k", b"", Limits(), expires=now - 1))
    assert expired.refusal(now) == "this API key has expired"
    assert KeyPolicy(ClientKey("k", b"", Limits(), expires=now + 60)).refusal(now) is None
