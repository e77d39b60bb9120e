"""The state store's two engines, against the same expectations: SQLite in a temporary state
directory, and a real redis-server on 127.0.0.1."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from app.state import sqlite_store
from app.state.sqlite_store import FILE, SQLiteStore
from app.state.store import (
    THREAD_ALREADY_CONTINUED,
    THREAD_FOUND,
    THREAD_IN_FLIGHT,
    THREAD_NOT_FOUND,
    Ask,
    Bucket,
    Budget,
    Settlement,
    StoreUnavailable,
    Usage,
)

ROOT = Path(__file__).resolve().parents[2]

REQUESTS = Bucket("requests", per=0.5, capacity=3)  # 120 a minute, three at once
TOKENS = Bucket("output_tokens", per=60 / 6000, capacity=6000)  # 6000 a minute


def test_a_rested_key_gets_its_burst_then_waits(store):
    for _ in range(3):
        assert store.admit(Ask("k", takes=[(REQUESTS, 1)])).admitted
    refused = store.admit(Ask("k", takes=[(REQUESTS, 1)]))
    assert not refused.admitted and refused.refused == "requests"
    assert 0 < refused.retry_after <= 0.5
    time.sleep(refused.retry_after + 0.02)
    assert store.admit(Ask("k", takes=[(REQUESTS, 1)])).admitted


def test_keys_are_apart(store):
    for _ in range(3):
        store.admit(Ask("a", takes=[(REQUESTS, 1)]))
    assert not store.admit(Ask("a", takes=[(REQUESTS, 1)])).admitted
    assert store.admit(Ask("b", takes=[(REQUESTS, 1)])).admitted


def test_the_standing_says_what_is_left_and_when_it_is_whole(store):
    verdict = store.admit(Ask("k", takes=[(REQUESTS, 1), (TOKENS, 1500)]))
    assert verdict.standing["requests"].remaining == pytest.approx(2, abs=0.01)
    assert verdict.standing["requests"].reset == pytest.approx(0.5, abs=0.05)
    assert verdict.standing["output_tokens"].remaining == pytest.approx(4500, abs=5)
    assert verdict.standing["output_tokens"].limit == 6000


def test_a_refusal_takes_nothing_from_any_limit(store):
    assert store.admit(Ask("k", takes=[(TOKENS, 5000)])).admitted
    refused = store.admit(Ask("k", takes=[(REQUESTS, 1), (TOKENS, 2000)]))
    assert refused.refused == "output_tokens"
    assert store.admit(Ask("k", takes=[(REQUESTS, 1)] * 1)).standing["requests"].remaining == (
        pytest.approx(2, abs=0.01)
    )


def test_a_cost_over_the_capacity_can_never_fit(store):
    refused = store.admit(Ask("k", takes=[(TOKENS, 6001)]))
    assert refused.refused == "output_tokens" and refused.retry_after is None


def test_settling_gives_back_what_was_reserved_too_much(store):
    assert store.admit(Ask("k", takes=[(TOKENS, 6000)])).admitted  # max_tokens reserved
    assert not store.admit(Ask("k", takes=[(TOKENS, 100)])).admitted
    store.settle(Settlement("k", None, corrections=[(TOKENS, 5900)]))  # only 100 were used
    verdict = store.admit(Ask("k", takes=[(TOKENS, 100)]))
    assert verdict.admitted
    assert verdict.standing["output_tokens"].remaining == pytest.approx(5800, abs=10)


def test_settling_takes_what_was_reserved_too_little(store):
    assert store.admit(Ask("k", takes=[(TOKENS, 100)])).admitted
    store.settle(Settlement("k", None, corrections=[(TOKENS, -5800)]))  # 5900 were used
    refused = store.admit(Ask("k", takes=[(TOKENS, 200)]))
    assert refused.refused == "output_tokens"


def test_concurrency_holds_a_slot_until_settled(store):
    first = store.admit(Ask("k", max_concurrent=1))
    assert first.admitted and first.lease
    refused = store.admit(Ask("k", max_concurrent=1))
    assert refused.refused == "concurrent"
    assert store.in_flight(["k", "other"]) == {"k": 1, "other": 0}
    store.settle(Settlement("k", first.lease))
    assert store.in_flight(["k"]) == {"k": 0}
    assert store.admit(Ask("k", max_concurrent=1)).admitted


def test_a_lease_left_behind_expires(store):
    assert store.admit(Ask("k", max_concurrent=1, lease_ttl=0.2)).admitted
    assert not store.admit(Ask("k", max_concurrent=1)).admitted
    time.sleep(0.3)  # the worker holding it died: its slot comes back by itself
    assert store.admit(Ask("k", max_concurrent=1)).admitted


def test_a_budget_admits_until_spent_and_is_corrected_at_the_end(store):
    day = Budget("tokens_per_day", "2026-12-01", limit=1000, ends_in=3600)
    assert store.admit(Ask("k", spends=[(day, 800)])).admitted
    refused = store.admit(Ask("k", spends=[(day, 300)]))
    assert refused.refused == "tokens_per_day" and refused.retry_after == 3600
    store.settle(Settlement("k", None, budget_corrections=[(day, -500)]))  # 300 used, not 800
    verdict = store.admit(Ask("k", spends=[(day, 300)]))
    assert verdict.admitted and verdict.standing["tokens_per_day"].remaining == 400
    other_day = Budget("tokens_per_day", "2026-12-02", limit=1000, ends_in=7200)
    assert store.admit(Ask("k", spends=[(other_day, 1000)])).admitted


def test_usage_adds_up_per_key_model_and_day(store):
    for key, model, tokens, error in [
        ("alice", "m1", (10, 5, 2), False),
        ("alice", "m1", (20, 7, 0), True),
        ("alice", "m2", (1, 1, 0), False),
        ("bob", "m1", (3, 4, 1), False),
    ]:
        store.add_usage([Usage("2026-12-01", key, model, *tokens, errors=int(error))])
    store.add_usage(
        [
            Usage("2026-11-30", "alice", "m1", 9, 9, 9),
            Usage("2026-11-30", "bob", "m2", 1, 1, 1, requests=4, errors=2),  # a worker's sum
        ]
    )
    rows = store.usage("2026-12-01", "2026-12-01", None, None)
    table = {
        (r.key, r.model): (r.requests, r.input_tokens, r.output_tokens, r.cached_tokens, r.errors)
        for r in rows
    }
    assert table == {
        ("alice", "m1"): (2, 30, 12, 2, 1),
        ("alice", "m2"): (1, 1, 1, 0, 0),
        ("bob", "m1"): (1, 3, 4, 1, 0),
    }
    assert [
        (r.requests, r.errors) for r in store.usage("2026-11-30", "2026-11-30", "bob", None)
    ] == [(4, 2)]
    assert [r.day for r in store.usage("2026-11-01", "2026-12-31", "alice", "m1")] == [
        "2026-11-30",
        "2026-12-01",
    ]


def test_a_thread_is_continued_once(store):
    store.put_thread("msg_1", "alice", b'{"messages": []}', ttl=60)
    assert store.claim_thread("msg_1", "bob", hold=5) == (THREAD_NOT_FOUND, None)  # not theirs
    assert store.claim_thread("msg_1", "alice", hold=5) == (THREAD_FOUND, b'{"messages": []}')
    assert store.claim_thread("msg_1", "alice", hold=5)[0] == THREAD_IN_FLIGHT
    store.finish_thread("msg_1", "msg_2", "alice", b'{"messages": [1]}', ttl=60)
    assert store.claim_thread("msg_1", "alice", hold=5)[0] == THREAD_ALREADY_CONTINUED
    assert store.claim_thread("msg_2", "alice", hold=5) == (THREAD_FOUND, b'{"messages": [1]}')
    assert store.claim_thread("msg_9", "alice", hold=5)[0] == THREAD_NOT_FOUND


def test_a_failed_continue_can_be_tried_again(store):
    store.put_thread("msg_1", "alice", b"{}", ttl=60)
    assert store.claim_thread("msg_1", "alice", hold=5)[0] == THREAD_FOUND
    store.release_thread("msg_1")
    assert store.claim_thread("msg_1", "alice", hold=5)[0] == THREAD_FOUND


def test_a_thread_expires(store):
    store.put_thread("msg_1", "alice", b"{}", ttl=0.2)
    time.sleep(0.3)
    assert store.claim_thread("msg_1", "alice", hold=5)[0] == THREAD_NOT_FOUND


# --- opening one state directory from several processes at once -------------------------------

# What the gunicorn master runs at start (gunicorn.conf.py), once the test lets it go: it says
# "ready" when imported, waits for its stdin to close, then prints the problem or "ok".
MASTER_AT_START = """
import sys
from app.config import StateSettings
from app.state.open import prepare
print("ready", flush=True)
sys.stdin.read()
print(prepare(StateSettings(directory=sys.argv[1])) or "ok", flush=True)
"""


def open_at_once(directory: Path, processes: int) -> list[str]:
    """What each of ``processes`` masters starting together on ``directory`` reports."""
    masters = [
        subprocess.Popen(
            [sys.executable, "-c", MASTER_AT_START, str(directory)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    try:
        for master in masters:
            assert master.stdout.readline().strip() == "ready"
        for master in masters:  # the barrier: every one is blocked on its stdin until now
            master.stdin.close()
        return [master.stdout.read().strip() for master in masters]
    finally:
        for master in masters:
            master.kill()
            master.wait()
            master.stdout.close()
            master.stdin.close()


def test_gateways_starting_together_on_one_fresh_state_directory_all_open_it(tmp_path):
    """Several gateways on one host (a systemd template's instances, a restart of several
    services) make the directory's schema at the same moment: each waits its turn for the
    lock that switching to WAL and making the tables take, and none exits at start."""
    for attempt in range(3):
        directory = tmp_path / f"attempt{attempt}"
        assert open_at_once(directory, 8) == ["ok"] * 8
        db = sqlite3.connect(directory / FILE)
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        db.close()


def hold_the_write_lock(directory: Path) -> Callable[[], None]:
    """Another process's write, as SQLite sees it: a connection of its own holding an
    exclusive lock on the (fresh) database until the function returned is called."""
    os.makedirs(directory, exist_ok=True)
    holder = sqlite3.connect(directory / FILE, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")

    def release() -> None:
        holder.execute("ROLLBACK")
        holder.close()

    return release


def test_opening_waits_while_another_process_holds_the_write_lock(tmp_path):
    release = hold_the_write_lock(tmp_path)
    opening = threading.Event()
    opened: list[SQLiteStore | Exception] = []

    def open_store() -> None:
        opening.set()
        try:
            opened.append(SQLiteStore(str(tmp_path)))
        except Exception as exc:  # noqa: BLE001 - the test says what it was
            opened.append(exc)

    opener = threading.Thread(target=open_store)
    opener.start()
    try:
        opening.wait(30)
        time.sleep(0.5)  # the opener meets the lock meanwhile (if slower, it waits less)
        assert opened == []  # still waiting: neither open nor given up
    finally:
        release()
        opener.join(30)
    (store,) = opened
    assert isinstance(store, SQLiteStore), store
    assert store.admit(Ask("k", takes=[(REQUESTS, 1)])).admitted
    store.close()


def test_opening_gives_up_with_the_reason_once_its_wait_is_over(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "OPEN_WAIT", 0.2)
    release = hold_the_write_lock(tmp_path)  # held until the open has given up
    try:
        with pytest.raises(
            StoreUnavailable, match="cannot open the state store .*: database is locked"
        ):
            SQLiteStore(str(tmp_path))
    finally:
        release()


def test_an_older_usage_table_keeps_its_records_and_gains_the_batch_counts(tmp_path: Path):
    with sqlite3.connect(tmp_path / FILE) as db:
        db.execute(
            "CREATE TABLE usage (day TEXT NOT NULL, key TEXT NOT NULL, model TEXT NOT NULL, "
            "requests INTEGER NOT NULL DEFAULT 0, input_tokens INTEGER NOT NULL DEFAULT 0, "
            "output_tokens INTEGER NOT NULL DEFAULT 0, cached_tokens INTEGER NOT NULL DEFAULT 0, "
            "errors INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (day, key, model)) WITHOUT ROWID"
        )
        db.execute("INSERT INTO usage VALUES ('2026-12-01', 'alice', 'm', 3, 30, 9, 0, 1)")
    store = SQLiteStore(str(tmp_path))
    try:
        batch = Usage("2026-12-01", "alice", "m", 10, 4, batch_requests=1)
        batch.batch_input_tokens, batch.batch_output_tokens = 10, 4
        store.add_usage([batch])
        (row,) = store.usage("2026-12-01", "2026-12-01", None, None)
    finally:
        store.close()
    assert (row.requests, row.input_tokens, row.output_tokens, row.errors) == (4, 40, 13, 1)
    assert (row.batch_requests, row.batch_input_tokens, row.batch_output_tokens) == (1, 10, 4)
