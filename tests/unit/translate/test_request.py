"""Anthropic Messages request -> OpenAI Chat Completions request (app/translate/request.py).

Pure functions on plain data: every test builds a Messages body, translates it and looks at the
Chat Completions payload (or at the InvalidRequest naming the offending field).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from app.errors import InvalidRequest
from app.translate.dialect import DIALECTS
from app.translate.request import stop_sequences, translate_request

PNG = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
CLOCK_TOOL = {"name": "get_time", "input_schema": {"type": "object"}}


def body(**fields: Any) -> dict[str, Any]:
    """A valid minimal Messages body; ``fields`` replace or add top-level keys."""
    base: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    base.update(fields)
    return base


def translate(dialect: str = "generic", **fields: Any) -> dict[str, Any]:
    return translate_request(
        body(**fields),
        backend_model="backend-model",
        dialect=DIALECTS[dialect],
        billing_header="normalize",
    )


def convo(*messages: dict[str, Any], dialect: str = "generic", **fields: Any) -> list[dict]:
    """The translated ``messages`` for a conversation."""
    return translate(dialect, messages=list(messages), **fields)["messages"]


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def system(content: Any) -> dict[str, Any]:
    return {"role": "system", "content": content}


def text(value: str, **extra: Any) -> dict[str, Any]:
    return {"type": "text", "text": value, **extra}


def tool_use(call_id: str, name: str = "get_weather", tool_input: Any = None) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id, "name": name, "input": tool_input or {}}


def tool_result(call_id: str, content: Any = "ok", **extra: Any) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": call_id, "content": content, **extra}


def rejection(raw: Any) -> str:
    """The message of the InvalidRequest a body is rejected with."""
    with pytest.raises(InvalidRequest) as caught:
        translate_request(
            raw,
            backend_model="backend-model",
            dialect=DIALECTS["generic"],
            billing_header="normalize",
        )
    assert caught.value.status == 400
    assert caught.value.error_type == "invalid_request_error"
    return caught.value.message


# --- the minimal request and what is never forwarded -------------------------------------------


def test_minimal_request_becomes_minimal_chat_completion() -> None:
    assert translate() == {
        "model": "backend-model",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 256,
    }


@pytest.mark.parametrize(
    "fields",
    [
        {"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}},
        {"output_config": {"effort": "high"}},
        {"service_tier": "auto"},
        {"cache_control": {"type": "ephemeral", "ttl": "1h"}},
        {"thinking": {"type": "enabled", "budget_tokens": 2048}},
        {"thinking": {"type": "adaptive"}},
        {"container": "container_123", "inference_geo": "us"},
        {"mcp_servers": []},
        {"stream": True},
        {"stream": None},
        {"metadata": {}},
        {"some_future_field": {"x": 1}},
    ],
    ids=[
        "context_management",
        "output_config_effort_only",
        "service_tier",
        "top_level_cache_control",
        "thinking_enabled",
        "thinking_adaptive",
        "container_and_geo",
        "empty_mcp_servers",
        "stream_true",
        "stream_null",
        "empty_metadata",
        "unknown_field",
    ],
)
def test_harmless_fields_are_ignored_and_not_forwarded(fields: dict[str, Any]) -> None:
    assert translate(**fields) == translate()


def test_cache_control_on_blocks_and_tools_is_stripped() -> None:
    ephemeral = {"type": "ephemeral"}
    payload = translate(
        system=[text("Be terse.", cache_control=ephemeral)],
        messages=[user([text("Hi", cache_control=ephemeral)])],
        tools=[dict(WEATHER_TOOL, cache_control=ephemeral, defer_loading=True)],
    )
    assert payload["messages"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
    ]
    assert "cache_control" not in json.dumps(payload)
    assert "defer_loading" not in json.dumps(payload)


def test_input_body_is_not_modified() -> None:
    raw = body(
        system="S",
        messages=[
            user("a"),
            user([text("b"), text("  ")]),
            assistant([text("prefill  ")]),
        ],
    )
    before = copy.deepcopy(raw)
    translate_request(raw, backend_model="m", dialect=DIALECTS["vllm"], billing_header="normalize")
    assert raw == before


# --- validation: every error names the field path ------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ([], "request body must be a JSON object"),
        ("hello", "request body must be a JSON object"),
        ({"max_tokens": 1, "messages": []}, "model: field required"),
        (body(model=""), "model: must be a non-empty string"),
        (body(model=7), "model: must be a non-empty string"),
        ({"model": "m", "messages": [user("x")]}, "max_tokens: field required"),
        (body(max_tokens=True), "max_tokens: must be an integer of at least 1"),
        (body(max_tokens=0), "max_tokens: must be an integer of at least 1"),
        (body(max_tokens=-5), "max_tokens: must be an integer of at least 1"),
        (body(max_tokens="256"), "max_tokens: must be an integer of at least 1"),
        (body(max_tokens=25.5), "max_tokens: must be an integer of at least 1"),
        ({"model": "m", "max_tokens": 1}, "messages: field required"),
        (body(messages={"role": "user"}), "messages: must be an array of messages"),
        (body(messages=[]), "messages: at least one message with non-empty content"),
        (body(messages=["hi"]), "messages.0: must be an object with role and content"),
        (body(messages=[{"role": "tool", "content": "x"}]), "messages.0.role: must be one of"),
        (body(messages=[{"content": "x"}]), "messages.0.role: must be one of"),
        (body(messages=[{"role": "user"}]), "messages.0.content: field required"),
        (body(messages=[user(5)]), "messages.0.content: must be a string or an array"),
        (body(messages=[user({"type": "text"})]), "messages.0.content: must be a string or"),
        (body(messages=[user([{"text": "x"}])]), "messages.0.content.0: must be a content block"),
        (body(messages=[user(["x"])]), "messages.0.content.0: must be a content block"),
        (
            body(messages=[user("a"), assistant("b"), user([{"type": "text", "text": 5}])]),
            "messages.2.content.0.text: must be a string",
        ),
        (body(stream="yes"), "stream: must be a boolean"),
        (body(stream=1), "stream: must be a boolean"),
        (body(mcp_servers=[{"type": "url", "url": "https://mcp"}]), "mcp_servers:"),
        (body(metadata="user-1"), "metadata: must be an object"),
        (body(metadata={"user_id": 42}), "metadata.user_id: must be a string or null"),
        (body(stop_sequences="STOP"), "stop_sequences: must be an array of strings"),
        (body(stop_sequences=["a", 1]), "stop_sequences: must be an array of strings"),
        (body(system=5), "system: must be a string or an array of text blocks"),
        (body(system=[{"type": "image", "source": PNG}]), "system.0: system blocks must be text"),
        (body(system=[text("a"), {"type": "text", "text": None}]), "system.1.text: must be a"),
        (body(messages=[system(7), user("x")]), "messages.0.content: must be a string or an"),
        (
            body(messages=[user("x"), system([{"type": "image", "source": PNG}])]),
            "messages.1.content.0: system blocks must be text blocks",
        ),
    ],
    ids=[
        "body_list",
        "body_string",
        "model_missing",
        "model_empty",
        "model_int",
        "max_tokens_missing",
        "max_tokens_bool",
        "max_tokens_zero",
        "max_tokens_negative",
        "max_tokens_string",
        "max_tokens_float",
        "messages_missing",
        "messages_object",
        "messages_empty",
        "message_not_object",
        "role_tool",
        "role_missing",
        "content_missing",
        "content_int",
        "content_object",
        "block_without_type",
        "block_string",
        "text_not_string_deep_path",
        "stream_string",
        "stream_int",
        "mcp_servers",
        "metadata_string",
        "metadata_user_id_int",
        "stop_sequences_string",
        "stop_sequences_non_string_item",
        "system_int",
        "system_image_block",
        "system_text_not_string",
        "system_message_int_content",
        "system_message_image_block",
    ],
)
def test_invalid_top_level_fields_are_rejected_naming_the_field(raw: Any, expected: str) -> None:
    assert rejection(raw).startswith(expected)


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        (
            [user([{"type": "image", "source": dict(PNG, media_type="image/bmp")}])],
            "messages.0.content.0.source.media_type: must be one of",
        ),
        ([user([{"type": "image"}])], "messages.0.content.0.source: field required"),
        (
            [user([{"type": "image", "source": {"type": "file", "file_id": "file_1"}}])],
            "messages.0.content.0.source.type: unsupported image source type 'file'",
        ),
        (
            [user([{"type": "image", "source": {"type": "url", "url": "ftp://x/y.png"}}])],
            "messages.0.content.0.source.url: must be an http(s) or data URL",
        ),
        (
            [user([{"type": "image", "source": dict(PNG, data="")}])],
            "messages.0.content.0.source.data: must be a non-empty base64 string",
        ),
        (
            [
                user(
                    [
                        {
                            "type": "document",
                            "source": {
                                "type": "base64",
                                "media_type": "application/pdf",
                                "data": "JVBERi0=",
                            },
                        }
                    ]
                )
            ],
            "messages.0.content.0.source.type: document source 'base64' is not supported",
        ),
        (
            [user([{"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}}])],
            "messages.0.content.0.source.type: document source 'url' is not supported",
        ),
        (
            [user([tool_use("toolu_1")])],
            "messages.0.content.0.type: 'tool_use' blocks are only allowed in assistant turns",
        ),
        (
            [user([{"type": "thinking", "thinking": "t", "signature": "s"}])],
            "messages.0.content.0.type: 'thinking' blocks are only allowed in assistant turns",
        ),
        (
            [user([{"type": "input_audio", "data": "x"}])],
            "messages.0.content.0.type: unsupported content block type 'input_audio'",
        ),
        (
            [user("Hi"), assistant([{"type": "image", "source": PNG}])],
            "messages.1.content.0.type: unsupported assistant content block type 'image'",
        ),
        (
            [user("Hi"), assistant([{"type": "tool_use", "name": "f", "input": {}}])],
            "messages.1.content.0.id: must be a non-empty string",
        ),
        (
            [user("Hi"), assistant([{"type": "tool_use", "id": "toolu_1", "input": {}}])],
            "messages.1.content.0.name: must be a non-empty string",
        ),
        (
            [user("Hi"), assistant([tool_use("toolu_1") | {"input": "{}"}])],
            "messages.1.content.0.input: must be an object",
        ),
        (
            [user([{"type": "tool_result", "content": "x"}])],
            "messages.0.content.0.tool_use_id: must be a non-empty string",
        ),
        (
            [user([tool_result("toolu_1", 42)])],
            "messages.0.content.0.content: must be a string or an array",
        ),
        (
            [user([tool_result("toolu_1", [{"type": "video"}])])],
            "messages.0.content.0.content.0.type: unsupported",
        ),
        (
            [user("a"), user([text("b"), {"type": "image", "source": {"type": "base64"}}])],
            "messages.1.content.1.source.media_type:",
        ),
        ([user(""), assistant("  ")], "messages: at least one message with non-empty content"),
        ([system("Only a system prompt")], "messages: at least one message with non-empty"),
    ],
    ids=[
        "image_bad_media_type",
        "image_without_source",
        "image_file_source",
        "image_ftp_url",
        "image_empty_data",
        "pdf_document",
        "url_document",
        "tool_use_in_user_turn",
        "thinking_in_user_turn",
        "unknown_user_block",
        "image_in_assistant_turn",
        "tool_use_without_id",
        "tool_use_without_name",
        "tool_use_input_string",
        "tool_result_without_id",
        "tool_result_content_int",
        "tool_result_unknown_block",
        "path_survives_merging",
        "all_content_empty",
        "only_system_messages",
    ],
)
def test_invalid_content_is_rejected_naming_the_block_path(
    messages: list[dict[str, Any]], expected: str
) -> None:
    assert rejection(body(messages=messages)).startswith(expected)


# --- system prompt ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("system_field", "expected"),
    [
        ("You are terse.", [{"role": "system", "content": "You are terse."}]),
        (
            [text("Rule one."), text("Rule two.", citations=None)],
            [{"role": "system", "content": "Rule one.\n\nRule two."}],
        ),
        ([text("Rule one."), text("   "), text("")], [{"role": "system", "content": "Rule one."}]),
        ("   ", []),
        ([], []),
        (None, []),
    ],
    ids=["string", "text_blocks_joined", "empty_blocks_dropped", "blank_string", "empty", "null"],
)
def test_system_becomes_one_leading_system_message(system_field: Any, expected: list) -> None:
    assert convo(user("Hi"), system=system_field) == [*expected, {"role": "user", "content": "Hi"}]


def test_system_role_messages_are_folded_into_the_system_prompt_in_order() -> None:
    messages = convo(
        user("a"),
        system("Second."),
        assistant("b"),
        system([{"type": "mid_conv_system", "content": [text("Third.")]}]),
        user("c"),
        system=[text("First.")],
    )
    assert messages == [
        {"role": "system", "content": "First.\n\nSecond.\n\nThird."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]


def test_removing_a_system_message_merges_the_user_turns_around_it() -> None:
    assert convo(user("a"), system("Be brief."), user("b")) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a\n\nb"},
    ]


def test_mid_conv_system_block_in_system_field_is_accepted() -> None:
    mid = {"type": "mid_conv_system", "content": [text("Extra rule.")]}
    assert convo(user("Hi"), system=[text("Base."), mid])[0] == {
        "role": "system",
        "content": "Base.\n\nExtra rule.",
    }


# --- turn normalisation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        (
            [user("a"), user([text("b"), text("c")])],
            [{"role": "user", "content": "a\n\nb\n\nc"}],
        ),
        (
            [user("q"), assistant("a1"), assistant([text("a2")]), user("q2")],
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a1\n\na2"},
                {"role": "user", "content": "q2"},
            ],
        ),
        (
            [user([text(""), text("  \n"), text("real")])],
            [{"role": "user", "content": "real"}],
        ),
        (
            [user("a"), assistant(""), user("b")],
            [{"role": "user", "content": "a\n\nb"}],
        ),
        (
            [user("a"), assistant([text(" "), text("\n\t")]), user("b")],
            [{"role": "user", "content": "a\n\nb"}],
        ),
        (
            [user("q"), assistant("x"), user("   "), assistant("y"), user("z")],
            [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "x\n\ny"},
                {"role": "user", "content": "z"},
            ],
        ),
        (
            [assistant("Hello"), user("Hi")],
            [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hi"}],
        ),
    ],
    ids=[
        "consecutive_user_turns_merged",
        "consecutive_assistant_turns_merged",
        "empty_and_whitespace_text_blocks_dropped",
        "empty_turn_disappears_and_neighbours_merge",
        "whitespace_only_turn_disappears",
        "empty_user_turn_merges_assistant_neighbours",
        "leading_assistant_turn_kept",
    ],
)
def test_turns_are_normalised(messages: list[dict], expected: list[dict]) -> None:
    assert convo(*messages) == expected


# --- prefill -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "expected_last"),
    [
        (
            [user("Answer in JSON"), assistant("{\n  ")],
            {"role": "assistant", "content": "{"},
        ),
        (
            [user("q"), assistant([text("The answer is"), text(" 42 \n")])],
            {"role": "assistant", "content": "The answer is\n\n 42"},
        ),
        ([user("q"), assistant("   ")], {"role": "user", "content": "q"}),
        ([user("q"), assistant([text(""), text(" ")])], {"role": "user", "content": "q"}),
    ],
    ids=[
        "trailing_whitespace_trimmed",
        "last_text_block_trimmed",
        "whitespace_only_prefill_dropped",
        "empty_blocks_prefill_dropped",
    ],
)
def test_final_assistant_prefill_is_trimmed(messages: list[dict], expected_last: dict) -> None:
    assert convo(*messages)[-1] == expected_last


def test_trailing_whitespace_of_earlier_assistant_turns_is_kept() -> None:
    assert convo(user("q"), assistant("kept  "), user("next"))[1]["content"] == "kept  "


def test_prefill_exposed_by_dropping_an_empty_final_turn_is_trimmed() -> None:
    messages = convo(user("q"), assistant("Sure:  \n"), user("  "))
    assert messages[-1] == {"role": "assistant", "content": "Sure:"}


@pytest.mark.parametrize(
    ("dialect", "messages", "flags"),
    [
        ("vllm", [user("q"), assistant("Sure")], True),
        ("vllm", [user("q"), assistant("Sure"), user("go on")], False),
        ("vllm", [user("q"), assistant("  ")], False),
        ("llamacpp", [user("q"), assistant("Sure")], False),
        ("openai", [user("q"), assistant("Sure")], False),
        ("generic", [user("q"), assistant("Sure")], False),
    ],
    ids=[
        "vllm_prefill",
        "vllm_last_turn_user",
        "vllm_prefill_dropped_as_blank",
        "llamacpp_continues_without_flags",
        "openai",
        "generic",
    ],
)
def test_vllm_prefill_flags_only_when_last_turn_is_assistant(
    dialect: str, messages: list[dict], flags: bool
) -> None:
    payload = translate(dialect, messages=messages)
    if flags:
        assert payload["continue_final_message"] is True
        assert payload["add_generation_prompt"] is False
    else:
        assert "continue_final_message" not in payload
        assert "add_generation_prompt" not in payload


# --- sampling parameters -------------------------------------------------------------------


@pytest.mark.parametrize("key", ["temperature", "top_p"])
@pytest.mark.parametrize("value", [0, 0.0, 0.7, 1, 1.0], ids=["0", "0.0", "0.7", "1", "1.0"])
def test_sampling_values_in_range_are_forwarded(key: str, value: float) -> None:
    payload = translate(**{key: value})
    assert payload[key] == value
    assert type(payload[key]) is type(value)


@pytest.mark.parametrize("key", ["temperature", "top_p"])
@pytest.mark.parametrize(
    "value", [-0.1, 1.01, 2, "0.5", True, [0.5]], ids=["neg", "above1", "2", "str", "bool", "list"]
)
def test_sampling_values_out_of_range_or_wrong_type_are_rejected(key: str, value: Any) -> None:
    assert rejection(body(**{key: value})) == f"{key}: must be a number between 0 and 1"


@pytest.mark.parametrize(
    ("dialect", "forwarded"),
    [
        ("vllm", True),
        ("sglang", True),
        ("llamacpp", True),
        ("generic", False),
        ("openai", False),
        ("ollama", False),
        ("deepseek", False),
    ],
    ids=lambda v: str(v),
)
def test_top_k_is_forwarded_only_to_dialects_that_take_it(dialect: str, forwarded: bool) -> None:
    payload = translate(dialect, top_k=40)
    assert payload.get("top_k") == (40 if forwarded else None)


@pytest.mark.parametrize("dialect", ["vllm", "generic"])
@pytest.mark.parametrize("value", [-1, 1.5, "40", True], ids=["neg", "float", "str", "bool"])
def test_invalid_top_k_is_rejected_for_every_dialect(dialect: str, value: Any) -> None:
    with pytest.raises(InvalidRequest, match=r"^top_k: must be a non-negative integer$"):
        translate(dialect, top_k=value)


@pytest.mark.parametrize(
    ("stops", "path"),
    [(["x"] * 257, "stop_sequences"), (["ok", "y" * 1001], "stop_sequences.1")],
    ids=["too_many", "too_long"],
)
def test_stop_sequences_are_bounded_in_number_and_length(stops: list[str], path: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        translate("generic", stop_sequences=stops)
    assert caught.value.message.startswith(path + ":")
    assert translate("generic", stop_sequences=["x"] * 255 + ["y" * 1000])


@pytest.mark.parametrize("dialect", ["generic", "openai", "vllm", "llamacpp"])
def test_stop_sequences_are_never_sent_to_the_backend(dialect: str) -> None:
    """The gateway matches them itself: backends do not say which fired, OpenAI takes four."""
    payload = translate(dialect, stop_sequences=["a", "b", "c", "d", "e", "\n\nHuman:"])
    assert "stop" not in payload


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"stop_sequences": ["", "END", "STOP"]}, ["END", "STOP"]),
        ({"stop_sequences": ["a", "b", "c", "d", "e", "f"]}, ["a", "b", "c", "d", "e", "f"]),
        ({"stop_sequences": None}, []),
        ({}, []),
    ],
    ids=["drops_empty", "not_capped", "null", "absent"],
)
def test_stop_sequences_helper_returns_the_clients_non_empty_stops(
    raw: dict, expected: list[str]
) -> None:
    assert stop_sequences(raw) == expected


@pytest.mark.parametrize(
    ("dialect", "metadata", "expected"),
    [
        ("generic", {"user_id": "user-42"}, "user-42"),
        ("openai", {"user_id": "user-42"}, "user-42"),
        ("vllm", {"user_id": "user-42"}, "user-42"),
        ("deepseek", {"user_id": "user-42"}, None),
        ("generic", {"user_id": None}, None),
        ("generic", {"user_id": ""}, None),
    ],
    ids=["generic", "openai", "vllm", "deepseek_never", "null_user", "empty_user"],
)
def test_metadata_user_id_becomes_user(dialect: str, metadata: dict, expected: Any) -> None:
    assert translate(dialect, metadata=metadata).get("user") == expected


@pytest.mark.parametrize(
    ("dialect", "field"),
    [
        ("openai", "max_completion_tokens"),
        ("generic", "max_tokens"),
        ("vllm", "max_tokens"),
        ("llamacpp", "max_tokens"),
        ("ollama", "max_tokens"),
        ("deepseek", "max_tokens"),
        ("sglang", "max_tokens"),
    ],
    ids=lambda v: str(v),
)
def test_max_tokens_goes_in_the_dialects_field(dialect: str, field: str) -> None:
    payload = translate(dialect, max_tokens=32000)
    assert payload[field] == 32000
    other = {"max_tokens", "max_completion_tokens"} - {field}
    assert not other & payload.keys()


def test_model_is_replaced_by_the_backend_model() -> None:
    assert translate(model="claude-opus-4-1")["model"] == "backend-model"


# --- tools -----------------------------------------------------------------------------------


def test_tools_become_functions_without_anthropic_only_fields() -> None:
    extra = {
        "type": "custom",
        "strict": True,
        "input_examples": [{"city": "Oslo"}],
        "eager_input_streaming": True,
        "allowed_callers": ["direct"],
    }
    payload = translate(tools=[dict(WEATHER_TOOL, **extra), CLOCK_TOOL])
    assert payload["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": WEATHER_TOOL["input_schema"],
                "description": "Weather for a city",
            },
        },
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    ]
    assert "tool_choice" not in payload


@pytest.mark.parametrize(
    ("tools", "expected"),
    [
        (
            [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
            "tools.0.type: server tool 'web_search_20250305' cannot run on this backend",
        ),
        (
            [WEATHER_TOOL, {"type": "code_execution_20250825", "name": "code_execution"}],
            "tools.1.type: server tool 'code_execution_20250825'",
        ),
        ([{"input_schema": {"type": "object"}}], "tools.0.name: must be a non-empty string"),
        ([{"name": "f"}], "tools.0.input_schema: must be a JSON Schema object"),
        (["get_weather"], "tools.0: must be an object"),
        ({"get_weather": WEATHER_TOOL}, "tools: must be an array of tool definitions"),
    ],
    ids=[
        "web_search",
        "second_tool_code_execution",
        "no_name",
        "no_schema",
        "tool_string",
        "tools_object",
    ],
)
def test_untranslatable_tools_are_rejected_naming_the_tool(tools: Any, expected: str) -> None:
    assert rejection(body(tools=tools)).startswith(expected)


@pytest.mark.parametrize(
    ("tool_choice", "expected_choice", "expected_parallel"),
    [
        ({"type": "auto"}, "auto", None),
        ({"type": "any"}, "required", None),
        (
            {"type": "tool", "name": "get_time"},
            {"type": "function", "function": {"name": "get_time"}},
            None,
        ),
        ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False),
        ({"type": "any", "disable_parallel_tool_use": True}, "required", False),
        (
            {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
            {"type": "function", "function": {"name": "get_weather"}},
            False,
        ),
        ({"type": "auto", "disable_parallel_tool_use": False}, "auto", None),
    ],
    ids=[
        "auto",
        "any_required",
        "tool_named",
        "auto_no_parallel",
        "any_no_parallel",
        "tool_no_parallel",
        "parallel_allowed",
    ],
)
def test_tool_choice_maps_to_openai(
    tool_choice: dict, expected_choice: Any, expected_parallel: Any
) -> None:
    payload = translate(tools=[WEATHER_TOOL, CLOCK_TOOL], tool_choice=tool_choice)
    assert len(payload["tools"]) == 2
    assert payload["tool_choice"] == expected_choice
    assert payload.get("parallel_tool_calls") == expected_parallel


@pytest.mark.parametrize(
    "tool_choice",
    [{"type": "none"}, {"type": "none", "disable_parallel_tool_use": True}],
    ids=["none", "none_with_parallel_flag"],
)
def test_tool_choice_none_drops_the_tools(tool_choice: dict) -> None:
    payload = translate(tools=[WEATHER_TOOL], tool_choice=tool_choice)
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & payload.keys()


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        ({"type": "tool", "name": "launch_rockets"}, "tool_choice.name: no tool named"),
        ({"type": "tool"}, "tool_choice.name: field required"),
        ({"type": "tool", "name": {"a": 1}}, "tool_choice.name: must be the name of a tool"),
        ({"type": "sometimes"}, "tool_choice.type: must be one of"),
        ("auto", "tool_choice: must be an object"),
    ],
    ids=["unknown_name", "missing_name", "name_not_a_string", "unknown_type", "string"],
)
def test_invalid_tool_choice_is_rejected(tool_choice: Any, expected: str) -> None:
    assert rejection(body(tools=[WEATHER_TOOL], tool_choice=tool_choice)).startswith(expected)


# --- assistant history -----------------------------------------------------------------------


def test_assistant_tool_use_becomes_tool_calls_with_compact_json_arguments() -> None:
    messages = convo(
        user("Weather in Zürich and the time?"),
        assistant(
            [
                text("Checking."),
                tool_use("toolu_01", "get_weather", {"city": "Zürich", "days": [1, 2]}),
                tool_use("toolu_02", "get_time"),
            ]
        ),
        user([tool_result("toolu_01", "Sunny"), tool_result("toolu_02", "12:00")]),
    )
    call = messages[1]
    assert call["role"] == "assistant"
    assert call["content"] == "Checking."
    assert call["tool_calls"] == [
        {
            "id": "toolu_01",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Zürich","days":[1,2]}'},
        },
        {"id": "toolu_02", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    assert json.loads(call["tool_calls"][0]["function"]["arguments"]) == {
        "city": "Zürich",
        "days": [1, 2],
    }


def test_assistant_turn_with_only_tool_use_has_empty_text_content() -> None:
    messages = convo(user("q"), assistant([tool_use("toolu_1")]), user([tool_result("toolu_1")]))
    assert messages[1]["content"] == ""
    assert len(messages[1]["tool_calls"]) == 1


@pytest.mark.parametrize(
    "dropped",
    [
        {"type": "thinking", "thinking": "Let me think", "signature": "gw1.abc"},
        {"type": "redacted_thinking", "data": "EmwKAhgBEgy..."},
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
        {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
    ],
    ids=["thinking", "redacted_thinking", "server_tool_use", "web_search_tool_result"],
)
def test_anthropic_only_assistant_history_blocks_are_dropped(dropped: dict) -> None:
    messages = convo(user("q"), assistant([dropped, text("Answer")]), user("thanks"))
    assert messages[1] == {"role": "assistant", "content": "Answer"}


def test_assistant_turn_with_only_thinking_disappears() -> None:
    thinking = {"type": "thinking", "thinking": "hmm", "signature": "gw1.x"}
    assert convo(user("a"), assistant([thinking]), user("b")) == [
        {"role": "user", "content": "a\n\nb"}
    ]


# --- tool results ----------------------------------------------------------------------------


def test_tool_results_follow_the_assistant_before_the_users_text() -> None:
    messages = convo(
        user("Weather?"),
        assistant([tool_use("toolu_1"), tool_use("toolu_2")]),
        user(
            [text("Here you go."), tool_result("toolu_1", "Sunny"), tool_result("toolu_2", "Rain")]
        ),
    )
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool", "user"]
    assert messages[2:] == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Rain"},
        {"role": "user", "content": "Here you go."},
    ]


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (tool_result("t", "18°C"), "18°C"),
        (tool_result("t", [text("line 1"), text("line 2")]), "line 1\n\nline 2"),
        (tool_result("t", [text(""), text("only")]), "only"),
        (tool_result("t", ""), "(empty)"),
        (tool_result("t", []), "(empty)"),
        ({"type": "tool_result", "tool_use_id": "t"}, "(empty)"),
        (tool_result("t", "city not found", is_error=True), "Error: city not found"),
        (tool_result("t", [text("boom")], is_error=True), "Error: boom"),
        (tool_result("t", "", is_error=True), "Error: the tool reported an error"),
        (tool_result("t", "fine", is_error=False), "fine"),
        (
            tool_result(
                "t",
                [
                    {
                        "type": "document",
                        "title": "notes.txt",
                        "source": {"type": "text", "media_type": "text/plain", "data": "abc"},
                    }
                ],
            ),
            "notes.txt\n\nabc",
        ),
    ],
    ids=[
        "string",
        "text_blocks_joined",
        "empty_block_dropped",
        "empty_string_placeholder",
        "empty_list_placeholder",
        "no_content_placeholder",
        "is_error_prefix",
        "is_error_blocks",
        "is_error_empty",
        "is_error_false",
        "text_document",
    ],
)
def test_tool_result_content_becomes_tool_message_text(result: dict, expected: str) -> None:
    messages = convo(user("q"), assistant([tool_use("t")]), user([result]))
    assert messages[-1] == {"role": "tool", "tool_call_id": "t", "content": expected}


def test_tool_result_image_moves_to_a_user_message_after_the_tool_messages() -> None:
    messages = convo(
        user("Screenshot please"),
        assistant([tool_use("t1", "screenshot"), tool_use("t2", "screenshot")]),
        user(
            [
                tool_result("t1", [text("Captured."), {"type": "image", "source": PNG}]),
                tool_result("t2", [{"type": "image", "source": PNG}]),
            ]
        ),
    )
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    assert messages[2:] == [
        {
            "role": "tool",
            "tool_call_id": "t1",
            "content": "Captured.\n\n(1 image(s) attached below)",
        },
        {"role": "tool", "tool_call_id": "t2", "content": "(1 image(s) attached below)"},
        {"role": "user", "content": [image, image]},
    ]


def test_tool_result_images_and_user_text_of_the_same_turn_form_one_user_message() -> None:
    messages = convo(
        user("Screenshot please"),
        assistant([tool_use("t1", "screenshot")]),
        user([tool_result("t1", [{"type": "image", "source": PNG}]), text("What do you see?")]),
    )
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "user"]
    parts = messages[-1]["content"]
    assert {"type": "text", "text": "What do you see?"} in parts
    assert any(p["type"] == "image_url" for p in parts)


# --- images and documents ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "url"),
    [
        (PNG, "data:image/png;base64,iVBORw0KGgo="),
        (dict(PNG, media_type="image/jpeg"), "data:image/jpeg;base64,iVBORw0KGgo="),
        (dict(PNG, media_type="image/webp"), "data:image/webp;base64,iVBORw0KGgo="),
        (dict(PNG, media_type="image/gif"), "data:image/gif;base64,iVBORw0KGgo="),
        ({"type": "url", "url": "https://example.com/cat.png"}, "https://example.com/cat.png"),
    ],
    ids=["png_base64", "jpeg_base64", "webp_base64", "gif_base64", "url"],
)
def test_images_become_image_url_parts_in_block_order(source: dict, url: str) -> None:
    messages = convo(user([text("Look:"), {"type": "image", "source": source}, text("Well?")]))
    assert messages == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "Well?"},
            ],
        }
    ]


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            {
                "type": "document",
                "title": "Spec",
                "context": "Draft 2",
                "source": {"type": "text", "media_type": "text/plain", "data": "Body text."},
            },
            "Spec\n\nDraft 2\n\nBody text.",
        ),
        (
            {"type": "document", "source": {"type": "text", "data": "Untitled body."}},
            "Untitled body.",
        ),
        (
            {
                "type": "document",
                "title": "Chunks",
                "source": {"type": "content", "content": [text("one"), text("two")]},
            },
            "Chunks\n\none\n\ntwo",
        ),
        (
            {"type": "document", "source": {"type": "content", "content": "plain"}},
            "plain",
        ),
    ],
    ids=["text_source_with_title_and_context", "text_source", "content_blocks", "content_string"],
)
def test_text_documents_are_inlined_as_text(document: dict, expected: str) -> None:
    assert convo(user([document, text("Summarise.")])) == [
        {"role": "user", "content": f"{expected}\n\nSummarise."}
    ]


def test_search_result_block_is_rendered_as_text() -> None:
    result = {
        "type": "search_result",
        "source": "https://example.com/doc",
        "title": "Doc title",
        "content": [text("Relevant passage.")],
    }
    content = convo(user([result, text("Use it.")]))[0]["content"]
    assert isinstance(content, str)
    for piece in ("Doc title", "https://example.com/doc", "Relevant passage.", "Use it."):
        assert piece in content


# --- structured output -----------------------------------------------------------------------


def test_output_config_json_schema_becomes_response_format() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    payload = translate(
        output_config={"effort": "low", "format": {"type": "json_schema", "schema": schema}}
    )
    assert payload["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ({"type": "json_object"}, "output_config.format.type: must be 'json_schema'"),
        ("json", "output_config.format.type: must be 'json_schema'"),
        ({"type": "json_schema"}, "output_config.format.schema: must be a JSON Schema object"),
    ],
    ids=["json_object", "string", "no_schema"],
)
def test_invalid_output_format_is_rejected(fmt: Any, expected: str) -> None:
    assert rejection(body(output_config={"format": fmt})) == expected


# --- tool_use / tool_result pairing ------------------------------------------------------------


def test_tool_results_are_put_in_the_order_of_the_calls() -> None:
    messages = convo(
        user("?"),
        assistant([tool_use("a"), tool_use("b")]),
        user([tool_result("b", "second"), tool_result("a", "first")]),
    )
    assert [(m["role"], m.get("tool_call_id")) for m in messages] == [
        ("user", None),
        ("assistant", None),
        ("tool", "a"),
        ("tool", "b"),
    ]
    assert [m["content"] for m in messages[2:]] == ["first", "second"]


def test_a_call_without_result_gets_a_placeholder_result() -> None:
    messages = convo(
        user("?"),
        assistant([tool_use("a"), tool_use("b")]),
        user([tool_result("a", "done"), text("go on")]),
    )
    assert messages[2:] == [
        {"role": "tool", "tool_call_id": "a", "content": "done"},
        {"role": "tool", "tool_call_id": "b", "content": "(no result)"},
        {"role": "user", "content": "go on"},
    ]


@pytest.mark.parametrize(
    "messages",
    [
        [user([tool_result("ghost")])],
        [user("?"), assistant("no tools"), user([tool_result("ghost")])],
        [user("?"), assistant([tool_use("a")]), user([tool_result("a"), tool_result("a")])],
        [
            user("?"),
            assistant([tool_use("a")]),
            user([tool_result("a")]),
            assistant("thanks"),
            user([tool_result("a")]),
        ],
    ],
    ids=["no_assistant", "assistant_without_calls", "duplicate", "answering_an_older_turn"],
)
def test_tool_result_without_matching_tool_use_is_refused(messages: list[dict]) -> None:
    message = rejection(body(messages=messages))
    assert "tool_use_id" in message and "does not answer" in message


def _nested(levels: int) -> dict:
    """An input_schema ``levels`` deep (the schema itself is level 1)."""
    schema: dict = {}
    inner = schema
    for _ in range(levels - 1):
        inner["items"] = {}
        inner = inner["items"]
    return schema


def test_nesting_up_to_the_limit_is_accepted_and_beyond_it_named() -> None:
    from app.translate.request import MAX_NESTING, check_request

    ok = body(tools=[{"name": "t", "input_schema": _nested(MAX_NESTING - 3)}])
    check_request(ok)  # body -> tools -> tool -> schema: three levels above the schema
    deep = body(tools=[{"name": "t", "input_schema": _nested(MAX_NESTING - 2)}])
    assert rejection(deep).startswith("tools.0.input_schema.items.items")
    assert rejection(deep).endswith(f"nests deeper than {MAX_NESTING} levels")
