"""The store's parts for the console, against both engines (the ``store`` fixture of
tests/system/conftest.py): console sessions, bounded logs and the per-minute counts."""

from __future__ import annotations

import time

import pytest

from app.state.store import TALLY_KEEP, Tally


def test_a_session_holds_for_its_token_and_its_idle_time_starts_again_on_use(store):
    store.start_session("s1", "digest-a", idle=0.6, absolute=60)
    for _ in range(3):
        time.sleep(0.3)
        assert store.check_session("s1", "digest-a", idle=0.6)
    time.sleep(0.8)
    assert not store.check_session("s1", "digest-a", idle=0.6)


def test_a_session_ends_at_its_absolute_lifetime_however_busy(store):
    store.start_session("s1", "d", idle=10, absolute=0.5)
    assert store.check_session("s1", "d", idle=10)
    time.sleep(0.7)
    assert not store.check_session("s1", "d", idle=10)


def test_a_session_of_another_admin_token_is_refused_and_gone(store):
    store.start_session("s1", "old", idle=10, absolute=60)
    assert not store.check_session("s1", "new", idle=10)
    assert not store.check_session("s1", "old", idle=10)  # refused once, gone for good


def test_an_ended_or_unknown_session_is_refused(store):
    store.start_session("s1", "d", idle=10, absolute=60)
    store.start_session("s2", "d", idle=10, absolute=60)
    store.end_session("s1")
    assert not store.check_session("s1", "d", idle=10)
    assert not store.check_session("nope", "d", idle=10)
    assert store.check_session("s2", "d", idle=10)


def test_a_log_keeps_its_newest_entries_newest_first(store):
    store.append_log("errors", [f'{{"n": {i}}}' for i in range(5)], keep=4)
    store.append_log("errors", ['{"n": 5}', '{"n": 6}'], keep=4)
    store.append_log("audit", ['{"what": "x"}'], keep=4)
    assert store.read_log("errors", 10) == [f'{{"n": {i}}}' for i in (6, 5, 4, 3)]
    assert store.read_log("errors", 2) == ['{"n": 6}', '{"n": 5}']
    assert store.read_log("audit", 10) == ['{"what": "x"}']
    assert store.read_log("none", 10) == []


def test_minute_tallies_add_up_and_are_read_from_a_minute_on(store):
    now = int(time.time()) // 60
    store.add_tallies(
        [Tally(now - 2, requests=1, errors=1), Tally(now, requests=2, input_tokens=5)]
    )
    store.add_tallies([Tally(now, requests=1, output_tokens=7, cached_tokens=3)])
    assert store.tallies(now - 1) == [
        Tally(now, requests=3, input_tokens=5, output_tokens=7, cached_tokens=3)
    ]
    assert [t.minute for t in store.tallies(now - 10)] == [now - 2, now]


def test_minutes_older_than_the_tallies_keep_are_dropped(store):
    if type(store).__name__ == "RedisStore":
        pytest.skip("Redis expires each minute's hash by itself (TALLY_KEEP after its write)")
    now = int(time.time()) // 60
    old = now - TALLY_KEEP // 60 - 5
    store.add_tallies([Tally(old, requests=1)])
    store.add_tallies([Tally(now, requests=1)])
    assert [t.minute for t in store.tallies(old - 1)] == [now]
