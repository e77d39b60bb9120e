"""The shipped example configuration loads, so a newcomer's first copy of it works."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from app.backends.routing import backend_model, resolve
from app.config import load_settings


def model_for(settings, requested: str) -> str:
    return backend_model(resolve(settings, requested).targets[0], requested)


EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "gateway.example.toml"


def test_example_config_loads_with_its_key_variable_set() -> None:
    settings = load_settings({"GATEWAY_CONFIG": str(EXAMPLE), "BACKEND_API_KEY": "sk-test"})
    assert settings.upstream.api_key == "sk-test"
    assert settings.upstream.dialect.name == "vllm"
    assert settings.upstream.dialect.max_tokens_cap == 8192
    assert model_for(settings, "claude-haiku-4-5") == "qwen3-8b"
    assert model_for(settings, "claude-sonnet-4-6") == "qwen3-32b"


def test_example_client_keys_and_limits_load_once_uncommented(tmp_path: Path) -> None:
    """The commented [[auth.keys]] and [limits] blocks are valid as they stand."""
    text = EXAMPLE.read_text()
    start = text.index("# Client keys.")
    setting = re.compile(r"^# (\[.*\]|[a-z_0-9]+ = .*)$")
    lines = [setting.sub(r"\1", line) for line in text[start:].splitlines()]
    digest = hashlib.sha256(b"sk-alice").hexdigest()
    block = "\n".join(lines).replace("<64 hex digits>", digest)
    assert "[[auth.keys]]" in block.splitlines() and "[limits]" in block.splitlines()
    config = tmp_path / "gateway.toml"
    config.write_text(text[:start] + block)
    env = {"GATEWAY_CONFIG": str(config), "BACKEND_API_KEY": "k", "GATEWAY_KEY_CI": "sk-ci"}
    alice, ci = load_settings(env).keys
    assert alice.name == "alice" and alice.sha256 == hashlib.sha256(b"sk-alice").digest()
    assert alice.limits.requests_per_minute == 60 and alice.limits.max_concurrent == 4
    assert ci.limits.requests_per_minute == 600 and ci.limits.max_concurrent == 16
