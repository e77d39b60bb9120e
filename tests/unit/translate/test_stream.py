"""OpenAI chat-completion chunks -> Anthropic stream events (app/translate/stream.py).

Every stream is checked twice: against the Anthropic event grammar (what the SDK's accumulator
relies on), and by rebuilding the final message from the events the way the SDK does.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.translate.stream import StreamTranslator

Event = dict[str, Any]

DELTAS_FOR_BLOCK = {
    "text": {"text_delta", "citations_delta"},
    "thinking": {"thinking_delta", "signature_delta"},
    "tool_use": {"input_json_delta"},
}


# --- checking and accumulating Anthropic events ------------------------------------------


def check_grammar(events: list[Event]) -> None:
    """The Anthropic stream grammar; a stream may instead end with one ``error`` event."""
    assert events, "no events"
    assert events[0]["type"] == "message_start"
    started = events[0]["message"]
    assert started["content"] == [] and started["stop_reason"] is None
    assert isinstance(started["usage"]["input_tokens"], int)
    next_index = 0
    open_block: tuple[int, str] | None = None
    signed = False
    phase = "blocks"
    for position, event in enumerate(events[1:], start=1):
        kind = event["type"]
        assert phase != "done", f"event after the end: {event}"
        if kind == "ping":
            continue
        if kind == "error":
            assert position == len(events) - 1, "error must be the last event"
            assert set(event["error"]) == {"type", "message"}
            phase = "done"
            continue
        if kind == "content_block_start":
            assert phase == "blocks" and open_block is None, "two blocks open at once"
            assert event["index"] == next_index, "indexes must be 0, 1, 2… in start order"
            block = event["content_block"]
            open_block = (next_index, block["type"])
            signed = False
            next_index += 1
            if block["type"] == "tool_use":
                assert block["input"] == {} and block["id"] and isinstance(block["name"], str)
        elif kind == "content_block_delta":
            assert open_block is not None and event["index"] == open_block[0]
            delta_type = event["delta"]["type"]
            assert delta_type in DELTAS_FOR_BLOCK[open_block[1]], (delta_type, open_block)
            signed = signed or delta_type == "signature_delta"
        elif kind == "content_block_stop":
            assert open_block is not None and event["index"] == open_block[0]
            if open_block[1] == "thinking":
                assert signed, "thinking block stopped without a signature_delta"
            open_block = None
        elif kind == "message_delta":
            assert open_block is None, "message_delta while a block is open"
            assert set(event["delta"]) >= {"stop_reason", "stop_sequence"}
            assert type(event["usage"]["output_tokens"]) is int
            phase = "delta"
        elif kind == "message_stop":
            assert phase == "delta", "message_stop without message_delta"
            phase = "done"
        else:
            raise AssertionError(f"unknown event type {kind}")
    assert phase == "done", "stream neither stopped nor failed"


def accumulate(events: list[Event]) -> dict[str, Any]:
    """Rebuild the final message like the SDK's accumulator (tool input = joined partial_json)."""
    message: dict[str, Any] = {}
    partial: dict[int, str] = {}
    for event in events:
        kind = event["type"]
        if kind == "message_start":
            message = copy.deepcopy(event["message"])
        elif kind == "content_block_start":
            message["content"].append(copy.deepcopy(event["content_block"]))
        elif kind == "content_block_delta":
            block = message["content"][event["index"]]
            delta = event["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            elif delta["type"] == "input_json_delta":
                partial[event["index"]] = partial.get(event["index"], "") + delta["partial_json"]
        elif kind == "content_block_stop" and event["index"] in partial:
            message["content"][event["index"]]["input"] = json.loads(partial[event["index"]])
        elif kind == "message_delta":
            message["stop_reason"] = event["delta"]["stop_reason"]
            message["stop_sequence"] = event["delta"]["stop_sequence"]
            for key, value in event["usage"].items():
                if value is not None:
                    message["usage"][key] = value
    return message


# --- building OpenAI chunks --------------------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: Any = None, **extra: Any) -> dict[str, Any]:
    """One chat.completion.chunk; ``usage=`` goes top level, anything else on the choice."""
    usage = extra.pop("usage", None)
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1760000000,
        "model": "backend",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish, **extra}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def usage_chunk(usage: dict[str, Any]) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": usage}


def fragment(
    index: int | None = 0, call_id: str | None = None, name: str | None = None, args: Any = None
) -> dict[str, Any]:
    """A delta carrying one tool-call fragment."""
    entry: dict[str, Any] = {}
    if index is not None:
        entry["index"] = index
    if call_id is not None:
        entry["id"] = call_id
        entry["type"] = "function"
    function: dict[str, Any] = {}
    if name is not None:
        function["name"] = name
    if args is not None:
        function["arguments"] = args
    if function:
        entry["function"] = function
    return {"tool_calls": [entry]}


USAGE = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
ROLE = chunk({"role": "assistant", "content": ""})


