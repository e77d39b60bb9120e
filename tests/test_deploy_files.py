"""The shipped example configuration loads, so a newcomer's first copy of it works."""

from __future__ import annotations

from pathlib import Path

from app.config import load_settings
from app.routing import backend_model, resolve


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
