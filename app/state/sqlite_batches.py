"""Batches in the embedded engine: a row per batch, a row per item handed out and not done,
a row per item done (app/state/batch_queue.py says what each means).

Items waiting their first turn have no row: ``next`` counts past them as they are handed out,
so creating a batch of any size writes one row, and the write lock that every request's
admission also takes is held for microseconds.
"""

from __future__ import annotations

import sqlite3
from abc import abstractmethod
from collections.abc import Callable
from typing import Any, TypeVar

from app.state.batch_queue import (
    ARCHIVED_AFTER,
    BATCH_FLIGHTS,
    CANCELING,
    DONE_KINDS,
    ENDED,
    IN_PROGRESS,
    BatchCensus,
    BatchPage,
    BatchQueue,
    BatchRecord,
    Claim,
    ended,
)
from app.state.store import lease_id

T = TypeVar("T")

BATCH_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, total INTEGER NOT NULL, created_at REAL NOT NULL,
    expires_at REAL NOT NULL, status TEXT NOT NULL, ended_at REAL, cancel_initiated_at REAL,
    archived_at REAL, succeeded INTEGER NOT NULL DEFAULT 0, errored INTEGER NOT NULL DEFAULT 0,
    canceled INTEGER NOT NULL DEFAULT 0, expired INTEGER NOT NULL DEFAULT 0,
    running INTEGER NOT NULL DEFAULT 0, next INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batches_by_owner ON batches (owner, id);