def translator(
    stop_sequences: list[str] | None = None, input_tokens: int = 0, **options: Any
) -> StreamTranslator:
    return StreamTranslator(
        model="claude-sonnet-4-5",
        message_id="msg_stream1",
        stop_sequences=stop_sequences or [],
        input_tokens=input_tokens,
        **options,
    )


def run(
    chunks: list[Any],
    *,
    saw_done: bool = True,
    stop_sequences: list[str] | None = None,
    input_tokens: int = 0,
    **options: Any,
) -> list[Event]:
    """All events for a backend stream; bytes items go through feed_data, dicts through feed."""
    tr = translator(stop_sequences, input_tokens, **options)
    events = tr.start()
    for item in chunks:
        events += tr.feed_data(item) if isinstance(item, bytes) else tr.feed(item)
    events += tr.finish(saw_done=saw_done)
    check_grammar(events)
    return events


def final(chunks: list[Any], **kwargs: Any) -> dict[str, Any]:
    return accumulate(run(chunks, **kwargs))


def types(events: list[Event]) -> list[str]:
    return [e["type"] for e in events if e["type"] != "ping"]


def last_delta(events: list[Event]) -> Event:
    return next(e for e in reversed(events) if e["type"] == "message_delta")


# --- message_start and chunk layouts -----------------------------------------------------------


def test_message_start_is_a_complete_empty_message() -> None:
    assert translator(input_tokens=42).start() == [
        {
            "type": "message_start",
            "message": {
                "id": "msg_stream1",
                "type": "message",
                "role": "assistant",
                "model": "claude-sonnet-4-5",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": 42,
                    "output_tokens": 0,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                },
            },
        }
    ]


LAYOUTS = {
    "openai_separate_usage_chunk": [
        ROLE,
        chunk({"content": "Hello"}),
        chunk({"content": " world"}),
        chunk({}, "stop"),
        usage_chunk(USAGE),
    ],
    "vllm_content_and_finish_together": [
        ROLE,
        chunk({"content": "Hello"}),
        chunk({"content": " world"}, "stop"),
        usage_chunk(USAGE),
    ],
    "llamacpp_usage_on_finish_chunk": [
        chunk({"role": "assistant", "content": None}),
        chunk({"content": "Hello"}),
        chunk({"content": " world"}),
        chunk({}, "stop", usage=USAGE),
    ],
}


@pytest.mark.parametrize("chunks", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_chunk_layouts_give_the_same_message(chunks: list[dict]) -> None:
    events = run(chunks)
    assert types(events) == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    message = accumulate(events)
    assert message["content"] == [{"type": "text", "text": "Hello world"}]
    assert message["stop_reason"] == "end_turn"
    assert message["stop_sequence"] is None
    assert message["usage"] == {
        "input_tokens": 10,
        "output_tokens": 2,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def test_content_in_the_finish_chunk_is_applied_before_finishing() -> None:
    message = final([chunk({"role": "assistant", "content": "Whole answer."}, "stop")])
    assert message["content"] == [{"type": "text", "text": "Whole answer."}]
    assert message["stop_reason"] == "end_turn"


def test_ping_follows_the_first_content_block_start() -> None:
    events = run([chunk({"content": "a"}), chunk({"content": "b"}, "stop")])
    assert [e["type"] for e in events[:3]] == ["message_start", "content_block_start", "ping"]
    assert sum(e["type"] == "ping" for e in events) == 1


def test_without_usage_the_output_is_estimated_and_input_comes_from_the_estimate() -> None:
    events = run([chunk({"content": "x" * 40}), chunk({}, "stop")], input_tokens=57)
    usage = last_delta(events)["usage"]
    assert usage["input_tokens"] == 57
    assert usage["output_tokens"] == 10
    assert all(type(v) is int for v in usage.values())


def test_message_delta_usage_carries_input_and_cache_counts() -> None:
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 60},
    }
    events = run([chunk({"content": "hi"}, "stop"), usage_chunk(usage)], input_tokens=3)
    assert last_delta(events)["usage"] == {
        "input_tokens": 40,
        "output_tokens": 5,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 60,
    }


def test_last_usage_seen_wins() -> None:
    first = {"prompt_tokens": 10, "completion_tokens": 1}
    second = {"prompt_tokens": 10, "completion_tokens": 7}
    events = run([chunk({"content": "a"}, usage=first), chunk({}, "stop", usage=second)])
    assert last_delta(events)["usage"]["output_tokens"] == 7


def test_empty_stream_with_finish_has_no_blocks() -> None:
    events = run([ROLE, chunk({}, "stop")])
    assert types(events) == ["message_start", "message_delta", "message_stop"]


