"""Settings from a TOML file and environment overrides (app/config/)."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from app.backends.routing import backend_model, resolve
from app.config import (
    API_KEYS_ENV,
    BILLING_HEADER_MODES,
    ENGINES,
    LIMIT_FIELDS,
    LISTS,
    LOG_LEVELS,
    PROTOCOLS,
    STRATEGIES,
    TABLES,
    ConfigError,
    Limits,
    Routing,
    Settings,
    StateSettings,
    ThreadSettings,
    Timeouts,
    TranslateSettings,
    Upstream,
    build_settings,
    load_settings,
)
from app.config import ENV_OVERRIDES as DERIVED_OVERRIDES
from app.config.loader import read
from app.config.setting import Table
from app.translate.billing_header import MODES
from app.translate.dialect import DIALECTS

SECRET = "sk-live-0123456789abcdef"


def model_for(settings, requested: str) -> str:
    return backend_model(resolve(settings, requested).targets[0], requested)


def write_config(tmp_path: Path, text: str) -> dict[str, str]:
    """An environment whose GATEWAY_CONFIG points at a file holding ``text``."""
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return {"GATEWAY_CONFIG": str(path)}


def config_error(raw: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        build_settings(raw, env or {})
    return str(caught.value)


FULL_TOML = """
log_level = "DEBUG"
max_body_bytes = 2048

[upstream]
url = "https://llm.internal:8443/v1/"
model = "qwen3-32b"
dialect = "vllm"
connect_timeout = 2
read_timeout = 30.5
pool_size = 8
trust_env = true

[upstream.quirks]
max_stop_sequences = 2
top_k = false

