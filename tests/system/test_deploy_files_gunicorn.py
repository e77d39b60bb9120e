"""The shipped example configuration serves under real gunicorn, as a newcomer's first run
does (that it loads: tests/unit/deploy/test_deploy_files.py)."""

from __future__ import annotations

from pathlib import Path

import requests
from fakebackend import FakeBackend
from servers import ROOT, Gunicorn

EXAMPLE = ROOT / "deploy" / "gateway.example.toml"
HI = [{"role": "user", "content": "hi"}]


def test_gunicorn_starts_with_the_example_config_and_serves_a_local_backend(
    tmp_path: Path,
) -> None:
    """The README's first run with the example file: only a local upstream URL is set, no
    backend key (an empty variable, whatever the test's environment holds)."""
    env = {"GATEWAY_CONFIG": str(EXAMPLE), "BACKEND_API_KEY": ""}
    with FakeBackend() as backend:
        server = Gunicorn(env | {"GATEWAY_UPSTREAM_URL": backend.url}, tmp_path / "gunicorn.log")
        try:
            reply = requests.post(
                server.url + "/v1/messages",
                json={"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": HI},
                headers={"anthropic-version": "2023-06-01"},
                timeout=10,
            )
        finally:
            server.stop()
    assert reply.status_code == 200, reply.text
    assert reply.json()["content"][0]["text"] == "Hello"
    sent = backend.requests[-1].json
    assert sent["model"] == "qwen3-32b" and "authorization" not in backend.requests[-1].headers