@pytest.mark.parametrize(
    ("finish", "choice_extra", "stops", "expected"),
    [
        ("stop", {}, [], ("end_turn", None)),
        ("length", {}, [], ("max_tokens", None)),
        ("content_filter", {}, [], ("refusal", None)),
        ("stop", {"stop_reason": "END"}, ["END"], ("stop_sequence", "END")),
        ("stop", {"stop_reason": "END"}, [], ("end_turn", None)),
        ("stop", {"stop_reason": 2}, ["END"], ("end_turn", None)),
    ],
    ids=[
        "stop",
        "length",
        "content_filter",
        "vllm_stop_string",
        "vllm_stop_string_not_requested",
        "vllm_stop_token",
    ],
)
def test_finish_reason_maps_to_message_delta_stop_reason(
    finish: str, choice_extra: dict, stops: list[str], expected: tuple
) -> None:
    events = run([chunk({"content": "x"}), chunk({}, finish, **choice_extra)], stop_sequences=stops)
    delta = last_delta(events)["delta"]
    assert (delta["stop_reason"], delta["stop_sequence"]) == expected


def test_streamed_refusal_sets_stop_reason_refusal() -> None:
    events = run([chunk({"refusal": "I can't help with that."}), chunk({}, "stop")])
    assert accumulate(events)["content"] == [{"type": "text", "text": "I can't help with that."}]
    assert last_delta(events)["delta"]["stop_reason"] == "refusal"


# --- thinking --------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_then_text_closes_the_signed_thinking_block_first(field: str) -> None:
    events = run(
        [
            chunk({field: "Let me "}),
            chunk({field: "think."}),
            chunk({"content": "Answer."}),
            chunk({}, "stop"),
        ]
    )
    blocks = [e for e in events if e["type"].startswith("content_block")]
    assert [(e["type"], e["index"]) for e in blocks] == [
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
    ]
    assert blocks[3]["delta"]["type"] == "signature_delta"
    message = accumulate(events)
    assert message["content"][0]["thinking"] == "Let me think."
    assert message["content"][0]["signature"].startswith("gw1.")
    assert message["content"][1] == {"type": "text", "text": "Answer."}


def test_thinking_only_stream_is_signed_before_the_end() -> None:
    message = final([chunk({"reasoning": "hmm"}), chunk({}, "length")])
    assert [b["type"] for b in message["content"]] == ["thinking"]
    assert message["content"][0]["signature"].startswith("gw1.")
    assert message["stop_reason"] == "max_tokens"


# --- tool calls ------------------------------------------------------------------------------


def test_tool_call_streamed_in_fragments_becomes_one_tool_use_block() -> None:
    events = run(
        [
            ROLE,
            chunk(fragment(0, "call_1", "get_weather", "")),
            chunk(fragment(0, args='{"ci')),
            chunk(fragment(0, args='ty": "Os')),
            chunk(fragment(0, args='lo"}')),
            chunk({}, "tool_calls"),
            usage_chunk(USAGE),
        ]
    )
    message = accumulate(events)
    assert message["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Oslo"}}
    ]
    assert message["stop_reason"] == "tool_use"


def test_interleaved_tool_calls_are_serialised_in_index_order() -> None:
    message = final(
        [
            chunk(fragment(0, "call_a", "get_weather", "")),
            chunk(fragment(1, "call_b", "get_time", "")),
            chunk(fragment(0, args='{"city":')),
            chunk(fragment(1, args='{"tz":')),
            chunk(fragment(1, args=' "UTC"}')),
            chunk(fragment(0, args=' "Oslo"}')),
            chunk({}, "tool_calls"),
        ]
    )
    assert message["content"] == [
        {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Oslo"}},
        {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {"tz": "UTC"}},
    ]


def test_several_calls_in_one_chunk_each_become_a_block() -> None:
    delta = {
        "tool_calls": [
            {"index": 0, "id": "call_a", "function": {"name": "f", "arguments": '{"x": 1}'}},
            {"index": 1, "id": "call_b", "function": {"name": "g", "arguments": '{"y": 2}'}},
        ]
    }
    message = final([chunk(delta, "tool_calls")])
    assert [(b["id"], b["name"], b["input"]) for b in message["content"]] == [
        ("call_a", "f", {"x": 1}),
        ("call_b", "g", {"y": 2}),
    ]


@pytest.mark.parametrize(
    ("entry", "expected_input"),
    [
        ({"index": 0, "function": {"name": "f", "arguments": '{"a": 1}'}}, {"a": 1}),
        ({"index": 0, "function": {"name": "f", "arguments": {"a": [1, 2]}}}, {"a": [1, 2]}),
        ({"index": 0, "function": {"name": "f", "arguments": ""}}, {}),
        ({"index": 0, "function": {"name": "f"}}, {}),
        ({"function": {"name": "f", "arguments": '{"a": 1}'}}, {"a": 1}),
    ],
    ids=["llamacpp_whole_no_id", "arguments_object", "empty_arguments", "no_arguments", "no_index"],
)
def test_whole_call_in_one_chunk_without_id_gets_a_toolu_id(
    entry: dict, expected_input: dict
) -> None:
    message = final([chunk({"tool_calls": [entry]}), chunk({}, "tool_calls")])
    [block] = message["content"]
    assert block["id"].startswith("toolu_")
    assert block["name"] == "f"
    assert block["input"] == expected_input


def test_ollama_whole_call_with_id_keeps_the_id() -> None:
    entry = {
        "id": "call_k3x",
        "index": 0,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
    }
    message = final([chunk({"role": "assistant", "tool_calls": [entry]}), chunk({}, "tool_calls")])
    assert message["content"][0]["id"] == "call_k3x"
    assert message["content"][0]["input"] == {"city": "Oslo"}


def test_fragments_without_index_continue_the_latest_call_or_follow_their_id() -> None:
    message = final(
        [
            chunk(fragment(None, "call_1", "f", "")),
            chunk(fragment(None, args='{"a"')),
            chunk(fragment(None, args=": 1}")),
            chunk(fragment(None, "call_2", "g", '{"b": 2}')),
            chunk(fragment(None, "call_1")),
            chunk({}, "tool_calls"),
        ]
    )
    assert [(b["id"], b["name"], b["input"]) for b in message["content"]] == [
        ("call_1", "f", {"a": 1}),
        ("call_2", "g", {"b": 2}),
    ]


def test_repeated_id_and_name_fragments_are_not_concatenated() -> None:
    message = final(
        [
            chunk(fragment(0, "call_1", "get_time", '{"tz"')),
            chunk(fragment(0, "call_1", "get_time", ': "UTC"}')),
            chunk({}, "tool_calls"),
        ]
    )
    assert message["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "get_time", "input": {"tz": "UTC"}}
    ]


def test_duplicate_upstream_ids_are_replaced() -> None:
    message = final(
        [
            chunk(fragment(0, "call_same", "f", "{}")),
            chunk(fragment(1, "call_same", "g", "{}")),
            chunk({}, "tool_calls"),
        ]
    )
    ids = [b["id"] for b in message["content"]]
    assert ids[0] == "call_same"
    assert ids[1].startswith("toolu_")


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('```json\n{"a": 1}\n```', {"a": 1}),
        ('{"a": 1,}', {"a": 1}),
        ("{'a': 1}", {"_raw_arguments": "{'a': 1}"}),
    ],
    ids=["code_fence", "trailing_comma", "python_dict"],
)
def test_invalid_streamed_arguments_are_repaired_or_wrapped(arguments: str, expected: dict) -> None:
    message = final([chunk(fragment(0, "c", "f", arguments)), chunk({}, "tool_calls")])
    assert message["content"][0]["input"] == expected