[models]
"claude-sonnet-4-5" = "qwen3-32b-awq"
"""


# --- defaults and the file -------------------------------------------------------------------


def test_defaults_without_file_or_environment() -> None:
    settings = load_settings({})
    assert settings == Settings()
    assert settings.upstream.url == "http://127.0.0.1:8000/v1"
    assert settings.upstream.api_key == ""
    assert settings.upstream.model == ""
    assert settings.upstream.timeouts.connect == 5.0
    assert settings.upstream.timeouts.read == 600.0
    assert settings.upstream.pool_size == 0
    assert settings.upstream.trust_env is False
    assert settings.upstream.dialect == DIALECTS["generic"]
    assert settings.models == {}
    assert settings.max_body_bytes == 32 * 1024 * 1024
    assert settings.log_level == "info"


def test_toml_file_named_by_gateway_config_is_loaded(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, FULL_TOML))
    upstream = settings.upstream
    assert upstream.url == "https://llm.internal:8443/v1"
    assert upstream.model == "qwen3-32b"
    assert (upstream.timeouts.connect, upstream.timeouts.read) == (2.0, 30.5)
    assert isinstance(upstream.timeouts.connect, float)
    assert (upstream.pool_size, upstream.trust_env) == (8, True)
    assert upstream.dialect == replace(DIALECTS["vllm"], top_k=False, max_stop_sequences=2)
    assert settings.models == {"claude-sonnet-4-5": "qwen3-32b-awq"}
    assert (settings.max_body_bytes, settings.log_level) == (2048, "debug")


ENV_OVERRIDES = [
    (
        "GATEWAY_UPSTREAM_URL",
        "http://other:9000/v1/",
        lambda s: s.upstream.url,
        "http://other:9000/v1",
    ),
    ("GATEWAY_UPSTREAM_API_KEY", SECRET, lambda s: s.upstream.api_key, SECRET),
    ("GATEWAY_CONNECT_TIMEOUT", "0.5", lambda s: s.upstream.timeouts.connect, 0.5),
    ("GATEWAY_READ_TIMEOUT", "120", lambda s: s.upstream.timeouts.read, 120.0),
    ("GATEWAY_MAX_BODY_BYTES", "1048576", lambda s: s.max_body_bytes, 1048576),
    ("GATEWAY_LOG_LEVEL", "WARNING", lambda s: s.log_level, "warning"),
    ("GATEWAY_UPSTREAM_DIALECT", "openai", lambda s: s.upstream.dialect.name, "openai"),
    ("GATEWAY_UPSTREAM_MODEL", "llama-3.3-70b", lambda s: s.upstream.model, "llama-3.3-70b"),
]


@pytest.mark.parametrize(
    ("var", "value", "read", "expected"), ENV_OVERRIDES, ids=[row[0] for row in ENV_OVERRIDES]
)
def test_environment_overrides_win_over_the_file(
    tmp_path: Path, var: str, value: str, read: Any, expected: Any
) -> None:
    env = write_config(tmp_path, FULL_TOML) | {var: value}
    settings = load_settings(env)
    assert read(settings) == expected
    assert type(read(settings)) is type(expected)


def test_environment_overrides_apply_without_a_file() -> None:
    settings = load_settings(
        {"GATEWAY_UPSTREAM_URL": "https://api.deepseek.com", "GATEWAY_UPSTREAM_DIALECT": "deepseek"}
    )
    assert settings.upstream.url == "https://api.deepseek.com"
    assert settings.upstream.dialect == DIALECTS["deepseek"]


def test_empty_environment_variables_do_not_override(tmp_path: Path) -> None:
    env = write_config(tmp_path, FULL_TOML) | {"GATEWAY_UPSTREAM_URL": "", "GATEWAY_LOG_LEVEL": ""}
    settings = load_settings(env)
    assert settings.upstream.url == "https://llm.internal:8443/v1"
    assert settings.log_level == "debug"


def test_dialect_override_keeps_the_files_quirks(tmp_path: Path) -> None:
    env = write_config(tmp_path, FULL_TOML) | {"GATEWAY_UPSTREAM_DIALECT": "openai"}
    dialect = load_settings(env).upstream.dialect
    assert dialect.max_tokens_field == "max_completion_tokens"
    assert dialect.max_stop_sequences == 2


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1"),
        ("https://api.openai.com/v1//", "https://api.openai.com/v1"),
        ("http://localhost:11434/v1", "http://localhost:11434/v1"),
    ],
    ids=["one_slash", "two_slashes", "none"],
)
def test_trailing_slash_is_stripped_from_the_url(url: str, expected: str) -> None:
    assert build_settings({"upstream": {"url": url}}, {}).upstream.url == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), ("yes", True), ("1", True), ("off", False), ("FALSE", False), (False, False)],
    ids=["bool_true", "yes", "one", "off", "upper_false", "bool_false"],
)
def test_boolean_settings_accept_common_spellings(value: Any, expected: bool) -> None:
    assert build_settings({"upstream": {"trust_env": value}}, {}).upstream.trust_env is expected


@pytest.mark.parametrize(
    ("quirks", "expected"),
    [
        ({"top_k": True}, {"top_k": True}),
        (
            {"max_tokens_field": "max_completion_tokens"},
            {"max_tokens_field": "max_completion_tokens"},
        ),
        (
            {"user_field": "false", "stream_usage": "no"},
            {"user_field": False, "stream_usage": False},
        ),
        ({"max_stop_sequences": "4"}, {"max_stop_sequences": 4}),
    ],
    ids=["bool", "string", "bool_strings", "int_string"],
)
def test_quirks_override_dialect_fields(quirks: dict, expected: dict) -> None:
    dialect = build_settings({"upstream": {"quirks": quirks}}, {}).upstream.dialect
    assert dialect == replace(DIALECTS["generic"], **expected)


# --- the API key -----------------------------------------------------------------------------


def test_api_key_env_reads_the_key_from_the_environment() -> None:
    settings = build_settings(
        {"upstream": {"api_key_env": "DEEPSEEK_KEY"}}, {"DEEPSEEK_KEY": SECRET}
    )
    assert settings.upstream.api_key == SECRET


def test_api_key_env_through_load_settings(tmp_path: Path) -> None:
    env = write_config(tmp_path, '[upstream]\napi_key_env = "MY_KEY"\n') | {"MY_KEY": SECRET}
    assert load_settings(env).upstream.api_key == SECRET


def test_explicit_api_key_wins_over_api_key_env() -> None:
    raw = {"upstream": {"api_key": "sk-direct", "api_key_env": "UNSET_VAR"}}
    assert build_settings(raw, {}).upstream.api_key == "sk-direct"


def test_api_key_never_appears_in_repr(tmp_path: Path) -> None:
    env = write_config(tmp_path, FULL_TOML) | {"GATEWAY_UPSTREAM_API_KEY": SECRET}
    settings = load_settings(env)
    assert settings.upstream.api_key == SECRET
    for text in (repr(settings), str(settings), repr(settings.upstream)):
        assert SECRET not in text
        assert "Upstream(" in text


# --- backend model ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("models", "upstream_model", "requested", "expected"),
    [
        ({"claude-sonnet-4-5": "qwen3-32b"}, "fallback", "claude-sonnet-4-5", "qwen3-32b"),
        ({"claude-sonnet-4-5": "qwen3-32b"}, "fallback", "claude-haiku-4-5", "fallback"),
        ({}, "fallback", "claude-opus-4-1", "fallback"),
        ({}, "", "llama3.1:8b", "llama3.1:8b"),
        ({"a": "b"}, "", "a", "b"),
    ],
    ids=[
        "models_table",
        "upstream_model",
        "upstream_model_only",
        "requested_name",
        "table_no_default",
    ],
)
def test_backend_model_precedence(
    models: dict, upstream_model: str, requested: str, expected: str
) -> None:
    settings = build_settings({"upstream": {"model": upstream_model}, "models": models}, {})
    route = resolve(settings, requested)
    assert backend_model(route.targets[0], requested) == expected


def test_backend_model_from_a_loaded_file(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, FULL_TOML))
    assert model_for(settings, "claude-sonnet-4-5") == "qwen3-32b-awq"
    assert model_for(settings, "claude-opus-4-1") == "qwen3-32b"


# --- errors name the key -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "env", "key"),
    [
        ({"upstream": {"url": "ftp://files.example.com"}}, {}, "upstream.url:"),
        ({"upstream": {"url": "localhost:8000"}}, {}, "upstream.url:"),
        ({"bogus": 1}, {}, "bogus:"),
        ({"upstream": {"bogus": 1}}, {}, "upstream.bogus:"),
        ({"upstream": {"dialect": "gpt5"}}, {}, "upstream.dialect:"),
        ({"upstream": {"quirks": {"turbo": True}}}, {}, "upstream.quirks.turbo:"),
        ({"upstream": {"quirks": {"name": "x"}}}, {}, "upstream.quirks.name:"),
        ({"upstream": {"quirks": {"top_k": "maybe"}}}, {}, "upstream.quirks.top_k:"),
        (
            {"upstream": {"quirks": {"max_stop_sequences": "many"}}},
            {},
            "upstream.quirks.max_stop_sequences:",
        ),
        (
            {"upstream": {"quirks": {"max_stop_sequences": True}}},
            {},
            "upstream.quirks.max_stop_sequences:",
        ),
        (
            {"upstream": {"quirks": {"max_tokens_field": 5}}},
            {},
            "upstream.quirks.max_tokens_field:",
        ),
        (
            {"upstream": {"quirks": {"max_tokens_field": "limit"}}},
            {},
            "upstream.quirks.max_tokens_field:",
        ),
        ({"upstream": {"quirks": ["top_k"]}}, {}, "upstream.quirks:"),
        ({"upstream": {"connect_timeout": -1}}, {}, "upstream.connect_timeout:"),
        ({"upstream": {"connect_timeout": 0}}, {}, "upstream.connect_timeout:"),
        ({"upstream": {"read_timeout": "soon"}}, {}, "upstream.read_timeout:"),
        ({"upstream": {"read_timeout": True}}, {}, "upstream.read_timeout:"),
        ({"upstream": {"pool_size": -2}}, {}, "upstream.pool_size:"),
        ({"upstream": {"trust_env": "perhaps"}}, {}, "upstream.trust_env:"),
        ({"max_body_bytes": False}, {}, "max_body_bytes:"),
        ({"max_body_bytes": 100}, {}, "max_body_bytes:"),
        ({"max_body_bytes": "big"}, {}, "max_body_bytes:"),
        ({"log_level": "verbose"}, {}, "log_level:"),
        ({"models": {"claude": 5}}, {}, "models:"),
        ({"models": {"claude": ""}}, {}, "models:"),
        ({"models": "claude=qwen"}, {}, "models:"),
        ({"upstream": {"api_key_env": "MY_KEY"}}, {"MY_KEY": ""}, "upstream.api_key_env:"),
        ({"upstream": {"api_key_env": "MY_KEY"}}, {}, "upstream.api_key_env:"),
    ],
    ids=[
        "url_ftp",
        "url_without_scheme",
        "unknown_top_level_key",
        "unknown_upstream_key",
        "unknown_dialect",
        "unknown_quirk",
        "quirk_name",
        "quirk_bool_type",
        "quirk_int_type",
        "quirk_int_bool",
        "quirk_string_type",
        "quirk_bad_field_value",
        "quirks_not_table",
        "negative_timeout",
        "zero_timeout",
        "non_numeric_timeout",
        "boolean_timeout",
        "negative_pool",
        "bad_boolean",
        "boolean_max_body",
        "tiny_max_body",
        "non_numeric_max_body",
        "bad_log_level",
        "model_not_string",
        "model_empty",
        "models_not_table",
        "api_key_env_empty",
        "api_key_env_unset",
    ],
)
def test_invalid_settings_raise_config_error_naming_the_key(raw: dict, env: dict, key: str) -> None:
    assert config_error(raw, env).startswith(key)


BAD_ENV = [
    ("GATEWAY_UPSTREAM_URL", "gpu-box:8000", "upstream.url:"),
    ("GATEWAY_CONNECT_TIMEOUT", "fast", "upstream.connect_timeout:"),
    ("GATEWAY_READ_TIMEOUT", "-5", "upstream.read_timeout:"),
    ("GATEWAY_MAX_BODY_BYTES", "1e9", "max_body_bytes:"),
    ("GATEWAY_LOG_LEVEL", "trace", "log_level:"),
    ("GATEWAY_UPSTREAM_DIALECT", "mistral", "upstream.dialect:"),
]


@pytest.mark.parametrize(("var", "value", "key"), BAD_ENV, ids=[row[0] for row in BAD_ENV])
def test_invalid_environment_overrides_raise_config_error(var: str, value: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_settings({var: value})


def test_invalid_toml_raises_config_error_naming_the_file(tmp_path: Path) -> None:
    env = write_config(tmp_path, "[upstream\nurl = 'x'\n")
    with pytest.raises(ConfigError, match=r"^GATEWAY_CONFIG=.*gateway\.toml: invalid TOML"):
        load_settings(env)


def test_missing_file_raises_config_error_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"^GATEWAY_CONFIG=.*nope\.toml: cannot read file"):
        load_settings({"GATEWAY_CONFIG": str(missing)})


def test_upstream_not_a_table_in_the_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^upstream: must be a table"):
        load_settings(write_config(tmp_path, 'upstream = "http://x"\n'))


def test_config_errors_never_show_the_api_key() -> None:
    message = config_error({"upstream": {"api_key": SECRET, "url": "nope"}})
    assert SECRET not in message


@pytest.mark.parametrize("how", ["env_override_on_bad_table", "build_settings_direct"])
def test_upstream_not_a_table_is_always_a_config_error(tmp_path: Path, how: str) -> None:
    with pytest.raises(ConfigError, match="^upstream"):
        if how == "build_settings_direct":
            build_settings({"upstream": "http://x"}, {})
        else:
            env = write_config(tmp_path, 'upstream = "http://x"\n')
            load_settings(env | {"GATEWAY_UPSTREAM_URL": "http://y"})


def test_dialect_of_the_wrong_type_is_a_config_error() -> None:
    assert config_error({"upstream": {"dialect": ["vllm"]}}).startswith("upstream.dialect:")


@pytest.mark.parametrize(
    ("var", "key"),
    [
        ("GATEWAY_READ_TIMEOUT", "upstream.read_timeout:"),
        ("GATEWAY_CONNECT_TIMEOUT", "upstream.connect_timeout:"),
    ],
    ids=["read", "connect"],
)
def test_nan_timeout_is_a_config_error(var: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_settings({var: "nan"})


# --- whole numbers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[routing]\nretries = inf\n", "routing.retries:"),
        ("[routing]\nretries = -inf\n", "routing.retries:"),
        ("[routing]\nretries = nan\n", "routing.retries:"),
        ("max_body_bytes = inf\n", "max_body_bytes:"),
        ("[upstream]\npool_size = inf\n", "upstream.pool_size:"),
        ("[upstream.quirks]\nmax_tokens_cap = inf\n", "upstream.quirks.max_tokens_cap:"),
        ("[threads]\nmax_bytes = 1e400\n", "threads.max_bytes:"),
    ],
    ids=["inf", "minus_inf", "nan", "max_body_inf", "pool_inf", "quirk_inf", "huge"],
)
def test_inf_or_nan_in_a_whole_number_setting_is_a_config_error(
    tmp_path: Path, text: str, key: str
) -> None:
    """Not an OverflowError with a traceback: the one line that names the key."""
    with pytest.raises(ConfigError, match=f"^{key} must be a whole number"):
        load_settings(write_config(tmp_path, text))


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"routing": {"retries": 2.7}}, "routing.retries:"),
        ({"routing": {"breaker_failures": 0.5}}, "routing.breaker_failures:"),
        ({"max_body_bytes": 4096.5}, "max_body_bytes:"),
        ({"upstream": {"max_concurrency": 1.25}}, "upstream.max_concurrency:"),
        ({"upstream": {"quirks": {"context_window": 8192.5}}}, "upstream.quirks.context_window:"),
        ({"routing": {"retries": "2.7"}}, "routing.retries:"),
        ({"routing": {"retries": [2]}}, "routing.retries:"),
    ],
    ids=["retries", "breaker", "max_body", "concurrency", "quirk", "text", "list"],
)
def test_a_fraction_in_a_whole_number_setting_is_a_config_error(raw: dict, key: str) -> None:
    """``retries = 2.7`` was silently 2."""
    assert config_error(raw).startswith(f"{key} must be a whole number")


def test_whole_numbers_may_be_written_as_integral_floats_or_text() -> None:
    """TOML's ``2.0`` is exactly 2, and environment variables are text."""
    settings = build_settings(
        {"routing": {"retries": 3.0}, "upstream": {"quirks": {"max_tokens_cap": 8192.0}}}, {}
    )
    assert settings.routing.retries == 3 and type(settings.routing.retries) is int
    assert settings.upstream.dialect.max_tokens_cap == 8192
    assert load_settings({"GATEWAY_RETRIES": "4"}).routing.retries == 4
    assert load_settings({"GATEWAY_MAX_BODY_BYTES": " 2048 "}).max_body_bytes == 2048


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"upstream": {"read_timeout": float("inf")}}, "upstream.read_timeout:"),
        ({"ping_interval": float("nan")}, "ping_interval:"),
        ({"routing": {"backoff": float("-inf")}}, "routing.backoff:"),
    ],
    ids=["timeout", "ping", "backoff"],
)
def test_inf_or_nan_in_a_number_setting_is_a_config_error(raw: dict, key: str) -> None:
    assert config_error(raw).startswith(key)


