"""The configured engine, behind the guard that decides what a request gets while it fails."""

from __future__ import annotations

from collections.abc import Callable

from app.config import StateSettings
from app.state.guard import GuardedStore
from app.state.store import Store, StoreUnavailable


def open_store(
    settings: StateSettings, on_change: Callable[[bool], None] | None = None
) -> GuardedStore:
    """The store of ``settings``, opened on first use (a Redis that is down when a worker
    starts is found once it is up; a state directory that cannot be made is reported then)."""

    def opener() -> Store:
        if settings.engine == "redis":
            from app.state.redis_store import RedisStore  # redis-py only where it is used

            return RedisStore(settings.redis_url)
        from app.state.sqlite_store import SQLiteStore

        return SQLiteStore(settings.directory)

    return GuardedStore(opener, settings.on_failure, on_change=on_change)


def prepare(settings: StateSettings) -> str | None:
    """At start, in the gunicorn master: the SQLite state directory and its schema made, or
    why they cannot be. (A Redis that is down is not a reason to refuse to start: the workers
    find it when it is back, and meanwhile do as ``on_failure`` says.)"""
    if settings.engine != "sqlite":
        return None
    from app.state.sqlite_store import SQLiteStore

    try:
        SQLiteStore(settings.directory).close()
    except StoreUnavailable as exc:
        return f"state.directory: {exc}"
    return None