def test_text_then_tool_calls_closes_the_text_block_first() -> None:
    events = run(
        [
            chunk({"content": "Let me check."}),
            chunk(fragment(0, "call_1", "get_weather", "")),
            chunk(fragment(0, args='{"city": "Oslo"}')),
            chunk(fragment(1, "call_2", "get_time", "{}")),
            chunk({}, "tool_calls"),
        ]
    )
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [(e["index"], e["content_block"]["type"]) for e in starts] == [
        (0, "text"),
        (1, "tool_use"),
        (2, "tool_use"),
    ]
    message = accumulate(events)
    assert message["content"][0] == {"type": "text", "text": "Let me check."}
    assert [b["input"] for b in message["content"][1:]] == [{"city": "Oslo"}, {}]
    assert message["stop_reason"] == "tool_use"


def test_thinking_then_tool_call_uses_the_next_index() -> None:
    message = final(
        [
            chunk({"reasoning_content": "Need the weather."}),
            chunk(fragment(0, "call_1", "get_weather", '{"city":"Oslo"}')),
            chunk({}, "tool_calls"),
        ]
    )
    assert [b["type"] for b in message["content"]] == ["thinking", "tool_use"]


def test_text_after_tool_calls_flushes_the_calls_first() -> None:
    message = final(
        [
            chunk(fragment(0, "call_1", "f", "{}")),
            chunk({"content": "And some text."}),
            chunk({}, "stop"),
        ]
    )
    assert [b["type"] for b in message["content"]] == ["tool_use", "text"]
    assert message["stop_reason"] == "tool_use"


@pytest.mark.parametrize(
    ("finish", "expected"),
    [
        ("tool_calls", "tool_use"),
        ("stop", "tool_use"),
        (None, "tool_use"),
        ("length", "max_tokens"),
    ],
    ids=["tool_calls", "stop", "no_finish_but_done", "length"],
)
def test_streamed_tool_calls_set_stop_reason(finish: Any, expected: str) -> None:
    chunks = [chunk(fragment(0, "call_1", "f", "{}"))]
    if finish:
        chunks.append(chunk({}, finish))
    assert final(chunks)["stop_reason"] == expected


# --- errors and truncation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error_chunk", "error_type", "message"),
    [
        (
            {"error": {"message": "CUDA error", "type": "InternalServerError", "code": 500}},
            "api_error",
            "CUDA error",
        ),
        (
            {"object": "error", "message": "The server is overloaded", "code": 503},
            "overloaded_error",
            "The server is overloaded",
        ),
        (
            {
                "error": {"code": 429, "message": "Rate limit exceeded"},
                "choices": [{"index": 0, "delta": {}, "finish_reason": "error"}],
            },
            "rate_limit_error",
            "Rate limit exceeded",
        ),
        (
            chunk({}, "error"),
            "api_error",
            "backend reported an error",
        ),
    ],
    ids=["error_object", "flat_vllm_error", "openrouter_error_chunk", "finish_reason_error"],
)
def test_in_stream_error_ends_with_an_error_event_and_no_message_stop(
    error_chunk: dict, error_type: str, message: str
) -> None:
    tr = translator()
    events = tr.start() + tr.feed(chunk({"content": "partial"})) + tr.feed(error_chunk)
    events += tr.finish(saw_done=True)
    check_grammar(events)
    assert events[-1] == {"type": "error", "error": {"type": error_type, "message": message}}
    assert "message_stop" not in types(events)
    assert tr.error_type == error_type


