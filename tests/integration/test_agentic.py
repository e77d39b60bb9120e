"""Tools, images, thinking, count_tokens and models through the SDK, against the fake backend."""

from __future__ import annotations

import base64

import anthropic
import pytest
import requests
from fakebackend import JSONReply, StreamReply, chunk, chunks, completion, tool_call_chunks

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "input_schema": {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {"city": {"type": "string", "format": "hostname"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
TIME_TOOL = {
    "name": "get_time",
    "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}},
}
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\nfake").decode()


def image(media_type: str = "image/png") -> dict:
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": PNG}}


def test_tool_use_loop_non_streaming(client, backend):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    backend.reply(
        JSONReply(
            completion(
                "Let me check.", finish_reason="tool_calls", extra_message={"tool_calls": [call]}
            )
        ),
        JSONReply(completion("It is 3°C in Oslo.")),
    )
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    first = client.messages.create(
        model="m", max_tokens=100, messages=messages, tools=[WEATHER_TOOL]
    )
    assert first.stop_reason == "tool_use"
    assert [b.type for b in first.content] == ["text", "tool_use"]
    tool_use = first.content[1]
    assert tool_use.id == "call_1" and tool_use.input == {"city": "Oslo"}

    messages += [
        {"role": "assistant", "content": first.content},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": tool_use.id, "content": "3°C, cloudy"},
                {"type": "text", "text": "Answer in one line."},
            ],
        },
    ]
    second = client.messages.create(
        model="m", max_tokens=100, messages=messages, tools=[WEATHER_TOOL]
    )
    assert second.content[0].text == "It is 3°C in Oslo."

    sent = backend.requests[-1].json
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool", "user"]
    assert sent["messages"][1]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city":"Oslo"}',
    }
    assert sent["messages"][2] == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": "3°C, cloudy",
    }
    function = sent["tools"][0]["function"]
    assert "$schema" not in function["parameters"]
    assert function["parameters"]["properties"]["city"]["format"] == "hostname"


