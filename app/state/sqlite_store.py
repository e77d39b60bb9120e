"""The embedded engine: one SQLite file in the state directory, shared by every worker on the
host.

WAL mode lets readers work beside the one writer; every operation is one short ``BEGIN
IMMEDIATE`` transaction, so two workers admitting for the same key see each other's writes in
order. SQLite's own busy handler would sleep inside the C library and stall a gevent worker's
whole event loop, so the busy timeout is zero and a locked database is waited for here, with
``time.sleep`` (gevent's, in a worker), for at most ``LOCK_WAIT`` seconds in all.

Opening waits its turn the same way, for up to ``OPEN_WAIT``: several gateways started at once
on one directory (instances of one systemd template, a restart of several services) all switch
the file to WAL, which takes a lock, and make the schema, which writes. The schema is made in
one ``BEGIN IMMEDIATE`` so that a process takes the write lock before it reads anything (a
read upgraded to a write can be refused outright, whatever the wait) and never sees half of it.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from app.state.sqlite_batches import BATCH_SCHEMA, SQLiteBatches
from app.state.store import (
    THREAD_ALREADY_CONTINUED,
    THREAD_FOUND,
    THREAD_IN_FLIGHT,
    THREAD_NOT_FOUND,
    USAGE_COUNTS,
    Ask,
    Placed,
    Placement,
    Settlement,
    Store,
    StoreUnavailable,
    Usage,
    UsageRow,
    Verdict,
    budget_standing,
    choose,
    lease_id,
    standing,
    take,
)

T = TypeVar("T")
FILE = "gateway.sqlite3"
LOCK_WAIT = 2.0
# The memory of conversations is trimmed (expired entries, then the oldest beyond its size) on
# one write in TRIM_EVERY per process: a trim scans, a write need not.
TRIM_EVERY = 64
# Longer than an operation's wait: at start, every process on the host may be opening at once.
OPEN_WAIT = 10.0
# WITHOUT ROWID: each table is one b-tree on its primary key (a rowid table would keep a
# second one for the key's index), so a commit writes about half the pages.
SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS buckets (
    key TEXT NOT NULL, name TEXT NOT NULL, tat REAL NOT NULL, PRIMARY KEY (key, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    key TEXT NOT NULL, id TEXT NOT NULL, expires REAL NOT NULL, PRIMARY KEY (key, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS budgets (
    key TEXT NOT NULL, period TEXT NOT NULL, used INTEGER NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (key, period)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL, key TEXT NOT NULL, model TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0, input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0, cached_tokens INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (day, key, model)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS threads (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, body BLOB NOT NULL, expires REAL NOT NULL,
    continued INTEGER NOT NULL DEFAULT 0, claimed_until REAL NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS threads_by_expiry ON threads (expires);
CREATE TABLE IF NOT EXISTS flights (
    backend TEXT NOT NULL, id TEXT NOT NULL, expires REAL NOT NULL, PRIMARY KEY (backend, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS affinity (
    key TEXT PRIMARY KEY, backend TEXT NOT NULL, expires REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS affinity_by_expiry ON affinity (expires);
"""
# One statement at a time, inside one transaction (``executescript`` would commit it first).
SCHEMA = tuple(s.strip() for s in SCHEMA_SQL.split(";") if s.strip())


ADD_USAGE = (
    f"INSERT INTO usage (day, key, model, {', '.join(USAGE_COUNTS)}) "
    f"VALUES (?, ?, ?, {', '.join('?' * len(USAGE_COUNTS))}) "
    "ON CONFLICT (day, key, model) DO UPDATE SET "
    + ", ".join(f"{name} = {name} + excluded.{name}" for name in USAGE_COUNTS)
)
# Columns a usage table made by an older release lacks, added when the store opens.
ADDED_USAGE_COLUMNS = ("batch_requests", "batch_input_tokens", "batch_output_tokens")


