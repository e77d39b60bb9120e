"""What the real-backend tiers (tests/system/test_llama_cpp.py, tests/system/test_vllm.py)
share: a gateway in front of one real backend, configured by a file alone, the official SDK on
it, and how a message and its stream are asked for and checked against Anthropic's grammar."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import anthropic
from servers import Gunicorn
from waiting import eventually

from app.config import API_KEYS_ENV, ENV_OVERRIDES

MODEL = "claude-sonnet-4-6"  # what the client asks for; the backend serves its one model
T0 = {"temperature": 0}
RAW_EVENTS = {
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
}
DELTAS = {
    "text": {"text_delta"},
    "tool_use": {"input_json_delta"},
    "thinking": {"thinking_delta", "signature_delta"},
}

# --- the gateway -----------------------------------------------------------------------------

Value = str | int | bool


def gateway_config(
    path: Path,
    upstream: Mapping[str, Value],
    admin_token: str,
    *,
    quirks: Mapping[str, Value] | None = None,
    translate: Mapping[str, Value] | None = None,
) -> Path:
    """A gateway config for one backend (``upstream``: its url, dialect, protocol…), with the
    dialect's ``quirks`` and ``[translate]`` settings when given: no retries (the backend's
    answer surfaces as is), /status behind ``admin_token``."""
    lines = ["[upstream]", *_pairs(upstream)]
    lines += ["", "[routing]", "retries = 0", "", "[admin]", f"token = {json.dumps(admin_token)}"]
    if quirks:
        lines += ["", "[upstream.quirks]", *_pairs(quirks)]
    if translate:
        lines += ["", "[translate]", *_pairs(translate)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _pairs(values: Mapping[str, Value]) -> list[str]:
    return [f"{key} = {json.dumps(value)}" for key, value in values.items()]  # JSON's are TOML's


def start_configured(config: Path, log_path: Path) -> Gunicorn:
    """Real gunicorn (gevent worker) configured by ``config`` alone: a GATEWAY_* variable from
    the shell would override the file (empty ones are ignored); Gunicorn gives each gateway a
    state directory of its own."""
    blank = {var: "" for var in (*ENV_OVERRIDES, API_KEYS_ENV) if var != "GATEWAY_STATE_DIR"}
    return Gunicorn({**blank, "GATEWAY_CONFIG": str(config)}, log_path)


def sdk(server: Gunicorn) -> Iterator[anthropic.Anthropic]:
    """The official client on ``server``, no retries (for a module-scoped fixture)."""
    with anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0) as client:
        yield client


# --- asking and checking ---------------------------------------------------------------------


def ask(client: anthropic.Anthropic, stream: bool, **request: Any) -> Any:
    """One message, as JSON or rebuilt by the SDK from the stream (temperature 0)."""
    request = {"model": MODEL, "extra_body": T0, **request}
    if not stream:
        return client.messages.create(**request)
    with client.messages.stream(**request) as events:
        return events.get_final_message()


def stream_events(client: anthropic.Anthropic, **request: Any) -> tuple[list[Any], Any]:
    """The raw stream events (the SDK's own text/input_json helpers left out), and the message
    the SDK rebuilt from them."""
    request = {"model": MODEL, "extra_body": T0, **request}
    with client.messages.stream(**request) as stream:
        events = [event for event in stream if event.type in RAW_EVENTS]
        return events, stream.get_final_message()


def check_grammar(events: list[Any]) -> None:
    """message_start (content_block_start delta* content_block_stop)* message_delta
    message_stop, blocks numbered 0, 1, 2… in start order, each delta of its block's kind."""
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start", kinds
    assert kinds[-2:] == ["message_delta", "message_stop"], kinds
    start = events[0].message
    assert start.id.startswith("msg_") and start.model == MODEL and start.role == "assistant"
    assert start.content == [] and start.stop_reason is None and start.stop_sequence is None
    open_block: tuple[int, str] | None = None
    count = 0
    for event in events[1:-2]:
        if event.type == "content_block_start":
            assert open_block is None and event.index == count, kinds
            open_block = (event.index, event.content_block.type)
            count += 1
        elif event.type == "content_block_delta":
            assert open_block is not None and event.index == open_block[0], kinds
            assert event.delta.type in DELTAS[open_block[1]], (open_block, event.delta.type)
        elif event.type == "content_block_stop":
            assert open_block is not None and event.index == open_block[0], kinds
            open_block = None
        else:
            raise AssertionError(f"{event.type} between the blocks: {kinds}")
    assert open_block is None


def shape(message: Any) -> dict[str, Any]:
    """A message as Anthropic defines it, minus what differs by nature between two answers
    (the ids)."""
    content = []
    for block in message.content:
        if block.type == "text":
            content.append(("text", block.text))
        elif block.type == "tool_use":
            assert block.id
            content.append(("tool_use", block.name, block.input))
        else:
            content.append((block.type,))
    assert message.id.startswith("msg_")
    usage = message.usage
    return {
        "type": message.type,
        "role": message.role,
        "model": message.model,
        "content": content,
        "stop_reason": message.stop_reason,
        "stop_sequence": message.stop_sequence,
        "output_tokens": usage.output_tokens,
        "prompt_tokens": usage.input_tokens + (usage.cache_read_input_tokens or 0),
    }


def text_of(message: Any) -> str:
    assert [b.type for b in message.content] == ["text"], message.content
    return message.content[0].text


def batch_beside_direct(server: Gunicorn, body: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``body`` asked directly (temperature 0), then as one item of a batch beside an item
    with no ``max_tokens``: the direct message, and the batch's results by custom_id (``ask``
    for the first item, ``bad`` for the second), once the batch has ended."""
    with anthropic.Anthropic(base_url=server.url, api_key="-", max_retries=0) as llm:
        direct = llm.messages.create(**body, extra_body=T0)
        bad = {key: value for key, value in body.items() if key != "max_tokens"}
        batch = llm.messages.batches.create(
            requests=[
                {"custom_id": "ask", "params": {**body, **T0}},
                {"custom_id": "bad", "params": bad},
            ]
        )
        eventually(
            lambda: llm.messages.batches.retrieve(batch.id).processing_status == "ended",
            what="the batch ended",
            timeout=300,
        )
        decoder = llm.messages.batches.results(batch.id)
        try:
            return direct, {line.custom_id: line.result for line in decoder}
        finally:
            decoder.close()


def assert_same_answer_but_for_id_and_cache(message: Any, direct: Any) -> None:
    """The batch's message is the direct one but for its id and for how much of the prompt
    the backend found in its cache (the second asking finds it)."""
    assert message.id != direct.id
    assert message.model_dump(exclude={"id", "usage"}) == direct.model_dump(exclude={"id", "usage"})
    used, asked = message.usage, direct.usage
    assert used.input_tokens + (used.cache_read_input_tokens or 0) == (
        asked.input_tokens + (asked.cache_read_input_tokens or 0)
    )
    assert used.output_tokens == asked.output_tokens


def own_answer(server: Any, messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """The backend's own chat completions answer to the prompt (llama.cpp's or vLLM's, straight,
    not through the gateway): its choice, with the usage."""
    response = server.chat({"messages": messages, "max_tokens": max_tokens})
    assert response.status_code == 200, response.text
    body = response.json()
    return {**body["choices"][0], "usage": body["usage"]}