# --- URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://h:abc/v1", "the port must be a number from 1 to 65535"),
        ("http://h:99999/v1", "the port must be a number from 1 to 65535"),
        ("http://h:0/v1", "the port must be a number from 1 to 65535"),
        ("http://h:-1/v1", "the port must be a number from 1 to 65535"),
        ("http:///v1", "no valid host"),
        ("http://:8000/v1", "no valid host"),
        ("http://gpu box:8000/v1", "no valid host"),
        ("http://[::1/v1", "not a URL"),
        ("http:/h/v1", "must start with http:// or https://"),
    ],
    ids=["port_word", "port_high", "port_zero", "port_negative", "no_host", "port_only",
         "space", "open_bracket", "one_slash"],
)  # fmt: skip
def test_a_backend_url_that_cannot_be_used_is_a_config_error(url: str, problem: str) -> None:
    """Such a URL passed validation and then stopped every worker at boot."""
    assert config_error({"upstream": {"url": url}}).startswith(f"upstream.url: {problem}")
    message = config_error({"backends": [{"name": "b", "url": url}]})
    assert message.startswith(f"backends.0.url: {problem}")


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1]:8000/v1",
        "http://[fe80::1%25eth0]:8000/v1",
        "https://llm.internal/v1",
        "http://127.0.0.1:65535",
        "http://vllm_1:8000/v1",
    ],
    ids=["ipv6", "ipv6_zone", "no_port", "top_port", "underscore"],
)
def test_usable_backend_urls_are_accepted(url: str) -> None:
    assert build_settings({"upstream": {"url": url}}, {}).upstream.url == url


