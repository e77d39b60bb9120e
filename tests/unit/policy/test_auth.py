"""Client keys: ``[[auth.keys]]`` and GATEWAY_API_KEYS (app/config.py), the lookup
(app/policy/auth.py), ``python -m app.keys hash``, and the official SDK against real gunicorn
with keys configured (the keys file and its reload: test_keys.py)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
import requests
from fakebackend import FakeBackend, StreamReply, chunks
from servers import ROOT, Gunicorn
from waiting import eventually

from app.config import ClientKey, ConfigError, Limits, build_settings, load_settings
from app.policy import auth
from app.policy.limits import key_table

ALICE = "sk-gw-alice-0123456789abcdef"
BOB = "sk-gw-bob-fedcba9876543210"
ALICE_SHA = hashlib.sha256(ALICE.encode()).hexdigest()
BOB_SHA = hashlib.sha256(BOB.encode()).hexdigest()
BODY = {
    "model": "claude-haiku-4-5",
    "max_tokens": 20,
    "messages": [{"role": "user", "content": "hi"}],
}


def keys_of(raw: dict[str, Any], env: dict[str, str] | None = None) -> tuple[ClientKey, ...]:
    return build_settings(raw, env or {}).keys


def config_error(raw: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        build_settings(raw, env or {})
    return str(caught.value)


# --- configuration ---------------------------------------------------------------------------


def test_no_keys_means_no_authentication() -> None:
    assert build_settings({}, {}).keys == ()


def test_keys_by_digest_or_by_environment_variable() -> None:
    raw = {
        "auth": {
            "keys": [
                {"name": "alice", "sha256": ALICE_SHA.upper()},
                {"name": "bob", "key_env": "BOB_KEY"},
            ]
        }
    }
    alice, bob = keys_of(raw, {"BOB_KEY": BOB})
    assert (alice.name, alice.sha256) == ("alice", hashlib.sha256(ALICE.encode()).digest())
    assert (bob.name, bob.sha256) == ("bob", hashlib.sha256(BOB.encode()).digest())
    assert alice.limits == bob.limits == Limits()


def test_limits_default_for_every_key_and_overridable_per_key() -> None:
    raw = {
        "limits": {"requests_per_minute": 60, "burst": 5, "max_concurrent": 4},
        "auth": {
            "keys": [
                {"name": "team", "sha256": ALICE_SHA},
                {"name": "ci", "sha256": BOB_SHA, "max_concurrent": 1, "requests_per_minute": 0},
            ]
        },
    }
    team, ci = keys_of(raw)
    assert team.limits == Limits(requests_per_minute=60.0, burst=5, max_concurrent=4)
    assert ci.limits == Limits(requests_per_minute=0.0, burst=5, max_concurrent=1)


def test_gateway_api_keys_replace_the_files_keys(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[limits]\nmax_concurrent = 2\n[[auth.keys]]\nname = "old"\nsha256 = "{BOB_SHA}"\n'
    )
    env = {"GATEWAY_CONFIG": str(path), "GATEWAY_API_KEYS": f" alice:{ALICE_SHA} , ci:{BOB_SHA}"}
    keys = load_settings(env).keys
    assert [k.name for k in keys] == ["alice", "ci"]
    assert keys[0].limits.max_concurrent == 2  # the file's [limits] still apply
    assert load_settings({"GATEWAY_API_KEYS": f"solo:{ALICE_SHA}"}).keys[0].name == "solo"


def test_keys_never_appear_in_repr() -> None:
    settings = build_settings({"auth": {"keys": [{"name": "bob", "key_env": "K"}]}}, {"K": BOB})
    for text in (repr(settings), repr(settings.keys[0])):
        assert BOB not in text and BOB_SHA not in text
        assert hashlib.sha256(BOB.encode()).digest().hex() not in text
    assert "bob" in repr(settings)


def entry(**fields: Any) -> dict[str, Any]:
    return {"auth": {"keys": [{"name": "ci", **fields}]}}


BAD_CONFIG = [
    (entry(), {}, "auth.keys.0: give either sha256 or key_env (key 'ci')"),
    (entry(sha256=ALICE_SHA, key_env="K"), {"K": "x"}, "auth.keys.0: give either sha256"),
    (entry(sha256=ALICE_SHA[:-1]), {}, "auth.keys.0.sha256: must be 64 hexadecimal digits"),
    (entry(sha256=ALICE), {}, "auth.keys.0.sha256: must be 64 hexadecimal digits"),
    (entry(sha256=5), {}, "auth.keys.0.sha256: must be 64"),
    (entry(key_env="K"), {}, "auth.keys.0.key_env: environment variable K is empty (key 'ci')"),
    (entry(key_env="K"), {"K": " padded "}, "auth.keys.0.key_env: the key in K must be"),
    (entry(key_env="K"), {"K": "schlüssel"}, "auth.keys.0.key_env: the key in K must be"),
    (entry(key=ALICE), {}, "auth.keys.0: plaintext keys are not accepted"),
    (entry(api_key=ALICE), {}, "auth.keys.0: plaintext keys are not accepted"),
    (entry(sha256=ALICE_SHA, rate=5), {}, "auth.keys.0.rate: unknown setting"),
    (entry(sha256=ALICE_SHA, max_concurrent=-1), {}, "auth.keys.0.max_concurrent: must be at"),
    (entry(sha256=ALICE_SHA, requests_per_minute="lots"), {}, "auth.keys.0.requests_per_minute:"),
    ({"auth": {"keys": [{"sha256": ALICE_SHA}]}}, {}, "auth.keys.0.name: required"),
    ({"auth": {"keys": [{"name": "a b", "sha256": ALICE_SHA}]}}, {}, "auth.keys.0.name:"),
    ({"auth": {"keys": [{"name": "", "sha256": ALICE_SHA}]}}, {}, "auth.keys.0.name:"),
    (
        {"auth": {"keys": [{"name": "a", "sha256": ALICE_SHA}, {"name": "a", "sha256": BOB_SHA}]}},
        {},
        "auth.keys.1.name: 'a' is declared twice",
    ),
    (
        {"auth": {"keys": [{"name": "a", "sha256": ALICE_SHA}, {"name": "b", "key_env": "K"}]}},
        {"K": ALICE},
        "auth.keys.1: key 'b' is the same key as auth.keys.0 ('a')",
    ),
    ({"auth": {"keys": {"name": "a"}}}, {}, "auth.keys: must be an array of tables"),
    ({"auth": {"key": []}}, {}, "auth.key: unknown setting"),
    ({"auth": "on"}, {}, "auth: must be a table"),
    ({"limits": {"max_concurrent": 2}}, {}, "limits: limits apply per client key"),
    (
        {"limits": {"burst": -1}, **entry(sha256=ALICE_SHA)},
        {},
        "limits.burst: must be at least 0",
    ),
    ({"limits": {"rpm": 5}, **entry(sha256=ALICE_SHA)}, {}, "limits.rpm: unknown setting"),
]


@pytest.mark.parametrize(("raw", "env", "message"), BAD_CONFIG)
def test_config_errors_name_the_setting_and_the_key(
    raw: dict[str, Any], env: dict[str, str], message: str
) -> None:
    error = config_error(raw, env)
    assert error.startswith(message)
    assert ALICE not in error and "schlüssel" not in error


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (f"alice={ALICE_SHA}", "GATEWAY_API_KEYS: entry 1 is not name:sha256"),
        (f"alice:{ALICE_SHA},{BOB}", "GATEWAY_API_KEYS: entry 2 is not name:sha256"),
        (f"alice:{ALICE}", "auth.keys.0.sha256: must be 64 hexadecimal digits"),
        (f":{ALICE_SHA}", "auth.keys.0.name: required"),
    ],
)
def test_gateway_api_keys_errors_do_not_repeat_the_value(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"GATEWAY_API_KEYS": value})
    assert str(caught.value).startswith(message)
    assert ALICE not in str(caught.value) and BOB not in str(caught.value)


# --- identifying the key a request presents --------------------------------------------------

TABLE = {hashlib.sha256(k.encode()).digest(): k for k in (ALICE, BOB)}


@pytest.mark.parametrize(
    ("environ", "found"),
    [
        ({"HTTP_X_API_KEY": ALICE}, ALICE),
        ({"HTTP_AUTHORIZATION": f"Bearer {BOB}"}, BOB),
        ({"HTTP_AUTHORIZATION": f"bearer  {BOB} "}, BOB),
        ({"HTTP_X_API_KEY": ALICE, "HTTP_AUTHORIZATION": f"Bearer {BOB}"}, ALICE),
        ({"HTTP_X_API_KEY": "stale", "HTTP_AUTHORIZATION": f"Bearer {BOB}"}, BOB),
        ({"HTTP_X_API_KEY": "sk-unknown"}, None),
        ({"HTTP_AUTHORIZATION": f"Basic {ALICE}"}, None),
        ({"HTTP_X_API_KEY": ALICE + " "}, None),
        ({}, None),
    ],
    ids=[
        "x_api_key",
        "bearer",
        "bearer_case_and_spaces",
        "both_x_api_key_first",
        "both_bearer_when_x_api_key_unknown",
        "unknown",
        "not_bearer",
        "exact_match_only",
        "none",
    ],
)
def test_identify_finds_the_presented_key(environ: dict[str, str], found: str | None) -> None:
    key, digest = auth.identify(TABLE, environ)
    assert key == found
    if found is not None:
        assert digest == hashlib.sha256(found.encode()).digest()


def test_identify_gives_the_digest_of_an_unknown_key_and_none_without_a_key() -> None:
    assert auth.identify(TABLE, {"HTTP_X_API_KEY": "k"}) == (None, hashlib.sha256(b"k").digest())
    assert auth.identify(TABLE, {"HTTP_AUTHORIZATION": "Bearer "}) == (None, None)
    assert auth.identify({}, {"HTTP_X_API_KEY": ALICE})[0] is None


def test_client_id_is_short_stable_and_not_the_key() -> None:
    digest = hashlib.sha256(ALICE.encode()).digest()
    assert auth.client_id(digest) == "key_" + ALICE_SHA[:12]
    assert auth.client_id(None) is None


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
