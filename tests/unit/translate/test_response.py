"""OpenAI Chat Completion -> Anthropic message (app/translate/response.py)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import GatewayError, Overloaded, RateLimited, UpstreamError
from app.translate.response import (
    context_window_exceeded,
    map_stop_reason,
    map_usage,
    parse_arguments,
    translate_response,
)

USAGE = {"prompt_tokens": 380, "completion_tokens": 22, "total_tokens": 402}


def completion(
    message: dict[str, Any] | None = None,
    *,
    finish_reason: Any = "stop",
    usage: Any = USAGE,
    **choice_extra: Any,
) -> dict[str, Any]:
    """A Chat Completion with one choice; ``message`` defaults to a plain text answer."""
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "Hello!"} if message is None else message,
        "finish_reason": finish_reason,
        **choice_extra,
    }
    body: dict[str, Any] = {
        "id": "chatcmpl-9a1",
        "object": "chat.completion",
        "created": 1760000000,
        "model": "qwen3-32b",
        "choices": [choice],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def translate(raw: Any, stop_sequences: list[str] | None = None) -> dict[str, Any]:
    return translate_response(
        raw,
        model="claude-sonnet-4-5",
        message_id="msg_test123",
        stop_sequences=stop_sequences or [],
    )


def call(call_id: Any, name: str, arguments: Any) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_message(*calls: dict[str, Any], content: Any = None) -> dict[str, Any]:
    return {"role": "assistant", "content": content, "tool_calls": list(calls)}


# --- envelope --------------------------------------------------------------------------------


def test_message_envelope_echoes_requested_model_and_given_id() -> None:
    message = translate(completion())
    assert message == {
        "id": "msg_test123",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "Hello!"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 380,
            "output_tokens": 22,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


# --- stop_reason -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("finish_reason", "has_tools", "matched", "stops", "expected"),
    [
        ("stop", False, None, [], ("end_turn", None)),
        ("length", False, None, [], ("max_tokens", None)),
        ("length", True, None, [], ("max_tokens", None)),
        ("tool_calls", True, None, [], ("tool_use", None)),
        ("tool_calls", False, None, [], ("tool_use", None)),
        ("function_call", False, None, [], ("tool_use", None)),
        ("stop", True, None, [], ("tool_use", None)),
        ("content_filter", False, None, [], ("refusal", None)),
        (None, False, None, [], ("end_turn", None)),
        ("eos", False, None, [], ("end_turn", None)),
        ("stop", False, "END", ["STOP", "END"], ("stop_sequence", "END")),
        ("stop", False, "\n\nHuman:", ["\n\nHuman:"], ("stop_sequence", "\n\nHuman:")),
        ("stop", False, "END", [], ("end_turn", None)),
        ("stop", False, "OTHER", ["END"], ("end_turn", None)),
        ("stop", False, 128009, ["END"], ("end_turn", None)),
        ("stop", False, None, ["END"], ("end_turn", None)),
        ("error", False, None, [], (None, None)),
    ],
    ids=[
        "stop",
        "length",
        "length_with_tools",
        "tool_calls",
        "tool_calls_without_calls",
        "function_call",
        "stop_with_tool_calls",
        "content_filter",
        "null",
        "unknown_reason",
        "vllm_stop_string_matched",
        "vllm_whitespace_stop_matched",
        "vllm_stop_string_not_requested",
        "vllm_stop_string_other",
        "vllm_stop_token_id",
        "vllm_eos_null",
        "error",
    ],
)
def test_map_stop_reason(
    finish_reason: Any, has_tools: bool, matched: Any, stops: list[str], expected: tuple
) -> None:
    assert map_stop_reason(finish_reason, has_tools, matched, stops) == expected


@pytest.mark.parametrize(
    ("finish_reason", "message", "choice_extra", "stops", "expected"),
    [
        ("stop", None, {}, [], ("end_turn", None)),
        ("length", None, {}, [], ("max_tokens", None)),
        ("tool_calls", tool_message(call("c1", "f", "{}")), {}, [], ("tool_use", None)),
        ("stop", tool_message(call("c1", "f", "{}")), {}, [], ("tool_use", None)),
        ("function_call", None, {}, [], ("tool_use", None)),
        ("content_filter", None, {}, [], ("refusal", None)),
        (None, None, {}, [], ("end_turn", None)),
        ("stop", None, {"stop_reason": "###"}, ["###"], ("stop_sequence", "###")),
        ("stop", None, {"stop_reason": 151645}, ["###"], ("end_turn", None)),
        ("stop", None, {"stop_reason": None}, ["###"], ("end_turn", None)),
    ],
    ids=[
        "stop",
        "length",
        "tool_calls",
        "stop_with_tool_calls",
        "function_call",
        "content_filter",
        "null",
        "vllm_stop_string",
        "vllm_stop_token_int",
        "vllm_eos_none",
    ],
)
def test_finish_reason_becomes_stop_reason(
    finish_reason: Any, message: Any, choice_extra: dict, stops: list[str], expected: tuple
) -> None:
    result = translate(
        completion(message, finish_reason=finish_reason, **choice_extra), stop_sequences=stops
    )
    assert (result["stop_reason"], result["stop_sequence"]) == expected


def test_finish_reason_error_raises_instead_of_returning_a_message() -> None:
    with pytest.raises(GatewayError) as caught:
        translate(completion(finish_reason="error"))
    assert caught.value.status >= 500


def test_refusal_text_sets_stop_reason_refusal() -> None:
    message = {"role": "assistant", "content": None, "refusal": "I can't help with that."}
    assert translate(completion(message))["stop_reason"] == "refusal"


# --- usage -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "estimate", "expected"),
    [
        (
            {"prompt_tokens": 380, "completion_tokens": 22, "total_tokens": 402},
            0,
            (380, 22, 0),
        ),
        (
            {
                "prompt_tokens": 380,
                "completion_tokens": 22,
                "prompt_tokens_details": {"cached_tokens": 256},
                "completion_tokens_details": {"reasoning_tokens": 9},
            },
            0,
            (124, 22, 256),
        ),
        (
            {
                "prompt_tokens": 100,
                "completion_tokens": 5,
                "prompt_cache_hit_tokens": 60,
                "prompt_cache_miss_tokens": 40,
            },
            0,
            (40, 5, 60),
        ),
        (
            {"prompt_tokens": 50, "completion_tokens": 5, "prompt_tokens_details": None},
            0,
            (50, 5, 0),
        ),
        ({"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 30}}, 3, (0, 3, 30)),
        ({"prompt_tokens": 10}, 7, (10, 7, 0)),
        ({"prompt_tokens": None, "completion_tokens": None}, 4, (0, 4, 0)),
        ({"prompt_tokens": True, "completion_tokens": "12"}, 4, (0, 0, 0)),
        (None, 9, (0, 9, 0)),
        ([], 2, (0, 2, 0)),
    ],
    ids=[
        "plain",
        "openai_cached_tokens_subtracted",
        "deepseek_cache_hit",
        "details_null",
        "cached_more_than_prompt",
        "no_completion_tokens_uses_estimate",
        "nulls",
        "wrong_types",
        "missing",
        "not_an_object",
    ],
)
def test_map_usage(usage: Any, estimate: int, expected: tuple[int, int, int]) -> None:
    mapped = map_usage(usage, estimate_output=estimate)
    assert mapped == {
        "input_tokens": expected[0],
        "output_tokens": expected[1],
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": expected[2],
    }
    assert all(type(v) is int for v in mapped.values())


def test_missing_usage_is_estimated_as_integers() -> None:
    message = translate(completion({"role": "assistant", "content": "x" * 40}, usage=None))
    usage = message["usage"]
    assert all(type(v) is int for v in usage.values())
    assert usage["input_tokens"] == 0
    assert usage["output_tokens"] == 10


def test_deepseek_usage_in_a_response() -> None:
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 12,
        "prompt_cache_hit_tokens": 900,
        "prompt_cache_miss_tokens": 100,
    }
    assert translate(completion(usage=usage))["usage"] == {
        "input_tokens": 100,
        "output_tokens": 12,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 900,
    }


# --- content ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"role": "assistant", "content": "Hi"}, [{"type": "text", "text": "Hi"}]),
        (
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}],
            },
            [{"type": "text", "text": "Hello"}],
        ),
        ({"role": "assistant", "content": ""}, []),
        ({"role": "assistant", "content": None}, []),
        ({"role": "assistant"}, []),
        (
            {"role": "assistant", "content": None, "refusal": "I can't help with that."},
            [{"type": "text", "text": "I can't help with that."}],
        ),
    ],
    ids=["string", "content_parts", "empty_string", "null", "absent", "refusal"],
)
def test_message_content_becomes_text_blocks(message: dict, expected: list) -> None:
    assert translate(completion(message))["content"] == expected


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_becomes_a_signed_thinking_block_before_text(field: str) -> None:
    message = {"role": "assistant", "content": "42", field: "Let me compute."}
    content = translate(completion(message))["content"]
    assert [b["type"] for b in content] == ["thinking", "text"]
    thinking = content[0]
    assert thinking["thinking"] == "Let me compute."
    assert isinstance(thinking["signature"], str)
    assert thinking["signature"].startswith("gw1.")
    assert len(thinking["signature"]) > len("gw1.")


def test_empty_reasoning_under_one_name_falls_back_to_the_other() -> None:
    message = {"role": "assistant", "content": "ok", "reasoning_content": "", "reasoning": "R"}
    assert translate(completion(message))["content"][0]["thinking"] == "R"


def test_block_order_is_thinking_text_then_tool_use() -> None:
    message = {
        "role": "assistant",
        "reasoning_content": "Need weather.",
        "content": "Let me look that up.",
        "tool_calls": [call("call_x1", "get_weather", '{"city":"Oslo"}')],
    }
    result = translate(completion(message, finish_reason="tool_calls"))
    assert [b["type"] for b in result["content"]] == ["thinking", "text", "tool_use"]
    assert result["content"][2] == {
        "type": "tool_use",
        "id": "call_x1",
        "name": "get_weather",
        "input": {"city": "Oslo"},
    }
    assert result["stop_reason"] == "tool_use"


def test_tool_call_ids_are_kept_when_unique_and_replaced_when_missing_or_repeated() -> None:
    message = tool_message(
        call("call_a", "f", "{}"),
        call("call_a", "g", "{}"),
        call(None, "h", "{}"),
        call("", "i", "{}"),
        call("call_b", "j", "{}"),
    )
    blocks = translate(completion(message, finish_reason="tool_calls"))["content"]
    ids = [b["id"] for b in blocks]
    assert [b["name"] for b in blocks] == ["f", "g", "h", "i", "j"]
    assert ids[0] == "call_a"
    assert ids[4] == "call_b"
    assert all(i.startswith("toolu_") for i in ids[1:4])
    assert len(set(ids)) == 5


def test_missing_tool_call_id_does_not_collide_with_later_upstream_id() -> None:
    message = tool_message(call(None, "f", "{}"), call("call_z", "g", "{}"))
    ids = [b["id"] for b in translate(completion(message))["content"]]
    assert ids[0].startswith("toolu_") and ids[1] == "call_z"


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"city": "Oslo"}', {"city": "Oslo"}),
        ({"city": "Oslo"}, {"city": "Oslo"}),
        ('```json\n{"city": "Oslo"}\n```', {"city": "Oslo"}),
        ('```\n{"city": "Oslo"}\n```', {"city": "Oslo"}),
        ('  ```json{"a": 1}```  ', {"a": 1}),
        ('{"a": [1, 2,], "b": 3,}', {"a": [1, 2], "b": 3}),
        ('{"a": {"b": 1 , }\n}', {"a": {"b": 1}}),
        ("", {}),
        ("   ", {}),
        (None, {}),
        ("not json at all", {"_raw_arguments": "not json at all"}),
        ('{"city": "Os', {"_raw_arguments": '{"city": "Os'}),
        ("[1, 2]", {"_raw_arguments": "[1, 2]"}),
        ('"just a string"', {"_raw_arguments": '"just a string"'}),
        ("{'city': 'Oslo'}", {"_raw_arguments": "{'city': 'Oslo'}"}),
    ],
    ids=[
        "valid",
        "already_an_object",
        "json_code_fence",
        "bare_code_fence",
        "fence_without_newlines",
        "trailing_commas",
        "nested_trailing_comma",
        "empty",
        "blank",
        "null",
        "garbage_wrapped",
        "truncated_wrapped",
        "array_wrapped",
        "string_wrapped",
        "python_dict_wrapped",
    ],
)
def test_parse_arguments_repairs_or_wraps(arguments: Any, expected: dict) -> None:
    assert parse_arguments(arguments) == expected


def test_invalid_tool_arguments_in_a_response_are_wrapped_not_forwarded() -> None:
    message = tool_message(call("c1", "f", "{broken"), call("c2", "g", ""))
    blocks = translate(completion(message, finish_reason="tool_calls"))["content"]
    assert [b["input"] for b in blocks] == [{"_raw_arguments": "{broken"}, {}]


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "error_class", "message"),
    [
        (
            {"error": {"message": "The server is overloaded", "code": 503}},
            Overloaded,
            "The server is overloaded",
        ),
        (
            {"error": {"message": "Rate limit reached", "type": "rate_limit", "code": 429}},
            RateLimited,
            "Rate limit reached",
        ),
        (
            {"object": "error", "message": "CUDA out of memory", "type": "InternalServerError"},
            UpstreamError,
            "CUDA out of memory",
        ),
        (
            {"error": "Internal error", "choices": []},
            UpstreamError,
            "Internal error",
        ),
    ],
    ids=["openai_shape_overloaded", "rate_limited", "flat_vllm", "string_error"],
)
def test_error_body_in_a_200_raises_the_mapped_error(
    raw: dict, error_class: type, message: str
) -> None:
    with pytest.raises(error_class) as caught:
        translate(raw)
    assert caught.value.message == message


@pytest.mark.parametrize(
    "raw",
    [
        {"id": "x", "choices": []},
        {"id": "x"},
        {"id": "x", "choices": None},
        {"id": "x", "choices": ["text"]},
        ["not", "an", "object"],
        "text",
    ],
    ids=["empty_choices", "no_choices", "null_choices", "choice_not_object", "list", "string"],
)
def test_answer_without_usable_choices_raises_upstream_error(raw: Any) -> None:
    with pytest.raises(UpstreamError) as caught:
        translate(raw)
    assert caught.value.status == 500
    assert caught.value.error_type == "api_error"


@pytest.mark.parametrize(
    ("message", "named"),
    [
        (tool_message({"id": "c1", "function": "get_weather"}), "function is not an object"),
        (tool_message({"id": "c1", "function": ["get_weather"]}), "function is not an object"),
        (tool_message(call("c1", "f", 42)), "neither JSON text nor an object"),
        (tool_message(call("c1", "f", True)), "neither JSON text nor an object"),
        (tool_message({"id": "c1", "function": {"name": 7}}), "name is not a string"),
        (tool_message("get_weather"), "tool call that is not an object"),
        ({"role": "assistant", "tool_calls": {"0": call("c1", "f", "{}")}},
         "tool_calls that are not an array"),
        ({"role": "assistant", "tool_calls": 3}, "tool_calls that are not an array"),
    ],
    ids=["function_string", "function_array", "arguments_number", "arguments_bool",
         "name_number", "call_string", "tool_calls_object", "tool_calls_number"],
)  # fmt: skip
def test_a_malformed_tool_call_is_a_backend_error_naming_it(message: Any, named: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        translate_response(
            completion(message, finish_reason="tool_calls"),
            model="m",
            message_id="msg_1",
            stop_sequences=[],
            backend="vllm-a",
        )
    assert (caught.value.status, caught.value.error_type) == (500, "api_error")
    assert caught.value.message.startswith("backend vllm-a sent")
    assert named in caught.value.message
    assert caught.value.backend_fault


@pytest.mark.parametrize("message", ["Hello", 5, ["Hello"]], ids=["string", "number", "array"])
def test_a_message_that_is_not_an_object_is_a_backend_error(message: Any) -> None:
    with pytest.raises(UpstreamError, match="message that is not an object") as caught:
        translate(completion(message))
    assert caught.value.backend_fault


def test_an_unusable_answer_counts_against_the_backend() -> None:
    with pytest.raises(UpstreamError) as caught:
        translate({"id": "x", "choices": []})
    assert caught.value.backend_fault


@pytest.mark.parametrize(
    "choices", [1, "abc", {"a": 1}, [5]], ids=["number", "string", "object", "choice_number"]
)
@pytest.mark.parametrize("extra", [{"timings": -1}, {"timings": {"predicted_n": 300}}, {}])
def test_choices_of_a_shape_it_does_not_know_are_no_evidence_of_a_full_context(
    choices: Any, extra: dict
) -> None:
    """It is read before the choices are checked: it must not raise on them."""
    assert context_window_exceeded({"choices": choices, **extra}, 100) is False


# --- any field of a valid answer replaced by a value of another type ---------------------------

VALID_ANSWERS = [
    completion(),
    completion(tool_message(call("c1", "get_weather", '{"city": "Paris"}'), content="Let me see."),
               finish_reason="tool_calls", stop_reason=None)
    | {"timings": {"predicted_n": 5}},
    completion({"role": "assistant", "content": "<think>hm</think>Hi", "reasoning_content": "r"},
               finish_reason="length"),
]  # fmt: skip

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
    if isinstance(value, dict):
        items: Any = value.items()
    else:
        items = enumerate(value) if isinstance(value, list) else []
    for key, inner in items:
        found += json_paths(inner, (*path, key))
    return found


@settings(max_examples=300)
@given(data=st.data())
def test_any_field_of_an_answer_of_another_type_is_an_answer_or_a_gateway_error(
    data: st.DataObject,
) -> None:
    answer = copy.deepcopy(data.draw(st.sampled_from(VALID_ANSWERS)))
    path = data.draw(st.sampled_from(json_paths(answer)))
    holder = answer
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = data.draw(JSON_VALUES)
    try:
        message = translate_response(
            answer, model="m", message_id="msg_1", stop_sequences=["STOP"], max_tokens=100
        )
    except GatewayError:
        return
    assert message["type"] == "message" and isinstance(message["content"], list)