class SQLiteStore(Store, SQLiteBatches):
    def __init__(self, directory: str, clock: Callable[[], float] = time.time) -> None:
        self.path = os.path.join(directory, FILE)
        self.clock = clock
        self.lock = threading.Lock()  # one connection per process; gevent's lock in a worker
        self.writes = itertools.count(1)
        try:
            os.makedirs(directory, exist_ok=True)
            self.db = sqlite3.connect(
                self.path, timeout=0, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open the state store {self.path}: {exc}") from None
        try:
            self._retry(self._prepare, OPEN_WAIT, "cannot open the state store")
        except StoreUnavailable:
            self.db.close()
            raise

    def _prepare(self) -> None:
        """WAL mode and the schema; run again from the start if another process holds a lock."""
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        with self._begun():
            for statement in SCHEMA + BATCH_SCHEMA:
                self.db.execute(statement)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(usage)")}
            for name in ADDED_USAGE_COLUMNS:
                if name not in columns:
                    self.db.execute(
                        f"ALTER TABLE usage ADD COLUMN {name} INTEGER NOT NULL DEFAULT 0"
                    )

    # --- limits -----------------------------------------------------------------------------

    def admit(self, ask: Ask) -> Verdict:
        return self._transaction(lambda db: self._admit(db, ask, self.clock()))

    def _admit(self, db: sqlite3.Connection, ask: Ask, now: float) -> Verdict:
        verdict = Verdict(admitted=True)
        updates: list[tuple[str, float]] = []
        for bucket, cost in ask.takes:
            row = db.execute(
                "SELECT tat FROM buckets WHERE key = ? AND name = ?", (ask.key, bucket.name)
            ).fetchone()
            tat = row[0] if row else 0.0
            new, wait = take(tat, now, bucket, cost)
            verdict.standing[bucket.name] = standing(new if new is not None else tat, now, bucket)
            if new is None:
                return _refused(verdict, bucket.name, wait)
            updates.append((bucket.name, new))
        if ask.spends:
            db.execute("DELETE FROM budgets WHERE key = ? AND expires <= ?", (ask.key, now))
        for budget, cost in ask.spends:
            row = db.execute(
                "SELECT used FROM budgets WHERE key = ? AND period = ?", (ask.key, budget.period)
            ).fetchone()
            used = row[0] if row else 0
            if used + cost > budget.limit:
                verdict.standing[budget.name] = budget_standing(budget, used)
                never = cost > budget.limit
                return _refused(verdict, budget.name, None if never else budget.ends_in)
            verdict.standing[budget.name] = budget_standing(budget, used + cost)
        if ask.max_concurrent:
            count = "SELECT COUNT(*) FROM leases WHERE key = ?"
            (held,) = db.execute(count, (ask.key,)).fetchone()
            if held >= ask.max_concurrent:
                # Only at the limit are the leases of dead workers worth looking for.
                db.execute("DELETE FROM leases WHERE key = ? AND expires <= ?", (ask.key, now))
                (held,) = db.execute(count, (ask.key,)).fetchone()
            if held >= ask.max_concurrent:
                return _refused(verdict, "concurrent", 1.0)
            verdict.lease = lease_id()
            db.execute(
                "INSERT INTO leases (key, id, expires) VALUES (?, ?, ?)",
                (ask.key, verdict.lease, now + ask.lease_ttl),
            )
        for name, tat in updates:
            db.execute(
                "INSERT INTO buckets (key, name, tat) VALUES (?, ?, ?) "
                "ON CONFLICT (key, name) DO UPDATE SET tat = excluded.tat",
                (ask.key, name, tat),
            )
        for budget, cost in ask.spends:
            _add_to_budget(db, ask.key, budget.period, cost, now + budget.keep)
        return verdict

    def settle(self, settlement: Settlement) -> None:
        self._transaction(lambda db: self._settle(db, settlement, self.clock()))

    def _settle(self, db: sqlite3.Connection, settlement: Settlement, now: float) -> None:
        key = settlement.key
        if settlement.lease is not None:
            db.execute("DELETE FROM leases WHERE key = ? AND id = ?", (key, settlement.lease))
        for bucket, units in settlement.corrections:
            # Give back (or take more of) what the admission reserved: ``tat`` moves by it,
            # from now if the bucket has been whole again since.
            db.execute(
                "UPDATE buckets SET tat = MAX(tat, ?) - ? WHERE key = ? AND name = ?",
                (now, units * bucket.per, key, bucket.name),
            )
        for budget, tokens in settlement.budget_corrections:
            _add_to_budget(db, key, budget.period, tokens, now + budget.keep)

    def add_usage(self, records: list[Usage]) -> None:
        rows = [
            (u.day, u.key, u.model, *(getattr(u, name) for name in USAGE_COUNTS)) for u in records
        ]
        self._transaction(lambda db: db.executemany(ADD_USAGE, rows))

    def usage(self, since: str, until: str, key: str | None, model: str | None) -> list[UsageRow]:
        query = f"SELECT day, key, model, {', '.join(USAGE_COUNTS)} FROM usage "
        query += "WHERE day >= ? AND day <= ?"
        args: list[Any] = [since, until]
        if key is not None:
            query += " AND key = ?"
            args.append(key)
        if model is not None:
            query += " AND model = ?"
            args.append(model)
        query += " ORDER BY day, key, model"
        rows = self._locked(lambda: self.db.execute(query, args).fetchall())
        return [UsageRow(*row) for row in rows]

    def in_flight(self, keys: list[str]) -> dict[str, int]:
        now = self.clock()
        query = "SELECT key, COUNT(*) FROM leases WHERE expires > ? GROUP BY key"
        found = dict(self._locked(lambda: self.db.execute(query, (now,)).fetchall()))
        return {key: found.get(key, 0) for key in keys}

    # --- placement on backends ---------------------------------------------------------------

    def place(self, placement: Placement) -> Placed:
        return self._transaction(lambda db: self._place(db, placement, self.clock()))

    def _place(self, db: sqlite3.Connection, placement: Placement, now: float) -> Placed:
        candidates = placement.candidates
        marks = ",".join("?" * len(candidates))
        loads = dict.fromkeys(candidates, 0)
        counted = db.execute(
            f"SELECT backend, COUNT(*) FROM flights WHERE backend IN ({marks}) AND expires > ? "
            "GROUP BY backend",
            (*candidates, now),
        )
        loads.update(counted.fetchall())
        known, by_session = self._recall(db, placement, now)
        backend, routed = choose(placement, loads, known, by_session)
        lease = lease_id()
        db.execute(
            "INSERT INTO flights (backend, id, expires) VALUES (?, ?, ?)",
            (backend, lease, now + placement.lease_ttl),
        )
        self._remember(db, placement.remember, backend, now + placement.memory_ttl)
        if next(self.writes) % TRIM_EVERY == 0:
            self._trim(db, now, placement.max_entries)
        return Placed(backend, lease, routed, loads)

    def _recall(
        self, db: sqlite3.Connection, placement: Placement, now: float
    ) -> tuple[str | None, bool]:
        """The backend of the longest known prefix, else of the session, and which it was."""
        keys = placement.lookups + ([placement.session] if placement.session else [])
        if not keys:
            return None, False
        marks = ",".join("?" * len(keys))
        found = dict(
            db.execute(
                f"SELECT key, backend FROM affinity WHERE key IN ({marks}) AND expires > ?",
                (*keys, now),
            ).fetchall()
        )
        for key in placement.lookups:
            if key in found:
                return found[key], False
        if placement.session and placement.session in found:
            return found[placement.session], True
        return None, False

    def _remember(
        self, db: sqlite3.Connection, keys: list[str], backend: str, expires: float
    ) -> None:
        db.executemany(
            "INSERT INTO affinity (key, backend, expires) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET "
            "backend = excluded.backend, expires = excluded.expires",
            [(key, backend, expires) for key in keys],
        )

    def _trim(self, db: sqlite3.Connection, now: float, max_entries: int) -> None:
        db.execute("DELETE FROM affinity WHERE expires <= ?", (now,))
        db.execute("DELETE FROM flights WHERE expires <= ?", (now,))
        (count,) = db.execute("SELECT COUNT(*) FROM affinity").fetchone()
        if count > max_entries:
            db.execute(
                "DELETE FROM affinity WHERE key IN "
                "(SELECT key FROM affinity ORDER BY expires LIMIT ?)",
                (count - max_entries,),
            )

    def moved(
        self, lease: str, old: str, new: str, lease_ttl: float, remember: list[str], ttl: float
    ) -> None:
        now = self.clock()

        def move(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM flights WHERE backend = ? AND id = ?", (old, lease))
            db.execute(
                "INSERT OR REPLACE INTO flights (backend, id, expires) VALUES (?, ?, ?)",
                (new, lease, now + lease_ttl),
            )
            self._remember(db, remember, new, now + ttl)

        self._transaction(move)

    def unplace(self, backend: str, lease: str) -> None:
        self._transaction(
            lambda db: db.execute(
                "DELETE FROM flights WHERE backend = ? AND id = ?", (backend, lease)
            )
        )

    def backend_loads(self, backends: list[str]) -> dict[str, int]:
        now = self.clock()
        query = "SELECT backend, COUNT(*) FROM flights WHERE expires > ? GROUP BY backend"
        found = dict(self._locked(lambda: self.db.execute(query, (now,)).fetchall()))
        return {name: found.get(name, 0) for name in backends}

    # --- threads ----------------------------------------------------------------------------

    def put_thread(self, thread_id: str, owner: str, body: bytes, ttl: float) -> None:
        now = self.clock()

        def put(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM threads WHERE expires <= ?", (now,))
            _insert_thread(db, thread_id, owner, body, now + ttl)

        self._transaction(put)

    def claim_thread(self, thread_id: str, owner: str, hold: float) -> tuple[str, bytes | None]:
        now = self.clock()

        def claim(db: sqlite3.Connection) -> tuple[str, bytes | None]:
            row = db.execute(
                "SELECT owner, body, expires, continued, claimed_until FROM threads WHERE id = ?",
                (thread_id,),
            ).fetchone()
            if row is None or row[0] != owner or row[2] <= now:
                return THREAD_NOT_FOUND, None
            if row[3]:
                return THREAD_ALREADY_CONTINUED, None
            if row[4] > now:
                return THREAD_IN_FLIGHT, None
            db.execute("UPDATE threads SET claimed_until = ? WHERE id = ?", (now + hold, thread_id))
            return THREAD_FOUND, bytes(row[1])

        return self._transaction(claim)

    def finish_thread(
        self, previous_id: str, thread_id: str, owner: str, body: bytes, ttl: float
    ) -> None:
        now = self.clock()

        def finish(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE threads SET continued = 1, claimed_until = 0 WHERE id = ?", (previous_id,)
            )
            _insert_thread(db, thread_id, owner, body, now + ttl)

        self._transaction(finish)

    def release_thread(self, thread_id: str) -> None:
        self._transaction(
            lambda db: db.execute("UPDATE threads SET claimed_until = 0 WHERE id = ?", (thread_id,))
        )

    # --- plumbing ---------------------------------------------------------------------------

    def ping(self) -> None:
        self._locked(lambda: self.db.execute("SELECT 1").fetchone())

    def close(self) -> None:
        with self.lock:
            self.db.close()

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            with self._begun():
                return work(self.db)

        return self._locked(run)

    @contextmanager
    def _begun(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _locked(self, work: Callable[[], T]) -> T:
        with self.lock:
            return self._retry(work)

    def _retry(
        self, work: Callable[[], T], wait: float = LOCK_WAIT, failed: str = "state store"
    ) -> T:
        """Run ``work``, waiting (cooperatively) while another process holds the lock."""
        deadline = time.monotonic() + wait
        pause = 0.0005
        while True:
            try:
                return work()
            except sqlite3.OperationalError as exc:
                locked = "locked" in str(exc) or "busy" in str(exc)
                if not locked or time.monotonic() > deadline:
                    raise StoreUnavailable(f"{failed} {self.path}: {exc}") from None
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"{failed} {self.path}: {exc}") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.02)


def _refused(verdict: Verdict, name: str, wait: float | None) -> Verdict:
    verdict.admitted = False
    verdict.refused = name
    verdict.retry_after = None if wait is None or wait == float("inf") else wait
    return verdict


def _add_to_budget(
    db: sqlite3.Connection, key: str, period: str, tokens: int, expires: float
) -> None:
    db.execute(
        "INSERT INTO budgets (key, period, used, expires) VALUES (?, ?, MAX(?, 0), ?) "
        "ON CONFLICT (key, period) DO UPDATE SET used = MAX(used + ?, 0), expires = ?",
        (key, period, tokens, expires, tokens, expires),
    )


def _insert_thread(
    db: sqlite3.Connection, thread_id: str, owner: str, body: bytes, expires: float
) -> None:
    db.execute(
        "INSERT OR REPLACE INTO threads (id, owner, body, expires) VALUES (?, ?, ?, ?)",
        (thread_id, owner, body, expires),
    )