@pytest.mark.parametrize(
    "proxy", ["http://proxy:abc", "http://proxy:70000", "socks5://proxy:1080", "http://"]
)
def test_a_proxy_url_that_cannot_be_used_is_a_config_error(proxy: str) -> None:
    assert config_error({"upstream": {"proxy": proxy}}).startswith("upstream.proxy:")


def test_a_bad_proxy_url_error_does_not_show_its_password() -> None:
    message = config_error({"upstream": {"proxy": f"http://user:{SECRET}@proxy:abc"}})
    assert message.startswith("upstream.proxy: the port must be")
    assert SECRET not in message and "***@proxy:abc" in message


def test_a_redis_url_with_a_bad_port_is_a_config_error() -> None:
    message = config_error({"state": {"redis_url": "redis://127.0.0.1:x/0"}})
    assert message.startswith("state.redis_url: the port must be")
    ok = build_settings({"state": {"redis_url": "unix:///run/redis.sock"}}, {})
    assert ok.state.engine == "redis"


NASTY_URLS = [
    "http://h%zz/v1",
    "http://[::1]x:80/v1",
    "http://[::1/v1",
    "http://[::1]]/v1",
    "http://[v1.x]/v1",
    "http://[::1%]/v1",
    "http://[::1%e th]/v1",
    "http://::1/v1",
    "http://h:0/v1",
    "http://h:65536/v1",
    "http://h:-1/v1",
    "http://h:+80/v1",
    "http://h: 80/v1",
    "http://h:/v1",
    "http:///v1",
    "http://a b/v1",
    "http://h\n/v1",
    "http://h\x00/v1",
    "http://user@/v1",
    "http://user@:80/v1",
    "http://.h/v1",
    "http://*.h/v1",
    "http://h..x/v1",
    "http://bücher.example/v1",
    "http://\u3002/v1",
    "http://999.1.1.1/v1",
    "http://h#x/v1",
]


