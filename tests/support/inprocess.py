"""The gateway in process: the Flask app from the factory on Werkzeug's threaded server, on an
ephemeral 127.0.0.1 port. Fast to start per test, with its own settings and state; what only
the production server does is tested under real gunicorn (tests/system)."""

from __future__ import annotations

import shutil
import tempfile
import threading
from typing import TYPE_CHECKING, Any

from werkzeug.serving import make_server

from app import create_app
from app.config import build_settings

if TYPE_CHECKING:
    import anthropic


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
        import anthropic  # seconds to import: not for the tests that never call it

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
