"""What every backend's answer becomes through the gateway, as Anthropic's API would give it:
stop sequences matched by the gateway, a repeated prefill removed, one tool call when parallel
calls are disabled, the prompt's size in ``message_start``. The official SDK against the fake
backend; tests/system/test_llama_cpp.py checks the same against a real llama.cpp server."""

from __future__ import annotations

import anthropic
from fakebackend import JSONReply, StreamReply, chunk, chunks, completion

USER_HI = [{"role": "user", "content": "hi"}]
TOOL = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def call_chunks(calls: list[tuple[str, str]]) -> list[dict]:
    """Streamed tool calls, each in two argument fragments, then finish_reason tool_calls."""
    out = [chunk({"role": "assistant", "content": ""})]
    for i, (call_id, city) in enumerate(calls):
        head = {"index": i, "id": call_id, "type": "function"}
        out.append(
            chunk(
                {
                    "tool_calls": [
                        {**head, "function": {"name": "get_weather", "arguments": '{"city": '}}
                    ]
                }
            )
        )
        out.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": f'"{city}"}}'}}]}))
    out.append(chunk({}, "tool_calls"))
    return out


def test_a_json_request_with_stop_sequences_is_cut_there_and_the_backend_stopped(
    client: anthropic.Anthropic, backend
) -> None:
    pieces = ["The answer", " is 42.", "\n\nHuman:", " and then", " much more"]
    backend.reply(StreamReply(chunks(pieces), delay=0.05))
    message = client.messages.create(
        model="m",
        max_tokens=64,
        messages=USER_HI,
        stop_sequences=["<1>", "<2>", "<3>", "<4>", "\n\nHuman:"],
    )
    assert [b.text for b in message.content] == ["The answer is 42."]
    assert message.stop_reason == "stop_sequence"
    sent = backend.requests[-1].json
    assert sent["stream"] is True and "stop" not in sent
    assert backend.wait_closed(1, timeout=30)  # the gateway hung up on the rest of the answer


def test_the_earliest_of_more_than_four_stop_sequences_wins(client, backend) -> None:
    backend.reply(StreamReply(chunks(["one two ", "three four five six"])))
    stops = ["six", "five", "four", "three", "two"]
    message = client.messages.create(
        model="m", max_tokens=64, messages=USER_HI, stop_sequences=stops
    )
    assert message.content[0].text == "one "
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "two")


def test_a_streamed_stop_sequence_ends_the_stream_with_its_name(client, backend) -> None:
    backend.reply(StreamReply(chunks(["Count: 1, 2,", " 3", ", STOP", " 4, 5"]), delay=0.02))
    with client.messages.stream(
        model="m", max_tokens=64, messages=USER_HI, stop_sequences=["STOP"]
    ) as stream:
        texts = [e.delta.text for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert "".join(texts) == "Count: 1, 2, 3, "
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "STOP")
    assert backend.wait_closed(1, timeout=30)


def test_a_stop_sequence_that_never_comes_gives_end_turn(client, backend) -> None:
    backend.reply(StreamReply(chunks(["no stop ", "here ST"])))
    message = client.messages.create(
        model="m", max_tokens=64, messages=USER_HI, stop_sequences=["STOP"]
    )
    assert message.content[0].text == "no stop here ST"
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)


def test_a_backend_that_answers_the_stream_request_with_json_is_cut_too(client, backend) -> None:
    backend.reply(JSONReply(completion("alpha END beta")))
    message = client.messages.create(
        model="m", max_tokens=64, messages=USER_HI, stop_sequences=["END"]
    )
    assert message.content[0].text == "alpha "
    assert message.stop_sequence == "END"


PREFILL = [
    {"role": "user", "content": "List three colours."},
    {"role": "assistant", "content": "1. Red\n2."},
]


def test_a_repeated_prefill_is_removed_from_a_json_answer(client, backend) -> None:
    backend.reply(JSONReply(completion("1. Red\n2. Blue\n3. Green")))
    message = client.messages.create(model="m", max_tokens=64, messages=PREFILL)
    assert message.content[0].text == " Blue\n3. Green"


def test_a_repeated_prefill_is_removed_from_a_stream(client, backend) -> None:
    backend.reply(StreamReply(chunks(["1", ". Red", "\n2. Blue", "\n3. Green"])))
    with client.messages.stream(model="m", max_tokens=64, messages=PREFILL) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == " Blue\n3. Green"


def test_an_answer_that_only_continues_the_prefill_is_kept(client, backend) -> None:
    backend.reply(JSONReply(completion(" Blue\n3. Green")))
    message = client.messages.create(model="m", max_tokens=64, messages=PREFILL)
    assert message.content[0].text == " Blue\n3. Green"