CREATE INDEX IF NOT EXISTS batches_by_status ON batches (status, id);
CREATE TABLE IF NOT EXISTS batch_claims (
    batch TEXT NOT NULL, idx INTEGER NOT NULL, token TEXT, until REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (batch, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batch_claims_due ON batch_claims (batch, until);
CREATE TABLE IF NOT EXISTS worker_loads (
    backend TEXT NOT NULL, worker TEXT NOT NULL, count INTEGER NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (backend, worker)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batch_done (
    batch TEXT NOT NULL, idx INTEGER NOT NULL, PRIMARY KEY (batch, idx)
) WITHOUT ROWID;
"""
BATCH_SCHEMA = tuple(s.strip() for s in BATCH_SCHEMA_SQL.split(";") if s.strip())

COLUMNS = (
    "id, owner, total, created_at, expires_at, status, ended_at, cancel_initiated_at, "
    "archived_at, succeeded, errored, canceled, expired, running, next"
)
SELECT = f"SELECT {COLUMNS} FROM batches"
# Open batches looked at per claim: an old batch with nothing due leaves room for newer ones.
CLAIM_BATCHES = 16


class SQLiteBatches(BatchQueue):
    """The batch methods of app.state.sqlite_store.SQLiteStore."""

    @abstractmethod
    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T: ...

    @abstractmethod
    def _locked(self, work: Callable[[], T]) -> T: ...

    db: sqlite3.Connection
    clock: Callable[[], float]

    def batch_create(self, record: BatchRecord) -> None:
        row = _row(record)
        marks = ",".join("?" * len(row))
        self._transaction(
            lambda db: db.execute(f"INSERT INTO batches ({COLUMNS}) VALUES ({marks})", row)
        )

    def batch_get(self, batch_id: str) -> BatchRecord | None:
        found = self._locked(
            lambda: self.db.execute(f"{SELECT} WHERE id = ?", (batch_id,)).fetchone()
        )
        return _record(found) if found else None

    def batch_list(
        self, owner: str | None, limit: int, before_id: str | None, after_id: str | None
    ) -> BatchPage:
        where, args = ([], []) if owner is None else (["owner = ?"], [owner])
        order = "DESC"
        if before_id is not None:
            where.append("id > ?")
            args.append(before_id)
            order = "ASC"  # the ones just after it, reversed below
        elif after_id is not None:
            where.append("id < ?")
            args.append(after_id)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        query = f"{SELECT}{clause} ORDER BY id {order} LIMIT ?"
        rows = self._locked(lambda: self.db.execute(query, (*args, limit + 1)).fetchall())
        records = [_record(row) for row in rows[:limit]]
        if order == "ASC":
            records.reverse()
        return BatchPage(records, len(rows) > limit)

    def batch_cancel(self, batch_id: str, now: float) -> BatchRecord | None:
        def cancel(db: sqlite3.Connection) -> BatchRecord | None:
            record = _get(db, batch_id)
            if record is None or record.status != IN_PROGRESS:
                return record
            record.status, record.cancel_initiated_at = CANCELING, now
            # Items waiting to be tried again will not be: only running ones stay claimed.
            db.execute("DELETE FROM batch_claims WHERE batch = ? AND token IS NULL", (batch_id,))
            if record.running == 0:
                return _end(db, record, now)
            _save(db, record)
            return record

        return self._transaction(cancel)

    def batch_delete(self, batch_id: str) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            gone = db.execute(
                "DELETE FROM batches WHERE id = ? AND status = ?", (batch_id, ENDED)
            ).rowcount
            if gone:
                db.execute("DELETE FROM batch_done WHERE batch = ?", (batch_id,))
            return bool(gone)

        return self._transaction(delete)

    def batch_claim(self, token: str, now: float, lease: float, limit: int) -> list[Claim]:
        def claim(db: sqlite3.Connection) -> list[Claim]:
            claims: list[Claim] = []
            open_batches = db.execute(
                f"{SELECT} WHERE status = ? AND expires_at > ? ORDER BY id LIMIT ?",
                (IN_PROGRESS, now, CLAIM_BATCHES),
            ).fetchall()
            for row in open_batches:
                if len(claims) >= limit:
                    break
                record = _record(row)
                claims += _claim_from(db, record, token, now + lease, now, limit - len(claims))
            return claims

        return self._transaction(claim)

    def batch_renew(self, token: str, claims: list[Claim], now: float, lease: float) -> None:
        rows = [(now + lease, c.batch_id, c.index, token) for c in claims]
        self._transaction(
            lambda db: db.executemany(
                "UPDATE batch_claims SET until = ? WHERE batch = ? AND idx = ? AND token = ?", rows
            )
        )

    def batch_release(
        self,
        token: str,
        claim: Claim,
        not_before: float,
        now: float | None = None,
        attempt: bool = True,
    ) -> None:
        def release(db: sqlite3.Connection) -> None:
            changed = db.execute(
                "UPDATE batch_claims SET token = NULL, until = ?, attempts = attempts + ? "
                "WHERE batch = ? AND idx = ? AND token = ?",
                (not_before, int(attempt), claim.batch_id, claim.index, token),
            ).rowcount
            if changed:
                db.execute(
                    "UPDATE batches SET running = running - 1 WHERE id = ?", (claim.batch_id,)
                )
                record = _get(db, claim.batch_id)
                if record is not None and record.status == CANCELING and record.running <= 0:
                    _end(db, record, self.clock() if now is None else now)

        self._transaction(release)

    def batch_finish(self, claim: Claim, kind: str, now: float) -> BatchRecord | None:
        assert kind in DONE_KINDS

        def finish(db: sqlite3.Connection) -> BatchRecord | None:
            record = _get(db, claim.batch_id)
            if record is None or record.status == ENDED:
                return None
            added = db.execute(
                "INSERT OR IGNORE INTO batch_done (batch, idx) VALUES (?, ?)",
                (claim.batch_id, claim.index),
            ).rowcount
            if not added:
                return None
            held = db.execute(
                "DELETE FROM batch_claims WHERE batch = ? AND idx = ? RETURNING token",
                (claim.batch_id, claim.index),
            ).fetchone()
            if held is not None and held[0] is not None:
                record.running -= 1
            setattr(record, kind, getattr(record, kind) + 1)
            if _over(db, record):
                return _end(db, record, now)
            _save(db, record)
            return record

        return self._transaction(finish)

    def batch_done(self, batch_id: str, start: int, stop: int) -> list[int]:
        query = "SELECT idx FROM batch_done WHERE batch = ? AND idx >= ? AND idx < ? ORDER BY idx"
        rows = self._locked(lambda: self.db.execute(query, (batch_id, start, stop)).fetchall())
        return [row[0] for row in rows]

    def batch_census(self) -> BatchCensus:
        def count() -> BatchCensus:
            rows = self.db.execute(
                "SELECT status, COUNT(*) FROM batches WHERE archived_at IS NULL GROUP BY status"
            ).fetchall()
            (oldest,) = self.db.execute(
                "SELECT MIN(created_at) FROM batches WHERE status != ?", (ENDED,)
            ).fetchone()
            by_status = dict.fromkeys((IN_PROGRESS, CANCELING, ENDED), 0)
            by_status.update(rows)
            return BatchCensus(by_status, oldest)

        return self._locked(count)

    def publish_loads(self, worker: str, loads: dict[str, int], ttl: float) -> None:
        def publish(db: sqlite3.Connection) -> None:
            now = self.clock()
            expires = now + ttl
            db.execute("DELETE FROM worker_loads WHERE expires <= ?", (now,))  # dead workers
            db.executemany(
                "INSERT INTO worker_loads (backend, worker, count, expires) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (backend, worker) DO UPDATE SET count = excluded.count, "
                "expires = excluded.expires",
                [(backend, worker, count, expires) for backend, count in loads.items()],
            )

        self._transaction(publish)

    def batch_slot(self, backend: str, capacity: int, share: int, lease: float) -> str | None:
        def take(db: sqlite3.Connection) -> str | None:
            now = self.clock()
            mine = BATCH_FLIGHTS + backend
            (batch,) = db.execute(
                "SELECT COUNT(*) FROM flights WHERE backend = ? AND expires > ?", (mine, now)
            ).fetchone()
            (interactive,) = db.execute(
                "SELECT COALESCE(SUM(count), 0) FROM worker_loads WHERE backend = ? "
                "AND expires > ?",
                (backend, now),
            ).fetchone()
            if batch >= share or batch + interactive >= capacity:
                return None
            slot = lease_id()
            db.execute(
                "INSERT INTO flights (backend, id, expires) VALUES (?, ?, ?)",
                (mine, slot, now + lease),
            )
            return slot

        return self._transaction(take)

    def batch_reslot(self, backend: str, slots: list[str], lease: float) -> None:
        def renew(db: sqlite3.Connection) -> None:
            now = self.clock()
            db.executemany(
                "UPDATE flights SET expires = ? WHERE backend = ? AND id = ? AND expires > ?",
                [(now + lease, BATCH_FLIGHTS + backend, slot, now) for slot in slots],
            )

        self._transaction(renew)

    def batch_unslot(self, backend: str, slot: str) -> None:
        self._transaction(
            lambda db: db.execute(
                "DELETE FROM flights WHERE backend = ? AND id = ?", (BATCH_FLIGHTS + backend, slot)
            )
        )

    def batch_sweep(self, now: float) -> list[str]:
        def sweep(db: sqlite3.Connection) -> list[str]:
            # By status, not ``!= ended``: an index search, where ended batches (kept 29 days
            # and more) would make it a scan of the table.
            late = db.execute(
                f"{SELECT} WHERE status IN (?, ?) AND expires_at <= ?",
                (IN_PROGRESS, CANCELING, now),
            ).fetchall()
            for row in late:
                _end(db, _record(row), now)
            for row in db.execute(f"{SELECT} WHERE status = ?", (CANCELING,)).fetchall():
                _drop_lost_runners(db, _record(row), now)
            archive = db.execute(
                "SELECT id FROM batches WHERE status = ? AND archived_at IS NULL "
                "AND created_at <= ?",
                (ENDED, now - ARCHIVED_AFTER),
            ).fetchall()
            ids = [row[0] for row in archive]
            for batch_id in ids:
                db.execute("UPDATE batches SET archived_at = ? WHERE id = ?", (now, batch_id))
                db.execute("DELETE FROM batch_done WHERE batch = ?", (batch_id,))
            return ids

        return self._transaction(sweep)


def _claim_from(
    db: sqlite3.Connection, record: BatchRecord, token: str, until: float, now: float, want: int
) -> list[Claim]:
    """Up to ``want`` items of one batch: those due again (given back, or their runner's
    lease ran out), then new ones."""
    claims: list[Claim] = []
    due = db.execute(
        "SELECT idx, token, attempts FROM batch_claims WHERE batch = ? AND until <= ? "
        "ORDER BY until, idx LIMIT ?",
        (record.id, now, want),
    ).fetchall()
    for index, old_token, attempts in due:
        lost = old_token is not None  # its runner is gone: that attempt counts
        attempts += int(lost)
        record.running += int(not lost)
        db.execute(
            "UPDATE batch_claims SET token = ?, until = ?, attempts = ? "
            "WHERE batch = ? AND idx = ?",
            (token, until, attempts, record.id, index),
        )
        claims.append(Claim(record.id, index, attempts))
    fresh = min(want - len(claims), record.total - record.next)
    if fresh > 0:
        start = record.next
        db.executemany(
            "INSERT INTO batch_claims (batch, idx, token, until) VALUES (?, ?, ?, ?)",
            [(record.id, i, token, until) for i in range(start, start + fresh)],
        )
        claims += [Claim(record.id, i, 0) for i in range(start, start + fresh)]
        record.next += fresh
        record.running += fresh
    if claims:
        _save(db, record)
    return claims


def _drop_lost_runners(db: sqlite3.Connection, record: BatchRecord, now: float) -> None:
    """A canceling batch's items whose runners are gone will not finish: it ends without
    them."""
    lost = db.execute(
        "DELETE FROM batch_claims WHERE batch = ? AND token IS NOT NULL AND until <= ?",
        (record.id, now),
    ).rowcount
    if lost:
        record.running = max(record.running - lost, 0)
        if record.running == 0:
            _end(db, record, now)
        else:
            _save(db, record)


def _over(db: sqlite3.Connection, record: BatchRecord) -> bool:
    """Nothing is left to do: every item done, or canceling and none running."""
    if record.status == CANCELING:
        return record.running <= 0
    return record.done >= record.total


def _end(db: sqlite3.Connection, record: BatchRecord, now: float) -> BatchRecord:
    db.execute("DELETE FROM batch_claims WHERE batch = ?", (record.id,))
    _save(db, ended(record, now))
    return record


def _get(db: sqlite3.Connection, batch_id: str) -> BatchRecord | None:
    row = db.execute(f"{SELECT} WHERE id = ?", (batch_id,)).fetchone()
    return _record(row) if row else None


def _save(db: sqlite3.Connection, record: BatchRecord) -> None:
    row = _row(record)
    sets = ", ".join(f"{name} = ?" for name in COLUMNS.split(", ")[1:])
    db.execute(f"UPDATE batches SET {sets} WHERE id = ?", (*row[1:], record.id))


def _row(record: BatchRecord) -> tuple[Any, ...]:
    return tuple(getattr(record, name) for name in COLUMNS.split(", "))


def _record(row: Any) -> BatchRecord:
    return BatchRecord(*row)
