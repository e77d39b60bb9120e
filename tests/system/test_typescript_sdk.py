"""The official TypeScript SDK (@anthropic-ai/sdk, set up by scripts/test) against the gateway."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from fakebackend import (
    FakeBackend,
    JSONReply,
    StreamReply,
    chunk,
    chunks,
    completion,
    error_body,
)
from servers import Gunicorn

TS_DIR = Path(__file__).resolve().parent / "ts"


def run_scenario(gateway, scenario: str) -> dict:
    node = shutil.which("node")
    if node is None or not (TS_DIR / "node_modules" / "@anthropic-ai" / "sdk").is_dir():
        if os.environ.get("CI"):
            pytest.fail(
                "node and tests/system/ts/node_modules are required in CI"
                " (scripts/test installs them)"
            )
        pytest.skip("node or the TypeScript SDK is not installed; run ./scripts/test")
    result = subprocess.run(
        [node, str(TS_DIR / "scenarios.mjs"), gateway.url, scenario],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_typescript_create(gateway, backend):
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    backend.reply(JSONReply(completion("Hi from TS", usage=usage)))
    message = run_scenario(gateway, "create")
    assert message["content"] == [{"type": "text", "text": "Hi from TS"}]
    assert message["model"] == "claude-haiku-4-5" and message["stop_reason"] == "end_turn"
    assert message["usage"]["input_tokens"] == 3 and message["usage"]["output_tokens"] == 4


def test_typescript_stream_final_message(gateway, backend):
    backend.reply(StreamReply(chunks(["Hello", " from", " TS"], dialect="vllm")))
    result = run_scenario(gateway, "stream")
    assert result["message"]["content"][0]["text"] == "Hello from TS"
    assert result["events"][0] == "message_start" and result["events"][-1] == "message_stop"


def test_typescript_tool_loop_streamed(gateway, backend):
    call = {
        "index": 0,
        "id": "call_9",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    backend.reply(
        StreamReply(
            [
                chunk({"role": "assistant", "content": ""}),
                chunk({"tool_calls": [call]}),
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}),
                chunk({}, "tool_calls"),
            ]
        ),
        StreamReply(chunks(["It is 3°C."])),
    )
    result = run_scenario(gateway, "tool_loop")
    tool_use = result["first"]["content"][0]
    assert tool_use == {
        "type": "tool_use",
        "id": "call_9",
        "name": "get_weather",
        "input": {"city": "Oslo"},
    }
    assert result["first"]["stop_reason"] == "tool_use"
    assert result["second"]["content"][0]["text"] == "It is 3°C."
    sent = backend.requests[-1].json["messages"]
    assert sent[-1] == {"role": "tool", "tool_call_id": "call_9", "content": "3°C in Oslo"}


@pytest.mark.parametrize(
    ("status", "error_class", "error_type"),
    [
        (429, "RateLimitError", "rate_limit_error"),
        (500, "InternalServerError", "api_error"),
        (400, "BadRequestError", "invalid_request_error"),
    ],
)
def test_typescript_error_classes(gateway, backend, status, error_class, error_type):
    backend.reply(JSONReply(error_body("no"), status=status))
    result = run_scenario(gateway, "error")
    assert result == {"error": error_class, "status": status, "type": error_type}


def test_typescript_parallel_tool_calls_with_thinking_streamed(gateway, backend):
    calls = [
        {
            "index": 0,
            "id": "call_w",
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        },
        {
            "index": 1,
            "id": "call_t",
            "type": "function",
            "function": {"name": "get_time", "arguments": ""},
        },
    ]
    backend.reply(
        StreamReply(
            [
                chunk({"role": "assistant", "reasoning_content": "Two lookups."}),
                chunk({"tool_calls": [calls[0]]}),
                chunk({"tool_calls": [calls[1]]}),
                chunk(
                    {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Oslo"}'}}]}
                ),
                chunk(
                    {
                        "tool_calls": [
                            {"index": 1, "function": {"arguments": '{"tz": "Europe/Oslo"}'}}
                        ]
                    }
                ),
                chunk({}, "tool_calls"),
            ]
        )
    )
    result = run_scenario(gateway, "parallel_thinking")
    content = result["message"]["content"]
    assert [b["type"] for b in content] == ["thinking", "tool_use", "tool_use"]
    assert content[0]["thinking"] == "Two lookups." and content[0]["signature"].startswith("gw1.")
    assert content[1]["input"] == {"city": "Oslo"} and content[2]["input"] == {"tz": "Europe/Oslo"}
    assert result["message"]["stop_reason"] == "tool_use"
    assert result["deltas"].count("signature_delta") == 1
    sent = backend.requests[-1].json  # the generic dialect has no thinking switch to send
    assert "chat_template_kwargs" not in sent and "reasoning_effort" not in sent


def test_typescript_image_message(gateway, backend):
    result = run_scenario(gateway, "image")
    assert result["content"][0]["text"] == "Hello"
    part = backend.requests[-1].json["messages"][0]["content"][0]
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith(
        "data:image/png;base64,"
    )


def test_typescript_message_batches(tmp_path):
    """The TypeScript SDK's batch calls, on real gunicorn (whose workers run the batches)."""
    with FakeBackend() as backend:
        backend.default = JSONReply(completion("batched"))
        server = Gunicorn({"GATEWAY_UPSTREAM_URL": backend.url}, tmp_path / "gunicorn.log")
        try:
            result = run_scenario(server, "batch")
        finally:
            server.stop()
    assert result["created"]["processing_status"] == "in_progress"
    assert result["batch"]["processing_status"] == "ended"
    assert result["batch"]["request_counts"]["succeeded"] == 2
    assert result["batch"]["request_counts"]["errored"] == 1
    found = {line["custom_id"]: line["result"] for line in result["results"]}
    assert found["first"]["message"]["content"] == [{"type": "text", "text": "batched"}]
    assert found["broken"]["error"]["error"]["type"] == "invalid_request_error"
    assert result["listed"] == [result["created"]["id"]]
    assert result["deleted"] == {"id": result["created"]["id"], "type": "message_batch_deleted"}
