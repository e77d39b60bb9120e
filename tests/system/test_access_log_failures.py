"""The access line of a request that fails at the backend before any answer starts, streamed
or not: it says what the client asked for (``stream``) and which backend failed after how many
attempts, as real gunicorn writes it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from fakebackend import FakeBackend, JSONReply, error_body
from servers import Gunicorn
from waiting import eventually

BODY = {
    "model": "claude-haiku-4-5",
    "max_tokens": 20,
    "messages": [{"role": "user", "content": "hi"}],
}


def access_line(server: Gunicorn, request_id: str) -> dict:
    """The request's access line, once written (after the answer went out)."""
    return eventually(
        lambda: next((e for e in server.access_lines() if e["request_id"] == request_id), None),
        f"no access line for {request_id}",
    )


def post(server: Gunicorn, stream: bool) -> requests.Response:
    return requests.post(server.url + "/v1/messages", json={**BODY, "stream": stream}, timeout=30)


@pytest.fixture(scope="module")
def server(
    module_backend: FakeBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gunicorn]:
    log = tmp_path_factory.mktemp("failures") / "gunicorn.log"
    gunicorn = Gunicorn({"GATEWAY_UPSTREAM_URL": module_backend.url}, log)
    yield gunicorn
    gunicorn.stop()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize(
    ("backend_status", "status", "error"),
    [(429, 429, "rate_limit_error"), (500, 500, "api_error"), (503, 529, "overloaded_error")],
)
def test_a_backend_refusal_is_logged_with_stream_backend_and_attempts(
    server, module_backend, stream, backend_status, status, error
):
    module_backend.reply(
        JSONReply(error_body("no", error_type="server_error"), status=backend_status)
    )
    reply = post(server, stream)
    assert reply.status_code == status
    entry = access_line(server, reply.headers["request-id"])
    assert entry["stream"] is stream
    assert (entry["status"], entry["error"]) == (status, error)
    assert (entry["backend"], entry["attempts"]) == ("default", 1)
    assert (entry["model"], entry["route"]) == ("claude-haiku-4-5", "default")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_a_refused_connection_is_logged_with_every_attempt(tmp_path, stream):
    with FakeBackend() as gone:
        url = gone.url  # nothing listens there any more
    server = Gunicorn(
        {"GATEWAY_UPSTREAM_URL": url, "GATEWAY_RETRIES": "2"}, tmp_path / "gunicorn.log"
    )
    try:
        reply = post(server, stream)
        assert reply.status_code == 502
        entry = access_line(server, reply.headers["request-id"])
    finally:
        server.stop()
    assert entry["stream"] is stream
    assert (entry["status"], entry["error"]) == (502, "api_error")
    assert (entry["backend"], entry["attempts"]) == ("default", 3)  # the first and two retries


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_after_failover_the_line_names_the_last_backend_that_failed(tmp_path, stream):
    with FakeBackend() as first, FakeBackend() as second:
        for backend in (first, second):
            backend.reply(JSONReply(error_body("down", error_type="server_error"), status=500))
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'[[backends]]\nname = "first"\nurl = "{first.url}"\n'
            f'[[backends]]\nname = "second"\nurl = "{second.url}"\n'
            '[[routes]]\nmatch = "*"\n'
            'targets = [{ backend = "first" }, { backend = "second" }]\n'
        )
        server = Gunicorn({"GATEWAY_CONFIG": str(config)}, tmp_path / "gunicorn.log")
        try:
            reply = post(server, stream)
            assert reply.status_code == 500
            entry = access_line(server, reply.headers["request-id"])
        finally:
            server.stop()
    assert entry["stream"] is stream
    assert (entry["backend"], entry["attempts"]) == ("second", 2)
    assert (entry["route"], entry["error"]) == ("routes.0", "api_error")