def requests_refuses(url: str) -> bool:
    try:
        requests.Request("POST", url).prepare()
    except Exception:  # noqa: BLE001 - whatever requests raises, it refuses the URL
        return True
    return False


def config_refuses(key: str, url: str) -> bool:
    """Whether the config refuses ``url`` as ``key`` (upstream.url or upstream.proxy), with
    the one-line error naming the key: any other exception fails the test."""
    try:
        build_settings({"upstream": {key: url}}, {})
    except ConfigError as error:
        assert str(error).startswith(f"upstream.{key}: ") and "\n" not in str(error)
        return True
    return False


@pytest.mark.parametrize("key", ["url", "proxy"])
@pytest.mark.parametrize("url", NASTY_URLS)
def test_no_url_the_config_accepts_is_one_requests_refuses(key: str, url: str) -> None:
    """A URL the config took and requests refused stopped every worker at boot."""
    assert config_refuses(key, url) or not requests_refuses(url)


URL_PIECES = st.sampled_from(
    ["h", "llm", "a-b", "x_y", "127.0.0.1", "::1", "[", "]", "[::1]", "[fe80::1%25eth0]",
     "%", "%zz", "%41", "@", "user@", ":", ":80", ":0", ":65536", ".", "-", "*", " ", "\n",
     "\t", "/", "?", "#", "ü", "\u3002", "0", "99999"]
)  # fmt: skip


