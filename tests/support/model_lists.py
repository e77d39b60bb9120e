"""A backend's ``GET /v1/models`` as the fake backend serves it, and the ids the official SDK
reads back from the gateway's list: for the catalog tests in process and under gunicorn."""

from __future__ import annotations

from typing import Any

import anthropic
from fakebackend import FakeBackend, JSONReply, Recorded, error_body

MODELS_PATH = "/v1/models"
# vLLM's shape: OpenAI's list, epoch ``created``.
LISTED = [
    {"id": "qwen3-8b", "object": "model", "created": 1760000000, "owned_by": "vllm"},
    {"id": "Qwen/Qwen3-32B", "object": "model", "created": 1760000100, "owned_by": "vllm"},
]


def lists(backend: FakeBackend, models: list[dict[str, Any]]) -> None:
    """The backend answers ``GET /v1/models`` with these models from now on."""
    backend.routes[("GET", MODELS_PATH)] = lambda _request: JSONReply(
        {"object": "list", "data": models}
    )


def fails_to_list(backend: FakeBackend, status: int = 500) -> None:
    backend.routes[("GET", MODELS_PATH)] = lambda _request: JSONReply(
        error_body("model list unavailable", error_type="server_error"), status=status
    )


def list_requests(backend: FakeBackend) -> list[Recorded]:
    return [r for r in backend.requests if r.method == "GET" and r.path.startswith(MODELS_PATH)]


def ids_of(client: anthropic.Anthropic, **params: Any) -> list[str]:
    """Every id, as the SDK's auto-pager collects them page after page."""
    return [m.id for m in client.models.list(**params)]
