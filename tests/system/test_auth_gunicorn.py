"""Client keys end to end: ``python -m app.keys hash`` run as an operator runs it, and the
official SDK against real gunicorn with keys configured (the configuration and the lookup
alone: tests/unit/policy/test_auth.py; the keys file and its reload: test_keys.py)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest
import requests
from fakebackend import FakeBackend, StreamReply, chunks
from servers import ROOT, Gunicorn
from waiting import eventually

from app.config import build_settings
from app.policy import auth
from app.policy.limits import key_table

ALICE = "sk-gw-alice-0123456789abcdef"
BOB = "sk-gw-bob-fedcba9876543210"
ALICE_SHA = hashlib.sha256(ALICE.encode()).hexdigest()
BODY = {
    "model": "claude-haiku-4-5",
    "max_tokens": 20,
    "messages": [{"role": "user", "content": "hi"}],
}


# --- python -m app.keys hash -----------------------------------------------------------------


def run_hash(stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.keys", "hash"],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_hash_command_prints_the_config_line_that_lets_the_key_in() -> None:
    result = run_hash(ALICE + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f'sha256 = "{ALICE_SHA}"\n'
    digest = result.stdout.split('"')[1]
    keys = build_settings({"auth": {"keys": [{"name": "a", "sha256": digest}]}}, {}).keys
    key, _ = auth.identify(key_table(keys), {"HTTP_X_API_KEY": ALICE})
    assert key is not None and key.name == "a"


@pytest.mark.parametrize("stdin", ["", "\n", "schlüssel\n"], ids=["empty", "blank", "non_ascii"])
def test_hash_command_refuses_what_no_client_could_send(stdin: str) -> None:
    result = run_hash(stdin)
    assert result.returncode == 1 and not result.stdout
    assert "printable ASCII key" in result.stderr


# --- through real gunicorn with the official SDK ---------------------------------------------

ADMIN = "admin-token-0123456789"


@pytest.fixture(scope="module")
def server(module_backend: FakeBackend, tmp_path_factory) -> Iterator[Gunicorn]:
    directory = tmp_path_factory.mktemp("auth")
    config = directory / "gateway.toml"
    config.write_text(
        f'[upstream]\nurl = "{module_backend.url}"\n'
        '[models]\n"claude-haiku-4-5" = "qwen3"\n'
        f'[admin]\ntoken_env = "ADMIN_TOKEN"\n'
        f'[[auth.keys]]\nname = "alice"\nsha256 = "{ALICE_SHA}"\n'
        f'[[auth.keys]]\nname = "bob"\nkey_env = "BOB_KEY"\n'
    )
    env = {
        "GATEWAY_CONFIG": str(config),
        "GATEWAY_RETRIES": "0",
        "BOB_KEY": BOB,
        "ADMIN_TOKEN": ADMIN,
    }
    gunicorn = Gunicorn(env, directory / "gunicorn.log")
    yield gunicorn
    gunicorn.stop()


@pytest.fixture(autouse=True)
def no_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK falls back to ANTHROPIC_API_KEY / ANTHROPIC_AUTH_TOKEN: keep the tests exact."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)


def sdk(server: Gunicorn, **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, max_retries=0, **kwargs)


def access_line(server: Gunicorn, request_id: str) -> dict[str, Any]:
    return eventually(
        lambda: next((e for e in server.access_lines() if e["request_id"] == request_id), None),
        f"no access line for {request_id}",
    )


def test_wrong_key_is_an_authentication_error(server, module_backend):
    sent = len(module_backend.requests)
    with sdk(server, api_key="sk-not-configured") as client:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            client.messages.create(**BODY)
    assert caught.value.status_code == 401
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert caught.value.body["error"] == {
        "type": "authentication_error",
        "message": "invalid API key",
    }
    assert len(module_backend.requests) == sent  # the backend never heard of it
    line = access_line(server, caught.value.request_id)
    assert line["status"] == 401 and line["key"] is None and line["client"].startswith("key_")
    assert "sk-not-configured" not in server.log_path.read_text()


def test_missing_key_is_an_authentication_error(server):
    reply = requests.post(server.url + "/v1/messages", json=BODY, timeout=10)
    assert reply.status_code == 401
    assert reply.json()["type"] == "error"
    assert reply.json()["error"]["type"] == "authentication_error"
    assert "x-api-key" in reply.json()["error"]["message"]


def test_right_key_as_x_api_key(server, module_backend):
    # This SDK version sends api_key as a bearer token; x-api-key is what older SDKs and
    # other clients send, so it is set by hand here.
    with sdk(server, default_headers={"x-api-key": ALICE}) as client:
        response = client.messages.with_raw_response.create(**BODY)
    assert module_backend.requests[-1].headers.get("authorization") is None
    assert response.parse().content[0].text == "Hello"
    assert response.http_request.headers["x-api-key"] == ALICE
    assert "authorization" not in response.http_request.headers
    line = access_line(server, response.headers["request-id"])
    assert line["key"] == "alice" and line["status"] == 200


def test_right_key_as_bearer_token_streamed(server, module_backend):
    module_backend.reply(StreamReply(chunks(["Hi", " Bob"])))
    with sdk(server, auth_token=BOB) as client:
        with client.messages.stream(**BODY) as stream:
            message = stream.get_final_message()
            request_id = stream.response.headers["request-id"]
    assert message.content[0].text == "Hi Bob"
    line = access_line(server, request_id)
    assert line["key"] == "bob" and line["stream"] is True


def test_count_tokens_and_models_need_a_key(server):
    payload = {k: v for k, v in BODY.items() if k != "max_tokens"}
    for method, path, body in [
        ("POST", "/v1/messages/count_tokens", payload),
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/claude-haiku-4-5", None),
        ("GET", "/v1/no-such-route", None),
    ]:
        denied = requests.request(method, server.url + path, json=body, timeout=10)
        assert denied.status_code == 401, path
        allowed = requests.request(
            method, server.url + path, json=body, headers={"x-api-key": ALICE}, timeout=10
        )
        assert allowed.status_code == (404 if "no-such" in path else 200), path
    with sdk(server, api_key=ALICE) as client:
        assert client.messages.count_tokens(**payload).input_tokens > 0
        assert client.models.list().data


def test_probes_metrics_and_status_stay_as_they_were(server):
    for path in ("/healthz", "/readyz", "/metrics"):
        assert requests.get(server.url + path, timeout=10).status_code == 200, path
    assert requests.get(server.url + "/status", timeout=10).status_code == 401
    client_key = {"x-api-key": ALICE}
    assert requests.get(server.url + "/status", headers=client_key, timeout=10).status_code == 401
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert requests.get(server.url + "/status", headers=admin, timeout=10).status_code == 200


def test_rejections_are_counted_by_reason(server):
    def unauthenticated() -> float:
        text = requests.get(server.url + "/metrics", timeout=10).text
        prefix = 'gateway_requests_rejected_total{key="",reason="unauthenticated"} '
        return sum(
            float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)
        )

    before = unauthenticated()
    for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}):
        reply = requests.post(server.url + "/v1/messages", json=BODY, headers=headers, timeout=10)
        assert reply.status_code == 401
    assert unauthenticated() == before + 3