def test_disable_parallel_tool_use_keeps_one_call_in_json_and_streams(client, backend) -> None:
    choice = {"type": "auto", "disable_parallel_tool_use": True}
    two = [("call_1", "Oslo"), ("call_2", "Rome")]
    backend.reply(StreamReply(call_chunks(two)))
    with client.messages.stream(
        model="m", max_tokens=64, messages=USER_HI, tools=[TOOL], tool_choice=choice
    ) as stream:
        deltas = [e.delta.partial_json for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert [(b.id, b.input) for b in final.content] == [("call_1", {"city": "Oslo"})]
    assert deltas == ['{"city": ', '"Oslo"}']  # relayed as the fragments came
    assert final.stop_reason == "tool_use"
    message_calls = [
        {
            "id": i,
            "type": "function",
            "function": {"name": "get_weather", "arguments": f'{{"city": "{c}"}}'},
        }
        for i, c in two
    ]
    backend.reply(
        JSONReply(
            completion(
                None, extra_message={"tool_calls": message_calls}, finish_reason="tool_calls"
            )
        )
    )
    message = client.messages.create(
        model="m", max_tokens=64, messages=USER_HI, tools=[TOOL], tool_choice=choice
    )
    assert [b.id for b in message.content] == ["call_1"]
    assert backend.requests[-1].json["parallel_tool_calls"] is False


def test_message_start_carries_the_backends_exact_prompt_count(make_gateway, backend) -> None:
    backend.routes[("POST", "/tokenize")] = lambda req: JSONReply({"count": 321, "tokens": []})
    backend.reply(StreamReply(chunks(["hi"], usage=None)))
    with make_gateway({"dialect": "vllm"}).client() as client:
        with client.messages.stream(model="m", max_tokens=8, messages=USER_HI) as stream:
            start = next(e for e in stream if e.type == "message_start")
            final = stream.get_final_message()
    assert start.message.usage.input_tokens == 321
    assert final.usage.input_tokens == 321
    assert backend.tokenizer_requests[-1].json["messages"] == [{"role": "user", "content": "hi"}]


def test_message_start_has_an_estimate_without_a_tokenizer(make_gateway, backend) -> None:
    backend.reply(StreamReply(chunks(["hi"])))
    text = "a fairly long question " * 20
    with make_gateway({"dialect": "generic"}).client() as client:
        with client.messages.stream(
            model="m", max_tokens=8, messages=[{"role": "user", "content": text}]
        ) as stream:
            start = next(e for e in stream if e.type == "message_start")
    assert start.message.usage.input_tokens > 50
    assert backend.tokenizer_requests == []


def billing_system(cch: str, version_hash: str) -> list[dict]:
    line = (
        "x-anthropic-billing-header: "
        f"cc_version=2.1.197.{version_hash}; cc_entrypoint=cli; cch={cch};"
    )
    return [
        {"type": "text", "text": line},
        {"type": "text", "text": "You are Claude Code, a coding agent."},
    ]


def test_claude_codes_attribution_line_reaches_the_backend_the_same_every_time(
    client, backend
) -> None:
    """The line's hashes change per request and conversation: normalised, the backend's cached
    prompt prefix stays usable."""
    for cch, version_hash in (("7f3a9", "3a3"), ("0b1c2", "e91")):
        backend.reply(JSONReply(completion("ok")))
        client.messages.create(
            model="m", max_tokens=8, system=billing_system(cch, version_hash), messages=USER_HI
        )
    first, second = (r.json["messages"][0]["content"] for r in backend.requests[-2:])
    assert first == second
    assert "7f3a9" not in first and "You are Claude Code" in first


def test_the_attribution_line_is_sent_as_it_came_when_asked(make_gateway, backend) -> None:
    backend.reply(JSONReply(completion("ok")))
    with make_gateway(translate={"billing_header": "keep"}).client() as client:
        client.messages.create(
            model="m", max_tokens=8, system=billing_system("7f3a9", "3a3"), messages=USER_HI
        )
    assert "cch=7f3a9;" in backend.requests[-1].json["messages"][0]["content"]


def test_a_llamacpp_length_stop_short_of_max_tokens_is_the_context_window(
    make_gateway, backend
) -> None:
    """llama.cpp stops with "length" both at max_tokens and when its context is full; its
    timings say how many tokens it predicted, against the cap it was sent."""
    usage = {"prompt_tokens": 500, "completion_tokens": 12, "total_tokens": 512}
    backend.reply(
        StreamReply(chunks(["a"] * 3, finish_reason="length", dialect="llamacpp", usage=usage))
    )
    with make_gateway({"dialect": "llamacpp"}).client() as client:
        with client.messages.stream(model="m", max_tokens=64, messages=USER_HI) as stream:
            final = stream.get_final_message()
    assert final.stop_reason == "model_context_window_exceeded"
    backend.reply(
        StreamReply(
            chunks(
                ["a"] * 3,
                finish_reason="length",
                dialect="llamacpp",
                usage={**usage, "completion_tokens": 64},
            )
        )
    )
    with make_gateway({"dialect": "llamacpp"}).client() as client:
        with client.messages.stream(model="m", max_tokens=64, messages=USER_HI) as stream:
            final = stream.get_final_message()
    assert final.stop_reason == "max_tokens"


def test_a_json_request_with_stop_sequences_keeps_broken_tool_arguments_as_raw(
    client, backend
) -> None:
    """Read as a stream and added up, the answer is what a JSON answer would be: arguments
    cut short by max_tokens are wrapped, not a 500."""
    head = {"index": 0, "id": "call_1", "type": "function"}
    cut = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"tool_calls": [{**head, "function": {"name": "get_weather", "arguments": '{"ci'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Par'}}]}),
        chunk({}, "length"),
    ]
    backend.reply(StreamReply(cut))
    message = client.messages.create(
        model="m", max_tokens=8, messages=USER_HI, tools=[TOOL], stop_sequences=["STOP"]
    )
    assert [(b.type, b.input) for b in message.content] == [
        ("tool_use", {"_raw_arguments": '{"city": "Par'})
    ]
    assert message.stop_reason == "max_tokens"


def test_stop_sequences_of_the_wrong_type_are_a_400_naming_the_field(client, backend) -> None:
    for value in (5, True, "STOP", {"a": 1}):
        try:
            client.messages.create(
                model="m", max_tokens=8, messages=USER_HI, extra_body={"stop_sequences": value}
            )
        except anthropic.BadRequestError as exc:
            assert exc.body["error"]["message"].startswith("stop_sequences"), exc.body
        else:
            raise AssertionError(f"stop_sequences={value!r} was accepted")
    assert backend.requests == []