@given(
    pieces=st.lists(URL_PIECES | st.text(max_size=3), max_size=6),
    key=st.sampled_from(["url", "proxy"]),
)
def test_no_generated_url_the_config_accepts_is_one_requests_refuses(
    pieces: list[str], key: str
) -> None:
    url = "http://" + "".join(pieces) + "/v1"
    assert config_refuses(key, url) or not requests_refuses(url)


# --- the schema ------------------------------------------------------------------------------


def test_environment_variable_names_and_their_keys_stay_as_operators_know_them() -> None:
    """Derived from the schema now; deployed env files name these."""
    assert DERIVED_OVERRIDES == {
        "GATEWAY_UPSTREAM_URL": ("upstream", "url"),
        "GATEWAY_UPSTREAM_API_KEY": ("upstream", "api_key"),
        "GATEWAY_UPSTREAM_MODEL": ("upstream", "model"),
        "GATEWAY_UPSTREAM_DIALECT": ("upstream", "dialect"),
        "GATEWAY_CONNECT_TIMEOUT": ("upstream", "connect_timeout"),
        "GATEWAY_READ_TIMEOUT": ("upstream", "read_timeout"),
        "GATEWAY_MAX_BODY_BYTES": ("", "max_body_bytes"),
        "GATEWAY_LOG_LEVEL": ("", "log_level"),
        "GATEWAY_ADMIN_TOKEN": ("admin", "token"),
        "GATEWAY_RETRIES": ("routing", "retries"),
        "GATEWAY_PING_INTERVAL": ("", "ping_interval"),
        "GATEWAY_BODY_TIMEOUT": ("", "body_timeout"),
        "GATEWAY_STATE_DIR": ("state", "directory"),
        "GATEWAY_REDIS_URL": ("state", "redis_url"),
        "GATEWAY_STATE_ON_FAILURE": ("state", "on_failure"),
        "GATEWAY_BATCH_DIR": ("batches", "directory"),
        "GATEWAY_BILLING_HEADER": ("translate", "billing_header"),
    }
    assert API_KEYS_ENV == "GATEWAY_API_KEYS"
    assert set(TABLES) == {
        "upstream", "models", "routing", "admin", "auth", "limits", "state", "threads",
        "batches", "translate",
    }  # fmt: skip
    assert set(LISTS) == {"backends", "routes"}
    assert LIMIT_FIELDS == tuple(f.name for f in fields(Limits))


