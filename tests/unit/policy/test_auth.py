"""Client keys: ``[[auth.keys]]`` and GATEWAY_API_KEYS (app/config/) and the lookup
(app/policy/auth.py); ``python -m app.keys hash`` and the SDK against real gunicorn with keys
configured: tests/system/test_auth_gunicorn.py."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from app.config import ClientKey, ConfigError, Limits, build_settings, load_settings
from app.policy import auth

ALICE = "sk-gw-alice-0123456789abcdef"
BOB = "sk-gw-bob-fedcba9876543210"
ALICE_SHA = hashlib.sha256(ALICE.encode()).hexdigest()
BOB_SHA = hashlib.sha256(BOB.encode()).hexdigest()


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
