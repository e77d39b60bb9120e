"""Fixtures the system tests share: a Redis of their own, and each state store engine."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from servers import RedisServer, redis_available

from app.state.redis_store import RedisStore
from app.state.sqlite_store import SQLiteStore
from app.state.store import Store


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server on 127.0.0.1 for the module (the distribution's service is never used)."""
    if not redis_available():
        pytest.skip("redis-server is not installed (apt-get install redis-server); CI runs these")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[Store]:
    """Each engine in turn, so that one contract test holds for both."""
    if request.param == "sqlite":
        engine: Store = SQLiteStore(str(tmp_path))
    else:
        server = request.getfixturevalue("redis_server")
        engine = RedisStore(server.url, prefix=f"test:{time.monotonic_ns()}:")
    yield engine
    engine.close()
