"""Hypothesis against a live gateway (real gunicorn): requests shaped like the Messages API,
with any field replaced by any JSON value, and bodies that are not requests at all.

Whatever arrives (1,300 requests a run; more with GATEWAY_FUZZ_EXAMPLES), the answer is never
a 5xx: a 200 (the request was fine), or a 4xx in Anthropic's envelope that names the field.
After the run the gateway holds nothing and serves the next client.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from fakebackend import FakeBackend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import Gunicorn

ADMIN = "admin-token-fuzz"
# Examples per property; a longer run by hand: GATEWAY_FUZZ_EXAMPLES=5000 ./scripts/test -k fuzz
EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "600"))

leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def maybe(strategy: st.SearchStrategy, noise: float = 0.25) -> st.SearchStrategy:
    """Mostly a plausible value, sometimes anything at all."""
    return st.one_of(strategy, json_values) if noise else strategy


BLOCK_TYPES = [
    "text", "image", "tool_use", "tool_result", "document", "thinking", "redacted_thinking",
    "search_result", "server_tool_use", "tool_reference", "container_upload", "bogus",
]  # fmt: skip

blocks = st.fixed_dictionaries(
    {"type": maybe(st.sampled_from(BLOCK_TYPES))},
    optional={
        "text": maybe(st.text(max_size=20)),
        "id": maybe(st.text(max_size=8)),
        "name": maybe(st.sampled_from(["t", "Bash", ""])),
        "input": json_values,
        "tool_use_id": maybe(st.text(max_size=8)),
        "content": maybe(st.text(max_size=10) | st.lists(json_values, max_size=3)),
        "is_error": json_values,
        "source": maybe(
            st.fixed_dictionaries(
                {"type": maybe(st.sampled_from(["base64", "url", "text", "content", "file"]))},
                optional={
                    "media_type": maybe(st.sampled_from(["image/png", "image/tiff", ""])),
                    "data": maybe(st.text(max_size=12)),
                    "url": maybe(st.sampled_from(["https://x/y.png", "ftp://x", ""])),
                    "content": json_values,
                },
            )
        ),
        "signature": json_values,
        "thinking": json_values,
        "cache_control": json_values,
    },
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": maybe(st.sampled_from(["user", "assistant", "system", "tool"])),
            "content": maybe(st.text(max_size=20) | st.lists(blocks, max_size=4)),
        }
    ),
    max_size=5,
)
tools = st.lists(
    st.fixed_dictionaries(
        {"name": maybe(st.sampled_from(["t", "Bash", ""]))},
        optional={
            "input_schema": json_values,
            "description": json_values,
            "type": maybe(st.sampled_from(["custom", "web_search_20250305"])),
        },
    ),
    max_size=3,
)
requests_bodies = st.fixed_dictionaries(
    {
        "model": maybe(st.sampled_from(["claude-sonnet-4-6", ""])),
        "max_tokens": maybe(st.integers(min_value=-5, max_value=70000)),
        "messages": maybe(messages, 0.1),
    },
    optional={
        "stream": maybe(st.booleans()),
        "system": maybe(st.text(max_size=10) | st.lists(blocks, max_size=2)),
        "tools": maybe(tools),
        "tool_choice": maybe(
            st.fixed_dictionaries(
                {"type": maybe(st.sampled_from(["auto", "any", "tool", "none"]))},
                optional={"name": json_values, "disable_parallel_tool_use": json_values},
            )
        ),
        "thinking": maybe(
            st.fixed_dictionaries(
                {"type": maybe(st.sampled_from(["enabled", "disabled", "adaptive"]))},
                optional={"budget_tokens": json_values},
            )
        ),
        "output_config": maybe(
            st.fixed_dictionaries({}, optional={"effort": json_values, "format": json_values})
        ),
        "metadata": json_values,
        "stop_sequences": maybe(st.lists(st.text(max_size=5), max_size=6)),
        "temperature": json_values,
        "top_p": json_values,
        "top_k": json_values,
        "mcp_servers": json_values,
        "thread": maybe(
            st.fixed_dictionaries(
                {"type": maybe(st.sampled_from(["create", "continue", "fork"]))},
                optional={"previous_message_id": maybe(st.text(max_size=8))},
            )
        ),
        "container": json_values,
    },
)


PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5E"
    "rkJggg=="
)


@st.composite
def valid_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A request that the gateway accepts, using most of what the API has."""
    body: dict[str, Any] = {
        "model": "claude-sonnet-4-6",
        "max_tokens": draw(st.integers(1, 64000)),
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": PNG}},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                                "data": "notes"}, "title": "Notes"},
            ]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hm", "signature": "gw1.abc"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Oslo"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1",
                 "content": [{"type": "text", "text": "3 C"}]},
                {"type": "text", "text": "And now?"},
            ]},
        ],
        "tools": [{"name": "get_weather", "description": "Weather.", "input_schema": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}],
        "tool_choice": draw(st.sampled_from([
            {"type": "auto", "disable_parallel_tool_use": True},
            {"type": "tool", "name": "get_weather"},
            {"type": "any"},
        ])),
        "thinking": draw(st.sampled_from([
            {"type": "enabled", "budget_tokens": 1024}, {"type": "adaptive"}, {"type": "disabled"}
        ])),
        "output_config": {"effort": draw(st.sampled_from(["low", "medium", "high", "max"]))},
        "metadata": {"user_id": "u1"},
        "stop_sequences": ["END"],
        "temperature": 0.5,
        "top_k": 5,
        "stream": draw(st.booleans()),
    }  # fmt: skip
    return body