@pytest.mark.parametrize(
    "schema",
    [Upstream, Routing, Limits, StateSettings, ThreadSettings, TranslateSettings, Timeouts],
    ids=lambda cls: cls.__name__,
)
def test_an_empty_table_reads_as_the_schemas_defaults(schema: type) -> None:
    """The loader takes every default from the declaration: none is written a second time."""
    assert read(schema, Table({}, "t", {})) == schema()


def test_choices_come_from_the_literal_types() -> None:
    assert PROTOCOLS == ("openai", "anthropic")
    assert STRATEGIES == ("failover", "weighted", "least_busy", "affinity")
    assert ENGINES == ("sqlite", "redis")
    assert LOG_LEVELS == ("debug", "info", "warning", "error")
    assert BILLING_HEADER_MODES == MODES == ("normalize", "drop", "keep")
    message = config_error({"routes": [{"match": "*", "backend": "default", "strategy": "x"}]})
    assert message == (
        "routes.0.strategy: must be one of failover, weighted, least_busy, affinity (got 'x')"
    )


def test_the_four_timeouts_are_one_value() -> None:
    timeouts = build_settings(
        {"upstream": {"read_timeout": 60, "idle_timeout": 5, "total_timeout": 30}}, {}
    ).upstream.timeouts
    assert timeouts == Timeouts(connect=5.0, read=60.0, idle=5.0, total=30.0)
    assert (timeouts.first_byte, timeouts.between_chunks) == (30.0, 5.0)
    assert (Timeouts().first_byte, Timeouts().between_chunks) == (600.0, 600.0)
