"""The console's pure parts: what a form's limits and expiry mean, the CSRF token's tie to
its session, and the Overview's series read from the store's counts."""

from __future__ import annotations

import calendar
import time
from pathlib import Path

import pytest

from app.console import keyring, live
from app.console.sessions import csrf_ok, csrf_token, stored_id, token_digest
from app.keys import KeysFileError
from app.state.guard import GuardedStore
from app.state.sqlite_store import SQLiteStore
from app.state.store import Tally, Usage


def test_a_form_s_limits_are_numbers_and_empty_or_zero_means_none() -> None:
    form = {
        "requests_per_minute": "60",
        "burst": "",
        "tokens_per_day": "2.5",
        "max_concurrent": "0",
    }
    assert keyring.limits_from(form) == {"requests_per_minute": 60, "tokens_per_day": 2.5}


@pytest.mark.parametrize("value", ["lots", "-1", "nan", "inf"])
def test_a_limit_that_is_not_a_count_is_refused_with_its_field(value: str) -> None:
    with pytest.raises(KeysFileError, match="max_concurrent"):
        keyring.limits_from({"max_concurrent": value})


def test_an_expiry_day_is_the_end_of_that_utc_day_and_empty_is_never() -> None:
    end = keyring.expiry_from({"expires": "2027-01-31"})
    assert end == calendar.timegm((2027, 2, 1, 0, 0, 0)) - 1
    assert keyring.expiry_from({"expires": ""}) is None
    with pytest.raises(KeysFileError):
        keyring.expiry_from({"expires": "31/01/2027"})


def test_a_csrf_token_belongs_to_its_session_alone() -> None:
    token = csrf_token("session-a")
    assert csrf_ok("session-a", token)
    assert not csrf_ok("session-b", token) and not csrf_ok("session-a", "")


def test_what_the_store_keeps_opens_nothing_by_itself() -> None:
    assert stored_id("abc") != "abc" and len(stored_id("abc")) == 64
    assert token_digest("t1") != token_digest("t2") and "t1" not in token_digest("t1")


def test_the_overview_series_sum_minutes_into_hours_and_days_into_thirty(tmp_path: Path) -> None:
    store = GuardedStore(lambda: SQLiteStore(str(tmp_path)))
    now = time.time()
    minute = int(now) // 60
    store.add_tallies([Tally(minute, requests=2, errors=1), Tally(minute - 1, requests=3)])
    store.add_tallies([Tally(minute - 120, requests=5, input_tokens=7)])
    hour = live.series(store, "hour", now)
    assert len(hour["t"]) == 60 and sum(hour["requests"]) == 5 and sum(hour["errors"]) == 1
    day = live.series(store, "day", now)
    assert len(day["t"]) == 24 and live.totals(day)["requests"] == 10
    assert live.totals(day)["input_tokens"] == 7
    today = time.strftime("%Y-%m-%d", time.gmtime(now))
    store.add_usage([Usage(today, "k", "m", input_tokens=4, output_tokens=6, requests=9)])
    month = live.series(store, "month", now)
    assert len(month["t"]) == 30 and month["requests"][-1] == 9 and month["output_tokens"][-1] == 6
    store.close()