def _paths(value: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*path, index))


@st.composite
def mutated_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A valid request with one to three places in it replaced by any JSON value, or
    removed: each field's validation, on its own and in company."""
    body = draw(valid_bodies())
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(body) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = body
        for step in path[:-1]:
            parent = parent[step]
        if isinstance(parent, dict) and draw(st.booleans()) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return body


@pytest.fixture(scope="module")
def gateway(module_backend: FakeBackend, tmp_path_factory) -> Iterator[Gunicorn]:
    directory = tmp_path_factory.mktemp("fuzz")
    config = directory / "gateway.toml"
    config.write_text(
        f'[upstream]\nurl = "{module_backend.url}"\n[routing]\nretries = 0\n'
        f'[admin]\ntoken = "{ADMIN}"\n'
    )
    server = Gunicorn({"GATEWAY_CONFIG": str(config)}, directory / "gunicorn.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def session(gateway: Gunicorn) -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.trust_env = False
        yield s


def check(response: requests.Response) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        assert body["type"] == "error" and body["error"]["type"]
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        assert len(body["error"]["message"]) < 1000


@settings(
    max_examples=EXAMPLES * 2 // 3, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(body=requests_bodies)
def test_any_messages_request_gets_a_200_or_a_named_4xx(gateway, session, body: dict[str, Any]):
    raw = json.dumps(body).encode()
    response = session.post(gateway.url + "/v1/messages", data=raw, timeout=30)
    check(response)
    if response.status_code == 400:
        message = response.json()["error"]["message"]
        assert ":" in message or "JSON" in message  # names the field (path: problem)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=mutated_bodies())
def test_a_valid_request_with_any_field_changed_gets_a_200_or_a_named_4xx(gateway, session, body):
    response = session.post(
        gateway.url + "/v1/messages", data=json.dumps(body).encode(), timeout=30
    )
    check(response)


@settings(max_examples=EXAMPLES // 4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=requests_bodies | mutated_bodies())
def test_any_count_tokens_request_gets_a_200_or_a_named_4xx(gateway, session, body):
    url = gateway.url + "/v1/messages/count_tokens"
    check(session.post(url, data=json.dumps(body).encode(), timeout=30))


@settings(max_examples=EXAMPLES // 4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_bodies_that_are_not_requests_get_a_4xx(gateway, session, raw: bytes):
    response = session.post(gateway.url + "/v1/messages", data=raw, timeout=30)
    check(response)
    assert response.status_code in (400, 413)


def test_afterwards_the_gateway_holds_nothing_and_serves(gateway, session):
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    assert session.post(gateway.url + "/v1/messages", json=body, timeout=30).status_code == 200
    status = session.get(gateway.url + "/status", headers={"x-api-key": ADMIN}, timeout=5).json()
    assert all(b["in_flight"] == 0 for b in status["backends"].values())
    lines = [e for e in gateway.access_lines() if e.get("status", 0) >= 500]
    assert lines == []
