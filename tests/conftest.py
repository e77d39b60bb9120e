"""Fixtures: a real fake backend, the gateway served over real HTTP, and SDK clients on it.

The in-process gateway runs on Werkzeug's threaded server (fast to start per test, with its own
settings); tests that need the production server start real gunicorn with the gevent worker
(see test_gunicorn.py). Both listen on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import pytest
from fakebackend import FakeBackend
from werkzeug.serving import make_server

from app import create_app
from app.config import build_settings

# Nothing a test starts writes state into the checkout (./state is the gateway's default).
os.environ.setdefault("GATEWAY_STATE_DIR", tempfile.mkdtemp(prefix="gateway-test-state-"))


class GatewayServer:
    """The Flask app from the factory, on an ephemeral loopback port, in a daemon thread."""

    def __init__(self, raw_settings: dict[str, Any]) -> None:
        # Its own state (limits, usage, threads), unless the test shares one.
        self.state_dir = tempfile.mkdtemp(prefix="gateway-state-")
        raw_settings = {**raw_settings, "state": {"directory": self.state_dir}} | (
            {"state": raw_settings["state"]} if "state" in raw_settings else {}
        )
        self.settings = build_settings(raw_settings, {})
        self.app = create_app(self.settings)
        self.server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def client(self, **kwargs: Any) -> anthropic.Anthropic:
        kwargs.setdefault("max_retries", 0)
        return anthropic.Anthropic(base_url=self.url, api_key="test-key", **kwargs)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for client in self.app.extensions["gateway.dispatcher"].clients.values():
            client.close()
        ledger = self.app.extensions["gateway.ledger"]
        ledger.usage.close()
        ledger.store.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    @property
    def store(self) -> Any:
        return self.app.extensions["gateway.ledger"].store


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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "llama_cpp: the real-backend tier, through a real llama-server (scripts/llama-server)",
    )
    config.addinivalue_line(
        "markers", "vllm: the vLLM tier, through a real vLLM on the CPU (scripts/vllm-server)"
    )
