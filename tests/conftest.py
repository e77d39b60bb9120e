"""The tiers, and the fixtures every tier may use: a real fake backend, the gateway served in
process over real HTTP (tests/support/inprocess.py), and SDK clients on it.

tests/unit is pure: no socket is connected or bound and no process started there, so it runs in
seconds on every save. tests/integration runs the WSGI app in process against the fake backend
on 127.0.0.1. tests/system runs the real things: gunicorn with the gevent worker, nginx, Redis,
llama.cpp, Node.js and the Claude Code CLI. Each test is marked by its directory (``-m unit``,
``-m "not system"``). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from fakebackend import FakeBackend
from hypothesis import HealthCheck, settings
from inprocess import GatewayServer

from app.ops.access_log import configure_logging

if TYPE_CHECKING:
    import anthropic

# Nothing a test starts writes state into the checkout (./state is the gateway's default).
os.environ.setdefault("GATEWAY_STATE_DIR", tempfile.mkdtemp(prefix="gateway-test-state-"))

# The properties are about answers, not speed: on a busy machine an example may take longer
# than Hypothesis's 200 ms deadline, or its data longer to generate than its health check likes.
settings.register_profile("gateway", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("gateway")

TIERS = ("unit", "integration", "system")
TESTS = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test is marked with its tier, the directory it is in below tests/."""
    for item in items:
        tier = item.path.relative_to(TESTS).parts[0]
        if tier in TIERS:
            item.add_marker(tier)


# What a unit test may not do: reach a socket (not even to resolve a name) or start a process.
IMPURE_EVENTS = frozenset(
    {
        "socket.connect",
        "socket.bind",
        "socket.getaddrinfo",
        "subprocess.Popen",
        "os.system",
        "os.posix_spawn",
        "os.exec",
        "os.fork",
    }
)
_impure: list[str] | None = None  # what the unit test running now tried, when one is running


def _refuse_impure(event: str, args: tuple[Any, ...]) -> None:
    if _impure is not None and event in IMPURE_EVENTS:
        _impure.append(f"{event}{args!r}")
        raise RuntimeError(f"a unit test may not {event}: move it to tests/integration or system")


sys.addaudithook(_refuse_impure)  # an audit hook, not a patch: it only watches


@pytest.fixture(autouse=True)
def _unit_tests_stay_pure(request: pytest.FixtureRequest) -> Iterator[None]:
    """Keeps tests/unit the loop that runs in seconds anywhere: a test there that opens a
    socket or starts a process fails, even if it swallowed the error it got."""
    global _impure
    if request.node.get_closest_marker("unit") is None:
        yield
        return
    _impure = tried = []
    try:
        yield
    finally:
        _impure = None
    if tried:
        pytest.fail("a unit test touched a socket or a process: " + "; ".join(tried))


@pytest.fixture
def backend() -> Iterator[FakeBackend]:
    with FakeBackend() as fb:
        yield fb


@pytest.fixture(scope="module")
def module_backend() -> Iterator[FakeBackend]:
    """One fake backend for a whole module, for tests that share one gunicorn."""
    with FakeBackend() as fb:
        yield fb


@pytest.fixture
def make_gateway(backend: FakeBackend) -> Iterator[Callable[..., GatewayServer]]:
    """Start a gateway on ``backend``; keyword arguments are upstream settings or top-level ones."""
    servers: list[GatewayServer] = []

    def start(upstream: dict[str, Any] | None = None, **top: Any) -> GatewayServer:
        """No retries unless asked for: most tests want a backend's answer to surface as is."""
        raw = {"upstream": {"url": backend.url, **(upstream or {})}, **top}
        raw.setdefault("routing", {}).setdefault("retries", 0)
        server = GatewayServer(raw)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def gateway(make_gateway: Callable[..., GatewayServer]) -> GatewayServer:
    return make_gateway()


@pytest.fixture
def client(gateway: GatewayServer) -> Iterator[anthropic.Anthropic]:
    with gateway.client() as sdk:
        yield sdk


@pytest.fixture
def gateway_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """``caplog`` that sees the gateway's records, the access lines at INFO included.

    The gateway's logger does not propagate to the root, so pytest's capture reaches it only
    if it is non-propagating when a test phase starts: a gateway first built in the test's body
    would make it so too late, and its records would go unseen (only when the test runs alone,
    or first). Configuring it here, as a gateway will, puts it in that state before the test."""
    configure_logging("INFO")
    caplog.set_level(logging.INFO, logger="gateway.access")
    return caplog