@pytest.mark.parametrize(
    "data",
    [b"{not json", b'{"choices": [', b"[1, 2]", b'"text"', b"null"],
    ids=["garbage", "truncated", "array", "string", "null"],
)
def test_malformed_stream_data_ends_with_an_error_event(data: bytes) -> None:
    tr = translator()
    events = tr.start() + tr.feed_data(data)
    check_grammar(events)
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["type"] == "api_error"


def test_feed_data_parses_json_bytes() -> None:
    tr = translator()
    events = tr.start() + tr.feed_data(json.dumps(chunk({"content": "hé"})).encode())
    events += tr.finish(saw_done=True)
    assert accumulate(events)["content"] == [{"type": "text", "text": "hé"}]


def test_stream_cut_before_any_finish_reason_is_an_error_not_end_turn() -> None:
    events = run([chunk({"content": "Half an ans"})], saw_done=False)
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["type"] == "api_error"
    assert "message_delta" not in types(events)


def test_stream_cut_inside_a_tool_call_is_an_error_after_what_was_streamed() -> None:
    events = run([chunk(fragment(0, "call_1", "f", '{"a":'))], saw_done=False)
    assert types(events) == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "error",
    ]
    assert "message_delta" not in types(events)


def test_eof_after_a_finish_reason_ends_normally_without_done() -> None:
    events = run([chunk({"content": "Done."}, "stop")], saw_done=False)
    assert types(events)[-2:] == ["message_delta", "message_stop"]
    assert last_delta(events)["delta"]["stop_reason"] == "end_turn"


def test_done_without_finish_reason_ends_with_end_turn() -> None:
    events = run([chunk({"content": "Hi"})], saw_done=True)
    assert last_delta(events)["delta"]["stop_reason"] == "end_turn"


def test_nothing_is_emitted_after_the_end() -> None:
    tr = translator()
    tr.start()
    tr.feed(chunk({"content": "x"}, "stop"))
    assert tr.finish(saw_done=True)[-1]["type"] == "message_stop"
    assert tr.feed(chunk({"content": "late"})) == []
    assert tr.feed_data(b'{"choices": []}') == []
    assert tr.finish(saw_done=True) == []


@pytest.mark.parametrize("end", ["message_stop", "error"])
def test_malformed_data_after_the_end_emits_nothing(end: str) -> None:
    tr = translator()
    events = tr.start()
    if end == "error":
        events += tr.feed({"error": {"message": "boom"}})
    else:
        events += tr.feed(chunk({"content": "x"}, "stop")) + tr.finish(saw_done=True)
    assert events[-1]["type"] == end
    assert tr.feed_data(b"{oops") == []


def test_nothing_is_emitted_after_an_error() -> None:
    tr = translator()
    tr.start()
    assert tr.feed({"error": {"message": "boom"}})[-1]["type"] == "error"
    assert tr.feed(chunk({"content": "late"})) == []
    assert tr.finish(saw_done=False) == []


def test_stop_reason_and_final_usage_are_exposed_after_finish() -> None:
    tr = translator()
    tr.start()
    tr.feed(chunk({"content": "hi"}, "length", usage=USAGE))
    tr.finish(saw_done=True)
    assert tr.stop_reason == "max_tokens"
    assert tr.final_usage["output_tokens"] == 2


# --- properties ------------------------------------------------------------------------------


def split_at(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    pieces=st.lists(st.text(min_size=0, max_size=12), min_size=1, max_size=12),
    reasoning=st.lists(st.text(min_size=1, max_size=8), max_size=4),
)
def test_any_split_of_text_accumulates_to_the_same_text(
    pieces: list[str], reasoning: list[str]
) -> None:
    chunks = [chunk({"reasoning_content": r}) for r in reasoning]
    chunks += [chunk({"content": p}) for p in pieces]
    message = final([*chunks, chunk({}, "stop")])
    expected: list[dict[str, Any]] = []
    if "".join(reasoning):
        expected.append({"type": "thinking", "thinking": "".join(reasoning)})
    if "".join(pieces):
        expected.append({"type": "text", "text": "".join(pieces)})
    for block in message["content"]:
        block.pop("signature", None)
    assert message["content"] == expected


