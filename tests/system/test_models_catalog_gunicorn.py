"""``GET /v1/models`` and ``GET /v1/models/{id}`` through the official SDK under real gunicorn
with only an upstream URL set (in process, in detail: tests/integration/test_models_catalog.py).
"""

from __future__ import annotations

import anthropic
import requests
from fakebackend import FakeBackend
from model_lists import LISTED, ids_of, lists
from servers import Gunicorn

# --- under gunicorn's gevent worker -------------------------------------------------------------


def test_gunicorn_lists_the_backend_models_with_only_an_upstream_url(tmp_path):
    with FakeBackend() as backend:
        lists(backend, LISTED)
        server = Gunicorn({"GATEWAY_UPSTREAM_URL": backend.url}, tmp_path / "gunicorn.log")
        try:
            client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
            with client:
                assert ids_of(client) == ["qwen3-8b", "Qwen/Qwen3-32B"]
                assert client.models.retrieve("Qwen/Qwen3-32B").display_name == "Qwen/Qwen3-32B"
                assert client.models.retrieve("any-name").id == "any-name"
                # llama.cpp names its model by its file; the SDK sends %2F for the slashes.
                assert client.models.retrieve("/models/x.gguf").id == "/models/x.gguf"
            # A path with "//" is an Anthropic 404, never werkzeug's HTML redirect.
            answer = requests.post(
                server.url + "/v1//messages", json={}, timeout=5, allow_redirects=False
            )
            assert answer.status_code == 404, answer.text
            assert answer.json()["error"]["type"] == "not_found_error"
        finally:
            server.stop()
