"""The store as the gateway uses it: what a request gets when the store cannot answer, and how
the gateway finds its way back to it.

``on_failure = "open"`` (the default) lets requests through unlimited and drops their usage
records, with a warning in the log every ``WARN_EVERY`` seconds while it lasts; ``"closed"``
refuses them with a 503 ``overloaded_error``. Either way the worker never crashes over it: the
store is opened lazily (a Redis that is down when the gateway starts is found later), and after a
failure it is left alone for ``HOLD_OFF`` seconds, then asked again, so the gateway recovers by
itself when the store returns, without hammering it while it is gone. While it is gone a
watcher (a greenlet in a worker) pings it every ``HOLD_OFF`` seconds, so the worker notices its
return (its log line, ``gateway_state_store_up``) even with no request to make it look.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from app.config import OnFailure, StateSettings
from app.errors import Overloaded
from app.state.store import (
    THREAD_NOT_FOUND,
    Ask,
    Placed,
    Placement,
    Settlement,
    Store,
    StoreUnavailable,
    Tally,
    Usage,
    UsageRow,
    Verdict,
)

log = logging.getLogger("gateway")
T = TypeVar("T")
HOLD_OFF = 1.0
WARN_EVERY = 10.0


class GuardedStore:
    def __init__(
        self,
        opener: Callable[[], Store],
        on_failure: OnFailure = StateSettings.on_failure,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.opener = opener
        self.on_failure = on_failure
        self.clock = clock
        self.on_change = on_change  # told when the store goes (False) and comes back (True)
        self.store: Store | None = None
        self.down_until = 0.0
        self.warned_at = -WARN_EVERY
        self.up = True
        self.closed = False

    def admit(self, ask: Ask) -> Verdict:
        return self._call(lambda s: s.admit(ask), lambda: Verdict(admitted=True))

    def settle(self, settlement: Settlement) -> None:
        # Never refused: the request is over. Lost, its lease expires by itself (lease_ttl).
        self._call(lambda s: s.settle(settlement), lambda: None, refuse=False)

    def add_usage(self, records: list[Usage]) -> None:
        # Lost while the store is gone: the records of those seconds are not kept.
        self._call(lambda s: s.add_usage(records), lambda: None, refuse=False)

    def usage(self, since: str, until: str, key: str | None, model: str | None) -> list[UsageRow]:
        """For the admin view and the report: an unreachable store is an error there."""
        return self._call(lambda s: s.usage(since, until, key, model), None)

    def in_flight(self, keys: list[str]) -> dict[str, int]:
        return self._call(lambda s: s.in_flight(keys), None)

    def place(self, placement: Placement) -> Placed | None:
        """None while the store cannot answer, whatever ``on_failure`` says: routing never
        fails over the store, the worker orders the targets by what it knows itself."""
        return self._call(lambda s: s.place(placement), lambda: None, refuse=False)

    def moved(
        self, lease: str, old: str, new: str, lease_ttl: float, remember: list[str], ttl: float
    ) -> None:
        self._call(
            lambda s: s.moved(lease, old, new, lease_ttl, remember, ttl), lambda: None, refuse=False
        )

    def unplace(self, backend: str, lease: str) -> None:
        # Lost while the store is gone: the lease expires by itself.
        self._call(lambda s: s.unplace(backend, lease), lambda: None, refuse=False)

    def backend_loads(self, backends: list[str]) -> dict[str, int]:
        return self._call(lambda s: s.backend_loads(backends), None)

    def put_thread(self, thread_id: str, owner: str, body: bytes, ttl: float) -> None:
        self._call(lambda s: s.put_thread(thread_id, owner, body, ttl), lambda: None, refuse=False)

    def claim_thread(self, thread_id: str, owner: str, hold: float) -> tuple[str, bytes | None]:
        # Failing open, a thread that cannot be read is a lost one: the SDK replays it whole.
        return self._call(
            lambda s: s.claim_thread(thread_id, owner, hold), lambda: (THREAD_NOT_FOUND, None)
        )

    def finish_thread(
        self, previous_id: str, thread_id: str, owner: str, body: bytes, ttl: float
    ) -> None:
        self._call(
            lambda s: s.finish_thread(previous_id, thread_id, owner, body, ttl),
            lambda: None,
            refuse=False,
        )

    def release_thread(self, thread_id: str) -> None:
        self._call(lambda s: s.release_thread(thread_id), lambda: None, refuse=False)

    def run(self, work: Callable[[Store], T]) -> T:
        """Any other work on the store (the batches'): while it cannot answer, a 503
        ``overloaded_error``, whatever ``on_failure`` says."""
        return self._call(work, None)

    def add_tallies(self, tallies: list[Tally]) -> None:
        # Lost while the store is gone, as usage records are.
        self._call(lambda s: s.add_tallies(tallies), lambda: None, refuse=False)

    def tallies(self, since_minute: int) -> list[Tally]:
        return self._call(lambda s: s.tallies(since_minute), None)

    def append_log(self, log: str, entries: list[str], keep: int) -> None:
        self._call(lambda s: s.append_log(log, entries, keep), lambda: None, refuse=False)

    def read_log(self, log: str, limit: int) -> list[str]:
        return self._call(lambda s: s.read_log(log, limit), None)

    # The console's sessions: an unreachable store is an error there (a 503), never a way in.

    def start_session(self, session_id: str, digest: str, idle: float, absolute: float) -> None:
        self._call(lambda s: s.start_session(session_id, digest, idle, absolute), None)

    def check_session(self, session_id: str, digest: str, idle: float) -> bool:
        return self._call(lambda s: s.check_session(session_id, digest, idle), None)

    def end_session(self, session_id: str) -> None:
        self._call(lambda s: s.end_session(session_id), None)

    def ping(self) -> None:
        self._call(lambda s: s.ping(), lambda: None, refuse=False)

    def close(self) -> None:
        self.closed = True
        if self.store is not None:
            self.store.close()

    def _call(
        self, work: Callable[[Store], T], fallback: Callable[[], T] | None, refuse: bool = True
    ) -> T:
        """``work`` on the store; if it cannot answer, ``fallback`` (None: an error), unless
        the store fails closed and ``refuse`` says this call lets a request in."""
        now = self.clock()
        try:
            if now < self.down_until:
                raise StoreUnavailable("the state store failed a moment ago")
            if self.store is None:
                self.store = self.opener()
            result = work(self.store)
        except StoreUnavailable as exc:
            return self._failed(exc, now, fallback, refuse)
        if not self.up:
            self.up = True
            log.warning("state store is back")
            if self.on_change:
                self.on_change(True)
        return result

    def _failed(
        self, exc: StoreUnavailable, now: float, fallback: Callable[[], T] | None, refuse: bool
    ) -> T:
        if now >= self.down_until:
            self.down_until = now + HOLD_OFF
        if self.up:
            self.up = False
            if self.on_change:
                self.on_change(False)
            threading.Thread(target=self._watch, name="state-store-watch", daemon=True).start()
        if now - self.warned_at >= WARN_EVERY:
            self.warned_at = now
            how = "letting requests through unlimited" if self.on_failure == "open" else "refusing"
            log.error("state store unavailable, %s: %s", how, exc)
        if fallback is None or (refuse and self.on_failure == "closed"):
            raise Overloaded(
                "the gateway's state store is unavailable; try again shortly",
                status=503,
                headers={"retry-after": "1"},
            )
        return fallback()

    def _watch(self) -> None:
        while not self.up and not self.closed:
            time.sleep(HOLD_OFF)
            self.ping()