def test_parallel_tool_calls_stream_and_accumulate(client, backend):
    calls = [
        ("call_a", "get_weather", ['{"ci', 'ty": "Os', 'lo"}']),
        ("call_b", "get_time", ['{"tz":', ' "Europe/Oslo"}']),
    ]
    backend.reply(StreamReply(tool_call_chunks(calls, text="Checking both.")))
    with client.messages.stream(
        model="m",
        max_tokens=100,
        messages=[{"role": "user", "content": "?"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
    ) as stream:
        message = stream.get_final_message()
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    assert message.content[0].text == "Checking both."
    assert message.content[1].input == {"city": "Oslo"} and message.content[1].id == "call_a"
    assert (
        message.content[2].input == {"tz": "Europe/Oslo"} and message.content[2].name == "get_time"
    )


def test_interleaved_tool_fragments_without_ids(client, backend):
    events = [
        chunk(
            {
                "tool_calls": [
                    {"index": 0, "function": {"name": "get_weather", "arguments": '{"city"'}}
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 1, "function": {"name": "get_time", "arguments": "{}"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ': "Rome"}'}}]}),
        chunk({}, "tool_calls"),
    ]
    backend.reply(StreamReply(events))
    with client.messages.stream(
        model="m",
        max_tokens=50,
        messages=[{"role": "user", "content": "?"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
    ) as stream:
        message = stream.get_final_message()
    assert [(b.name, b.input) for b in message.content] == [
        ("get_weather", {"city": "Rome"}),
        ("get_time", {}),
    ]
    assert all(b.id.startswith("toolu_") for b in message.content)


def test_tool_choice_and_parallel_switch_are_translated(client, backend):
    client.messages.create(
        model="m",
        max_tokens=10,
        messages=[{"role": "user", "content": "?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    )
    sent = backend.requests[-1].json
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["parallel_tool_calls"] is False


def test_server_tool_is_refused_clearly(client, backend):
    with pytest.raises(anthropic.BadRequestError, match="tools.0.type"):
        client.messages.create(
            model="m",
            max_tokens=10,
            messages=[{"role": "user", "content": "?"}],
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
    assert backend.requests == []


def test_mcp_servers_are_refused_clearly(client, backend):
    with pytest.raises(anthropic.BadRequestError, match="mcp_servers"):
        client.messages.create(
            model="m",
            max_tokens=10,
            messages=[{"role": "user", "content": "?"}],
            extra_body={
                "mcp_servers": [{"type": "url", "url": "https://mcp.example", "name": "x"}]
            },
        )


def test_server_tool_and_pdf_dropped_when_configured(make_gateway, backend):
    gateway = make_gateway({"quirks": {"drop_unsupported": True}})
    pdf = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="},
    }
    with gateway.client() as client:
        response = client.messages.with_raw_response.create(
            model="m",
            max_tokens=10,
            messages=[{"role": "user", "content": [pdf, {"type": "text", "text": "summarise"}]}],
            tools=[{"type": "web_search_20250305", "name": "web_search"}, WEATHER_TOOL],
            extra_body={
                "mcp_servers": [{"type": "url", "url": "https://mcp.example", "name": "x"}]
            },
        )
    dropped = response.headers["x-gateway-dropped"]
    assert "tools.0" in dropped and "messages.0.content.0" in dropped and "mcp_servers" in dropped
    sent = backend.requests[-1].json
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_weather"]
    assert sent["messages"] == [{"role": "user", "content": "summarise"}]


def test_images_become_image_url_parts(client, backend):
    client.messages.create(
        model="m",
        max_tokens=10,
        messages=[
            {
                "role": "user",
                "content": [
                    image(),
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://example.com/cat.jpg"},
                    },
                    {"type": "text", "text": "Describe."},
                ],
            }
        ],
    )
    parts = backend.requests[-1].json["messages"][0]["content"]
    assert parts == [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
        {"type": "text", "text": "Describe."},
    ]


def test_image_with_unsupported_media_type_is_refused(client, backend):
    with pytest.raises(anthropic.BadRequestError, match="media_type"):
        client.messages.create(
            model="m",
            max_tokens=10,
            messages=[
                {
                    "role": "user",
                    "content": [image("image/bmp")],
                }
            ],
        )


def test_image_in_tool_result_moves_to_a_user_message(client, backend):
    messages = [
        {"role": "user", "content": "Screenshot please."},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "shot", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "t1",
                    "content": [
                        {"type": "text", "text": "captured"},
                        image(),
                    ],
                }
            ],
        },
    ]
    client.messages.create(model="m", max_tokens=10, messages=messages)
    sent = backend.requests[-1].json["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "user"]
    assert sent[2]["content"].startswith("captured")
    assert sent[3]["content"][0]["type"] == "image_url"


def test_reasoning_stream_becomes_thinking_block(client, backend):
    events = [
        chunk({"role": "assistant", "reasoning_content": ""}),
        chunk({"reasoning_content": "Two plus two "}),
        chunk({"reasoning_content": "is four."}),
        chunk({"content": "4"}),
        chunk({}, "stop"),
    ]
    backend.reply(StreamReply(events))
    with client.messages.stream(
        model="m", max_tokens=100, messages=[{"role": "user", "content": "2+2?"}]
    ) as stream:
        message = stream.get_final_message()
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Two plus two is four."
    assert message.content[0].signature.startswith("gw1.")
    assert message.content[1].text == "4"


def test_thinking_request_switches_vllm_template(make_gateway, backend):
    with make_gateway({"dialect": "vllm"}).client() as client:
        client.messages.create(
            model="m",
            max_tokens=2048,
            thinking={"type": "enabled", "budget_tokens": 1024},
            messages=[{"role": "user", "content": "?"}],
        )
        client.messages.create(
            model="m",
            max_tokens=10,
            thinking={"type": "disabled"},
            messages=[{"role": "user", "content": "?"}],
        )
    assert backend.requests[-2].json["chat_template_kwargs"] == {"enable_thinking": True}
    assert backend.requests[-1].json["chat_template_kwargs"] == {"enable_thinking": False}


def test_deepseek_gets_thinking_history_back(make_gateway, backend):
    with make_gateway({"dialect": "deepseek"}).client() as client:
        client.messages.create(
            model="m",
            max_tokens=10,
            messages=[
                {"role": "user", "content": "?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "plan", "signature": "gw1.x"},
                        {"type": "tool_use", "id": "c1", "name": "f", "input": {}},
                    ],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "ok"}],
                },
            ],
        )
    assistant = backend.requests[-1].json["messages"][1]
    assert assistant["reasoning_content"] == "plan"


def test_max_tokens_is_clamped_and_reported(make_gateway, backend):
    with make_gateway({"quirks": {"max_tokens_cap": 4096}}).client() as client:
        response = client.messages.with_raw_response.create(
            model="m", max_tokens=8192, messages=[{"role": "user", "content": "?"}]
        )
    assert backend.requests[-1].json["max_tokens"] == 4096
    assert response.headers["x-gateway-max-tokens"] == "4096; clamped-from=8192"


def test_count_tokens_uses_vllm_tokenizer(make_gateway, backend):
    backend.routes[("POST", "/tokenize")] = lambda req: JSONReply(
        {"count": 123, "max_model_len": 8192, "tokens": []}
    )
    with make_gateway({"dialect": "vllm"}).client() as client:
        response = client.messages.with_raw_response.count_tokens(
            model="m", messages=[{"role": "user", "content": "hello"}], tools=[WEATHER_TOOL]
        )
    assert response.parse().input_tokens == 123
    assert response.headers["x-gateway-token-count"] == "exact"
    sent = backend.tokenizer_requests[-1].json
    assert sent["messages"] == [{"role": "user", "content": "hello"}]
    assert sent["tools"][0]["function"]["name"] == "get_weather"


def test_vllm_tokenizer_renders_a_prefill_as_the_request_does(make_gateway, backend):
    """A prefill is continued, so /tokenize must not close it and open a new assistant turn."""
    backend.routes[("POST", "/tokenize")] = lambda req: JSONReply({"count": 9, "tokens": []})
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    with make_gateway({"dialect": "vllm"}).client() as client:
        client.messages.count_tokens(model="m", messages=messages, thinking={"type": "disabled"})
    sent = backend.tokenizer_requests[-1].json
    assert sent["continue_final_message"] is True and sent["add_generation_prompt"] is False
    assert sent["chat_template_kwargs"] == {"enable_thinking": False}


