"""Usage records added up in the worker and written to the store once a second.

A request's usage would otherwise cost a store transaction of its own at its end (for a
gateway without client keys, the only one): measured, a tenth of a small request's CPU. Added
up here by key × model × day, a second's requests cost one write, made by a background
greenlet off every request's path. What a worker that is killed outright has not written yet
(at most ``EVERY`` seconds of it) is lost; a worker that stops normally writes it on its way
out (gunicorn's ``worker_exit``, in gunicorn.conf.py).

The console's per-minute counts of the service's message requests (``Tally``) are summed from
the same records when they are written, and its log of recent failed requests rides along:
both cost a request nothing but what it already pays, and go in the same second.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque

from app.state.guard import GuardedStore
from app.state.store import USAGE_COUNTS, Tally, Usage

EVERY = 1.0
FAILURES = "errors"  # the store's log of recent failed requests (the console's Errors page)
FAILURES_KEPT = 1000  # its size, and the most a worker holds between two writes
_buffers: weakref.WeakSet[UsageBuffer] = weakref.WeakSet()


class UsageBuffer:
    def __init__(self, store: GuardedStore, every: float = EVERY) -> None:
        self.store = store
        self.every = every
        self.pending: dict[tuple[str, str, str], Usage] = {}
        self.unrecorded = Tally(0)  # requests without a usage record since the last write
        self.failures: deque[str] = deque(maxlen=FAILURES_KEPT)
        self.lock = threading.Lock()
        self.writer: threading.Thread | None = None
        self.closed = False
        _buffers.add(self)

    def add(self, usage: Usage) -> None:
        group = (usage.day, usage.key, usage.model)
        with self.lock:
            found = self.pending.get(group)
            if found is None:
                self.pending[group] = usage
            else:
                for name in USAGE_COUNTS:
                    setattr(found, name, getattr(found, name) + getattr(usage, name))
            if self.writer is None and not self.closed:
                self._start()

    def tally(self, failed: bool) -> None:
        """A message request without a usage record (refused, or never read), for this
        second's counts; those with one are counted from their records when written."""
        with self.lock:
            self.unrecorded.requests += 1
            self.unrecorded.errors += failed
            self._start()

    def fail(self, entry: str) -> None:
        """A failed request for the log (JSON text); past ``FAILURES_KEPT`` the oldest go."""
        with self.lock:
            self.failures.append(entry)
            self._start()

    def _start(self) -> None:
        if self.writer is None and not self.closed:
            # Started on first use, so that it runs in the worker, after the fork.
            self.writer = threading.Thread(target=self._write_on, name="usage", daemon=True)
            self.writer.start()

    def flush(self) -> None:
        with self.lock:
            records, self.pending = list(self.pending.values()), {}
            unrecorded, self.unrecorded = self.unrecorded, Tally(0)
            failures = list(self.failures)
            self.failures.clear()
        if records:
            self.store.add_usage(records)
        tally = _tally(records, unrecorded)
        if tally.requests:
            self.store.add_tallies([tally])
        if failures:
            self.store.append_log(FAILURES, failures, FAILURES_KEPT)

    def close(self) -> None:
        self.closed = True
        self.flush()

    def _write_on(self) -> None:
        while not self.closed:
            time.sleep(self.every)
            self.flush()


def _tally(records: list[Usage], unrecorded: Tally) -> Tally:
    """The service's counts of this second, in its minute: summed from the usage records at
    their write, so a request pays nothing for them (a second's records may land in the
    next minute)."""
    tally = unrecorded
    tally.minute = int(time.time()) // 60
    for record in records:
        tally.requests += record.requests
        tally.errors += record.errors
        tally.input_tokens += record.input_tokens
        tally.output_tokens += record.output_tokens
        tally.cached_tokens += record.cached_tokens
    return tally


def flush_all() -> None:
    """Every buffer of this process written out: for a worker on its way out."""
    for buffer in list(_buffers):
        buffer.flush()
