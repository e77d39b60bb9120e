"""An Anthropic-speaking backend's stream, relayed (app/translate/passthrough.py)."""

from __future__ import annotations

import json

from app.translate.passthrough import PassthroughStream


def start_of(usage: dict) -> dict:
    stream = PassthroughStream(model="claude-x")
    event = {"type": "message_start", "message": {"id": "msg_01a", "model": "m", "usage": usage}}
    [start] = stream.feed_data(json.dumps(event).encode())
    return start["message"]["usage"]


def test_message_start_without_cache_counts_gets_them_as_zero() -> None:
    """vLLM's own /v1/messages sends only input and output tokens in message_start; Anthropic's
    API and the gateway's chat translation send the cache counts too."""
    assert start_of({"input_tokens": 455, "output_tokens": 0}) == {
        "input_tokens": 455,
        "output_tokens": 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    nulls = {
        "input_tokens": 9,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": None,
    }
    assert start_of(nulls)["cache_read_input_tokens"] == 0


def test_message_start_cache_counts_the_backend_sent_are_kept() -> None:
    usage = {"input_tokens": 71, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 384}
    assert start_of({**usage, "output_tokens": 1}) == {**usage, "output_tokens": 1}