VLLM_FLOOR = (
    "This model's maximum context length is 2048 tokens. However, your prompt contains at least "
    "2049 input tokens, which exceeds this limit even without any output tokens."
)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_overflow_vllm_sizes_only_as_a_floor_is_sized_by_its_tokenizer(
    make_gateway, backend, stream
):
    """vLLM's "at least 2049" of any prompt over 2048: the gateway asks /tokenize, on the
    error, for the size Claude Code should compact by."""
    backend.routes[("POST", "/tokenize")] = lambda req: JSONReply({"count": 2531, "tokens": []})
    backend.reply(JSONReply({"error": {"message": VLLM_FLOOR, "code": 400}}, status=400))
    messages = [{"role": "user", "content": "word " * 2500}]
    with make_gateway({"dialect": "vllm"}).client() as client:
        with pytest.raises(anthropic.BadRequestError) as caught:
            if stream:
                with client.messages.stream(model="m", max_tokens=9, messages=messages) as events:
                    events.get_final_message()
            else:
                client.messages.create(model="m", max_tokens=9, messages=messages)
    message = caught.value.body["error"]["message"]
    assert message.startswith("prompt is too long: 2531 tokens > 2048 maximum (backend: ")
    assert backend.tokenizer_requests[-1].json["messages"] == messages


def test_count_tokens_uses_llamacpp_template_then_tokenizer(make_gateway, backend):
    backend.routes[("POST", "/apply-template")] = lambda req: JSONReply({"prompt": "<|user|>hello"})
    backend.routes[("POST", "/tokenize")] = lambda req: JSONReply({"tokens": [1, 2, 3, 4]})
    with make_gateway({"dialect": "llamacpp"}).client() as client:
        count = client.messages.count_tokens(
            model="m", messages=[{"role": "user", "content": "hello"}]
        )
    assert count.input_tokens == 4
    assert backend.tokenizer_requests[-1].json == {"content": "<|user|>hello"}


def test_count_tokens_falls_back_to_an_estimate(client, backend):
    long_text = "word " * 400
    response = client.messages.with_raw_response.count_tokens(
        model="m", system="Be brief.", messages=[{"role": "user", "content": long_text}]
    )
    assert response.headers["x-gateway-token-count"] == "estimate"
    assert 400 <= response.parse().input_tokens <= 700
    assert backend.requests == []


def test_models_list_and_get(make_gateway):
    gateway = make_gateway({"model": "qwen3-32b"}, models={"claude-haiku-4-5": "qwen3-8b"})
    with gateway.client() as client:
        page = client.models.list()
        ids = [m.id for m in page]
        assert ids == ["claude-haiku-4-5", "qwen3-32b"]
        model = client.models.retrieve("claude-haiku-4-5")
        assert model.display_name == "claude-haiku-4-5 (qwen3-8b)"
        # The default route serves any name with its model, so retrieving one answers too.
        assert client.models.retrieve("gpt-unknown").display_name == "gpt-unknown (qwen3-32b)"
    raw = requests.get(gateway.url + "/v1/models?limit=1", timeout=10).json()
    assert raw["has_more"] is True and raw["first_id"] == raw["last_id"] == "claude-haiku-4-5"


def test_inline_think_tags_become_a_thinking_block_when_configured(make_gateway, backend):
    pieces = ["<thi", "nk>Let me ", "add.</th", "ink>\n\n", "4"]
    backend.reply(StreamReply(chunks(pieces)), JSONReply(completion("<think>add</think>4")))
    with make_gateway({"quirks": {"think_tags": True}}).client() as client:
        with client.messages.stream(
            model="m", max_tokens=100, messages=[{"role": "user", "content": "2+2?"}]
        ) as stream:
            streamed = stream.get_final_message()
        whole = client.messages.create(
            model="m", max_tokens=100, messages=[{"role": "user", "content": "2+2?"}]
        )
    for message, thinking in ((streamed, "Let me add."), (whole, "add")):
        assert [b.type for b in message.content] == ["thinking", "text"]
        assert message.content[0].thinking == thinking
        assert message.content[1].text == "4"


def test_backend_answering_a_stream_with_json_still_gives_a_proper_stream(client, backend):
    call = {
        "id": "call_j",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Bergen"}'},
    }
    extra = {"tool_calls": [call], "reasoning_content": "Look it up."}
    backend.reply(JSONReply(completion("On it.", finish_reason="tool_calls", extra_message=extra)))
    with client.messages.stream(
        model="m", max_tokens=100, messages=[{"role": "user", "content": "?"}], tools=[WEATHER_TOOL]
    ) as stream:
        events = [event.type for event in stream]
        message = stream.get_final_message()
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    assert message.content[2].input == {"city": "Bergen"}
    assert message.stop_reason == "tool_use" and message.usage.output_tokens == 5
    assert events[0] == "message_start" and events[-1] == "message_stop"