@settings(max_examples=150, deadline=None)
@given(
    tool_input=st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=15),
    ensure_ascii=st.booleans(),
    lead_text=st.text(max_size=10),
)
def test_any_split_of_tool_arguments_accumulates_to_the_parsed_input(
    tool_input: dict, cuts: list[int], ensure_ascii: bool, lead_text: str
) -> None:
    arguments = json.dumps(tool_input, ensure_ascii=ensure_ascii)
    chunks = [chunk({"content": lead_text})] if lead_text else []
    chunks.append(chunk(fragment(0, "call_p", "probe", "")))
    chunks += [chunk(fragment(0, args=piece)) for piece in split_at(arguments, cuts)]
    message = final([*chunks, chunk({}, "tool_calls")])
    tool_block = message["content"][-1]
    assert tool_block == {"type": "tool_use", "id": "call_p", "name": "probe", "input": tool_input}
    assert message["stop_reason"] == "tool_use"


def test_a_whole_message_replays_as_a_well_formed_stream() -> None:
    from app.translate.stream import message_events

    message = {
        "id": "msg_x",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [
            {"type": "thinking", "thinking": "plan", "signature": "gw1.s"},
            {"type": "text", "text": "Hi."},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": [1, 2]}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 9},
    }
    events = message_events(message)
    check_grammar(events)
    rebuilt = accumulate(events)
    assert rebuilt["content"] == message["content"]
    assert rebuilt["stop_reason"] == "tool_use"
    assert events[0]["message"]["usage"]["output_tokens"] == 0
    assert events[-2]["usage"] == {"input_tokens": 3, "output_tokens": 9}


# --- stop sequences, prefill, one tool call, streamed arguments ---------------------------------


def texts(events: list[Event]) -> list[str]:
    return [
        e["delta"]["text"]
        for e in events
        if e["type"] == "content_block_delta" and e["delta"]["type"] == "text_delta"
    ]


def test_stop_sequence_split_across_chunks_ends_the_answer_before_it() -> None:
    tr = translator(["\n\nHuman:"])
    events = tr.start()
    for piece in ["Hello there.", "\n", "\nHum", "an: more", " and more"]:
        events += tr.feed(chunk({"content": piece}))
    events += tr.finish(saw_done=True)
    check_grammar(events)
    assert "".join(texts(events)) == "Hello there."
    delta = last_delta(events)["delta"]
    assert delta == {"stop_reason": "stop_sequence", "stop_sequence": "\n\nHuman:"}
    assert tr.cut and tr.ended


def test_text_is_held_back_only_while_it_could_begin_a_stop_sequence() -> None:
    tr = translator(["STOP"])
    tr.start()
    assert texts(tr.feed(chunk({"content": "abcST"}))) == ["abc"]
    assert texts(tr.feed(chunk({"content": "ill going"}))) == ["STill going"]
    events = tr.finish(saw_done=True)
    assert last_delta(events)["delta"]["stop_reason"] == "end_turn"
    assert not tr.cut


def test_a_held_tail_that_never_becomes_a_stop_sequence_is_sent_at_the_end() -> None:
    message = final(
        [chunk({"content": "the end is ST"}), chunk({}, "stop")], stop_sequences=["STOP"]
    )
    assert message["content"] == [{"type": "text", "text": "the end is ST"}]
    assert message["stop_reason"] == "end_turn"


def test_more_than_four_stop_sequences_all_match_and_the_earliest_wins() -> None:
    stops = ["one", "two", "three", "four", "five", "six"]
    message = final(
        [chunk({"content": "count: six, five"}), chunk({}, "length")], stop_sequences=stops
    )
    assert message["content"] == [{"type": "text", "text": "count: "}]
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "six")


def test_stop_sequence_at_the_very_start_gives_no_text_block() -> None:
    message = final([chunk({"content": "END of it"})], stop_sequences=["END"], saw_done=False)
    assert message["content"] == []
    assert message["stop_sequence"] == "END"


def test_a_repeated_prefill_is_removed_from_the_stream() -> None:
    pieces = ["1.", " Red\n", "2", ". Blue\n3. Green"]
    message = final(
        [chunk({"content": p}) for p in pieces] + [chunk({}, "stop")], prefill="1. Red\n2."
    )
    assert message["content"] == [{"type": "text", "text": " Blue\n3. Green"}]


def test_an_answer_that_does_not_repeat_the_prefill_is_kept_whole() -> None:
    tr = translator(prefill="1. Red\n2.")
    tr.start()
    assert texts(tr.feed(chunk({"content": "1. "}))) == []  # could still be the echo
    assert texts(tr.feed(chunk({"content": "Blue"}))) == ["1. Blue"]


def test_prefill_echo_and_stop_sequence_together() -> None:
    message = final(
        [chunk({"content": "Answer: 42. Done"}), chunk({}, "stop")],
        prefill="Answer:",
        stop_sequences=["."],
    )
    assert message["content"] == [{"type": "text", "text": " 42"}]
    assert message["stop_sequence"] == "."


def test_single_tool_keeps_only_the_first_call_of_parallel_ones() -> None:
    message = final(
        [
            chunk(fragment(0, "call_a", "get_weather", '{"city": "Oslo"}')),
            chunk(fragment(1, "call_b", "get_weather", '{"city": "Rome"}')),
            chunk({}, "tool_calls"),
        ],
        single_tool=True,
    )
    assert [b["id"] for b in message["content"]] == ["call_a"]
    assert message["stop_reason"] == "tool_use"


