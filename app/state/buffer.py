"""Usage records added up in the worker and written to the store once a second.

A request's usage would otherwise cost a store transaction of its own at its end (for a
gateway without client keys, the only one): measured, a tenth of a small request's CPU. Added
up here by key × model × day, a second's requests cost one write, made by a background
greenlet off every request's path. What a worker that is killed outright has not written yet
(at most ``EVERY`` seconds of it) is lost; a worker that stops normally writes it on its way
out (gunicorn's ``worker_exit``, in gunicorn.conf.py).
"""

from __future__ import annotations

import threading
import time
import weakref

from app.state.guard import GuardedStore
from app.state.store import USAGE_COUNTS, Usage

EVERY = 1.0
_buffers: weakref.WeakSet[UsageBuffer] = weakref.WeakSet()


class UsageBuffer:
    def __init__(self, store: GuardedStore, every: float = EVERY) -> None:
        self.store = store
        self.every = every
        self.pending: dict[tuple[str, str, str], Usage] = {}
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
                # Started on first use, so that it runs in the worker, after the fork.
                self.writer = threading.Thread(target=self._write_on, name="usage", daemon=True)
                self.writer.start()

    def flush(self) -> None:
        with self.lock:
            records, self.pending = list(self.pending.values()), {}
        if records:
            self.store.add_usage(records)

    def close(self) -> None:
        self.closed = True
        self.flush()

    def _write_on(self) -> None:
        while not self.closed:
            time.sleep(self.every)
            self.flush()


def flush_all() -> None:
    """Every buffer of this process written out: for a worker on its way out."""
    for buffer in list(_buffers):
        buffer.flush()
