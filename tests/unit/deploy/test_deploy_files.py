"""The shipped example configuration loads, so a newcomer's first copy of it works (served by
real gunicorn: tests/system/test_deploy_files_gunicorn.py)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from app.backends.routing import backend_model, resolve
from app.config import load_settings


def model_for(settings, requested: str) -> str:
    return backend_model(resolve(settings, requested).targets[0], requested)


EXAMPLE = Path(__file__).resolve().parents[3] / "deploy" / "gateway.example.toml"


def test_example_config_loads_for_a_backend_that_needs_no_key() -> None:
    settings = load_settings({"GATEWAY_CONFIG": str(EXAMPLE)})
    assert settings.upstream.api_key == ""
    assert settings.upstream.dialect.name == "vllm"
    assert settings.upstream.dialect.max_tokens_cap == 8192
    assert model_for(settings, "claude-haiku-4-5") == "qwen3-8b"
    assert model_for(settings, "claude-sonnet-4-6") == "qwen3-32b"


def test_example_backend_key_is_read_from_its_variable_once_uncommented(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    line = '# api_key_env = "BACKEND_API_KEY"'
    assert line in text.splitlines()
    config = tmp_path / "gateway.toml"
    config.write_text(text.replace(line, line.removeprefix("# ")))
    settings = load_settings({"GATEWAY_CONFIG": str(config), "BACKEND_API_KEY": "sk-test"})
    assert settings.upstream.api_key == "sk-test"


def test_example_client_keys_limits_and_state_load_once_uncommented(tmp_path: Path) -> None:
    """The commented [auth], [[auth.keys]], [limits] and [state] blocks are valid as they
    stand, and the keys file they name is read with them."""
    text = EXAMPLE.read_text()
    start = text.index("# Client keys.")
    setting = re.compile(r"^# (\[.*\]|[a-z_0-9]+ = .*)$")
    lines = [setting.sub(r"\1", line) for line in text[start:].splitlines()]
    keys_file = tmp_path / "keys.toml"
    digest = hashlib.sha256(b"sk-alice").hexdigest()
    keys_file.write_text(f'[[keys]]\nname = "alice"\nsha256 = "{digest}"\n')
    block = "\n".join(lines).replace("/etc/anthropic-gateway/keys.toml", str(keys_file))
    for table in ("[auth]", "[[auth.keys]]", "[limits]", "[state]"):
        assert table in block.splitlines(), table
    config = tmp_path / "gateway.toml"
    config.write_text(text[:start] + block)
    env = {"GATEWAY_CONFIG": str(config), "BACKEND_API_KEY": "k", "GATEWAY_KEY_CI": "sk-ci"}
    settings = load_settings(env)
    ci, alice = settings.keys
    assert alice.name == "alice" and alice.sha256 == hashlib.sha256(b"sk-alice").digest()
    assert alice.limits.requests_per_minute == 60 and alice.limits.max_concurrent == 4
    assert alice.limits.output_tokens_per_minute == 40000
    assert alice.limits.tokens_per_day == 5000000
    assert ci.limits.requests_per_minute == 600 and ci.limits.max_concurrent == 16
    assert ci.expires is not None
    assert settings.state.directory == "/var/lib/anthropic-gateway"
    assert settings.state.engine == "sqlite" and settings.state.on_failure == "open"