def test_tool_arguments_are_relayed_as_the_fragments_arrive() -> None:
    tr = translator()
    tr.start()
    opened = tr.feed(chunk(fragment(0, "call_1", "write_file", "")))
    assert types(opened) == ["content_block_start"]
    first = tr.feed(chunk(fragment(0, args='{"path": "a.txt", ')))
    second = tr.feed(chunk(fragment(0, args='"text": "hi"}')))
    # A comma at the end of a fragment waits for the next one (it might be a trailing one).
    assert [e["delta"]["partial_json"] for e in first + second] == [
        '{"path": "a.txt"',
        ', "text": "hi"}',
    ]
    end = tr.finish(saw_done=True)
    assert types(end)[:1] == ["content_block_stop"]


def test_a_second_call_waits_until_the_first_one_is_complete() -> None:
    tr = translator()
    events = tr.start()
    events += tr.feed(chunk(fragment(0, "call_a", "f", '{"x": ')))
    held = tr.feed(chunk(fragment(1, "call_b", "g", '{"y": 2}')))
    assert held == []  # the first call is still open: nothing of the second yet
    events += held + tr.feed(chunk(fragment(0, args="1}")))
    events += tr.feed(chunk(fragment(1, args="")))  # the next fragment moves on to call_b
    events += tr.finish(saw_done=True)
    check_grammar(events)
    message = accumulate(events)
    assert [b["input"] for b in message["content"]] == [{"x": 1}, {"y": 2}]


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        (['{"a": 1,', " }"], {"a": 1}),
        (['{"a": [1, 2,]', ",}"], {"a": [1, 2]}),
        (['{"a": "keep, } this",}'], {"a": "keep, } this"}),
    ],
    ids=["comma_then_brace", "in_array_and_object", "comma_inside_a_string"],
)
def test_trailing_commas_are_dropped_from_streamed_arguments(
    pieces: list[str], expected: dict
) -> None:
    chunks = [chunk(fragment(0, "c", "f", pieces[0]))]
    chunks += [chunk(fragment(0, args=p)) for p in pieces[1:]]
    message = final(chunks + [chunk({}, "tool_calls")])
    assert message["content"][0]["input"] == expected


def test_message_start_takes_the_prompt_count_when_the_stream_starts() -> None:
    counted = []
    tr = StreamTranslator(
        model="m",
        message_id="msg_1",
        stop_sequences=[],
        input_tokens=lambda: counted.append(1) or 57,
    )
    assert counted == []  # nothing asked before the stream starts
    assert tr.start()[0]["message"]["usage"]["input_tokens"] == 57


def test_text_held_for_a_possible_stop_sequence_goes_out_before_a_tool_call() -> None:
    message = final(
        [
            chunk({"content": "Let me check.\n\n"}),
            chunk(fragment(0, "call_1", "get_weather", '{"city": "Oslo"}')),
            chunk({}, "tool_calls"),
        ],
        stop_sequences=["\n\nHuman:"],
    )
    assert [b["type"] for b in message["content"]] == ["text", "tool_use"]
    assert message["content"][0]["text"] == "Let me check.\n\n"


def test_held_tool_arguments_are_repaired_when_not_relayed() -> None:
    """An answer added up into JSON (stream_tools=False) repairs arguments as JSON answers do."""
    pieces = ['{"flag": ', "True}"]
    chunks = [chunk(fragment(0, "c", "f", pieces[0])), chunk(fragment(0, args=pieces[1]))]
    message = final(chunks + [chunk({}, "tool_calls")], stream_tools=False)
    assert message["content"][0]["input"] == {"_raw_arguments": '{"flag": True}'}


def test_a_nested_object_completes_the_open_call_only_when_its_outer_brace_closes() -> None:
    tr = translator()
    events = tr.start()
    events += tr.feed(chunk(fragment(0, "call_a", "f", '{"x": {"y": 1}')))
    events += tr.feed(chunk(fragment(1, "call_b", "g", '{"z": 2}')))  # call_a not yet complete
    assert [e["type"] for e in events if e.get("index") == 1] == []
    events += tr.feed(chunk(fragment(0, args="}")))
    events += tr.feed(chunk(fragment(1, args="")))
    events += tr.finish(saw_done=True)
    check_grammar(events)
    assert [b["input"] for b in accumulate(events)["content"]] == [{"x": {"y": 1}}, {"z": 2}]


# --- chunks that are not of the OpenAI shape ---------------------------------------------------


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (fragment(0, "call_1", args="{}") | {"tool_calls": [{"index": 0, "function": "f"}]},
         "function is not an object"),
        (fragment(0, "call_1", "f", 42), "neither JSON text nor an object"),
        (fragment(0, "call_1", "f", [1, 2]), "neither JSON text nor an object"),
        (fragment(0, "call_1", 7, "{}"), "name is not a string"),
        ({"tool_calls": ["call"]}, "tool call that is not an object"),
        ({"tool_calls": 5}, "tool_calls that are not an array"),
    ],
    ids=["function_string", "arguments_number", "arguments_array", "name_number",
         "call_string", "tool_calls_number"],
)  # fmt: skip
def test_a_malformed_tool_call_ends_the_stream_with_a_backend_error_naming_it(
    data: dict, named: str
) -> None:
    tr = translator(backend="vllm-a")
    events = tr.start() + tr.feed(chunk({"content": "Let me check."})) + tr.feed(chunk(data))
    check_grammar(events)
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["type"] == "api_error"
    assert events[-1]["error"]["message"].startswith("backend vllm-a sent")
    assert named in events[-1]["error"]["message"]
    assert tr.error is not None and tr.error.backend_fault
    assert tr.feed(chunk({"content": "more"})) == []


@pytest.mark.parametrize(
    "raw",
    [
        {"choices": "abc"},
        {"choices": 5},
        {"choices": {"0": {"delta": {"content": "x"}}}},
        {"choices": ["not a choice"]},
        {"choices": [{"delta": "text"}]},
        {"choices": [{"delta": 5}]},
    ],
    ids=["choices_string", "choices_number", "choices_object", "choice_string", "delta_string",
         "delta_number"],
)  # fmt: skip
def test_a_chunk_whose_choices_or_delta_is_not_of_the_shape_is_a_backend_error(raw: dict) -> None:
    tr = translator()
    events = tr.start() + tr.feed(raw)
    check_grammar(events)
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["message"].startswith("backend sent")
    assert tr.error is not None and tr.error.backend_fault


@pytest.mark.parametrize("usage", [5, "many", [1, 2]], ids=["number", "string", "array"])
def test_usage_that_is_not_an_object_is_ignored_and_an_earlier_one_kept(usage: Any) -> None:
    events = run(
        [
            chunk({"content": "Hi"}, "stop"),
            usage_chunk(USAGE),
            {"choices": [], "usage": usage},
        ]
    )
    assert last_delta(events)["usage"]["output_tokens"] == 2


def test_content_or_a_finish_reason_that_is_not_a_string_is_ignored() -> None:
    events = run([chunk({"content": 5}), chunk({"content": "Hi"}, {"odd": 1}), chunk({}, "stop")])
    assert accumulate(events)["content"] == [{"type": "text", "text": "Hi"}]
    assert last_delta(events)["delta"]["stop_reason"] == "end_turn"


@pytest.mark.parametrize(
    "extra",
    [
        {"timings": -1},
        {"timings": {"predicted_n": 3}},
        {"__verbose": {"truncated": True, "stop_type": "limit"}},
    ],
    ids=["timings_number", "timings", "verbose"],
)
@pytest.mark.parametrize(
    "choices",
    [1, "abc", {"a": 1}, {"0": {"delta": {}}}, ["not a choice"]],
    ids=["number", "string", "object", "object_of_choices", "choice_string"],
)
def test_choices_not_of_the_shape_are_a_backend_error_beside_llama_cpp_timings(
    choices: Any, extra: dict
) -> None:
    """llama.cpp sends timings; a chunk carrying them was read for a full context before its
    choices were checked, and a TypeError or KeyError escaped instead of the named error."""
    tr = translator(backend="llama", max_tokens=100)
    events = tr.start() + tr.feed({"choices": choices, **extra})
    check_grammar(events)
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["message"].startswith("backend llama sent")
    assert tr.error is not None and tr.error.backend_fault


# --- any field of a valid stream replaced by a value of another type ---------------------------

VALID_STREAM: list[dict[str, Any]] = [
    ROLE,
    chunk({"reasoning_content": "Let me think."}),
    chunk({"content": "Hi "}),
    chunk(fragment(0, "call_1", "get_weather", '{"city"')),
    chunk(fragment(0, args=': "Paris"}')),
    chunk({}, "tool_calls", stop_reason=None),
    usage_chunk(USAGE) | {"timings": {"predicted_n": 5}},
]

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=5,
)


def json_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value where another value could stand."""
    found = [path] if path else []
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else []
    )
    for key, inner in items:
        found += json_paths(inner, (*path, key))
    return found


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    copied = copy.deepcopy(value)
    holder = copied
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = new
    return copied


@settings(max_examples=300)
@given(data=st.data())
def test_any_field_of_a_stream_of_another_type_ends_it_cleanly(data: st.DataObject) -> None:
    """Whatever a backend puts anywhere in its chunks, the stream ends in its grammar (with an
    error event at worst): no exception reaches the relay."""
    path = data.draw(st.sampled_from(json_paths(VALID_STREAM)))
    chunks = replaced(VALID_STREAM, path, data.draw(JSON_VALUES))
    tr = translator(backend="b", max_tokens=100)
    events = tr.start()
    for item in chunks:
        events += tr.feed_data(json.dumps(item).encode())
    events += tr.finish(saw_done=True)
    check_grammar(events)
