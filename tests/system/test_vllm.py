"""The vLLM tier: the official SDK through real gunicorn to a real vLLM.

vLLM (the CPU build) serves SmolLM2-135M-Instruct at temperature 0, so answers are
deterministic; a request takes a second or two on 2 cores, so answers are kept short. Every
test asserts what Anthropic's API would return for the request; where that depends on the
model's words, the expectation is taken from vLLM itself, asked directly with the same prompt.

One vLLM for the module, behind two gateways: the ``vllm`` dialect (chat completions) and the
passthrough to vLLM's own ``/v1/messages`` (``protocol = "anthropic"``). Skipped, with the
command that installs vLLM, when scripts/vllm-server has not been run; CI installs it
(.ci/run) and fails here without it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
import requests
from servers import Gunicorn, free_port
from tier import (
    MODEL,
    T0,
    ask,
    assert_same_answer_but_for_id_and_cache,
    batch_beside_direct,
    check_grammar,
    own_answer,
    sdk,
    shape,
    stream_events,
    text_of,
)
from vllm import ADMIN_TOKEN, BUILD_HINT, SERVED, VllmServer, start_gateway, vllm_command

pytestmark = pytest.mark.vllm

COLORS = [{"role": "user", "content": "Name three colors."}]
SYSTEM = "You are a terse assistant. Answer in one line."
PREFILL = "1. Red\n2."
CLAUDE_CODE_OVERFLOW = re.compile(r"prompt is too long: (\d+) tokens > (\d+) maximum")


# --- servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="module")
def vllm(logs: Path) -> Iterator[VllmServer]:
    port = free_port()
    command = vllm_command(port)
    if command is None:
        if os.environ.get("CI"):
            pytest.fail(f"{BUILD_HINT}; .ci/run installs it before the tests")
        pytest.skip(BUILD_HINT)
    server = VllmServer(command, port, logs / "vllm.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(vllm: VllmServer, logs: Path) -> Iterator[Gunicorn]:
    server = start_gateway(vllm, logs, "gateway")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def messages_gateway(vllm: VllmServer, logs: Path) -> Iterator[Gunicorn]:
    """vLLM's own Anthropic endpoint (/v1/messages) through the passthrough."""
    server = start_gateway(vllm, logs, "messages-gateway", protocol="anthropic")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(gateway: Gunicorn) -> Iterator[anthropic.Anthropic]:
    yield from sdk(gateway)


@pytest.fixture(scope="module")
def native(messages_gateway: Gunicorn) -> Iterator[anthropic.Anthropic]:
    yield from sdk(messages_gateway)


# --- helpers ---------------------------------------------------------------------------------


def prompt_of(message: Any) -> int:
    return message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)


# --- text and streams ------------------------------------------------------------------------


def test_text_answer_is_a_message_with_vllms_text_and_usage(client, vllm):
    own = own_answer(vllm, COLORS, 20)
    message = ask(client, False, max_tokens=20, messages=COLORS)
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.id.startswith("msg_")
    assert text_of(message) == own["message"]["content"]
    assert message.usage.output_tokens == own["usage"]["completion_tokens"]
    assert prompt_of(message) == own["usage"]["prompt_tokens"] == vllm.prompt_tokens(COLORS)
    expected = "end_turn" if own["finish_reason"] == "stop" else "max_tokens"
    assert message.stop_reason == expected and message.stop_sequence is None


def test_streamed_text_follows_the_event_grammar_and_equals_the_json_message(client):
    message = ask(client, False, max_tokens=20, messages=COLORS)
    events, streamed = stream_events(client, max_tokens=20, messages=COLORS)
    check_grammar(events)
    assert shape(streamed) == shape(message)
    deltas = [e.delta.text for e in events if e.type == "content_block_delta"]
    assert len(deltas) > 1  # relayed token by token, not as one piece at the end
    assert "".join(deltas) == text_of(message)


# --- token counts ----------------------------------------------------------------------------


def test_count_tokens_is_vllms_own_count_of_the_prompt(client, vllm):
    counted = client.messages.with_raw_response.count_tokens(
        model=MODEL, system=SYSTEM, messages=COLORS
    )
    expected = vllm.prompt_tokens([{"role": "system", "content": SYSTEM}, *COLORS])
    assert counted.parse().input_tokens == expected
    assert counted.headers["x-gateway-token-count"] == "exact"
    assert prompt_of(ask(client, False, max_tokens=3, system=SYSTEM, messages=COLORS)) == expected


def test_stream_message_start_reports_the_exact_prompt_size(client, vllm):
    expected = vllm.prompt_tokens([{"role": "system", "content": SYSTEM}, *COLORS])
    events, message = stream_events(client, max_tokens=3, system=SYSTEM, messages=COLORS)
    assert events[0].message.usage.input_tokens == expected  # before the first token, not 0
    assert prompt_of(message) == expected


def test_message_start_counts_a_prefilled_prompt_as_vllm_renders_it(client, vllm):
    """A prefill is continued (``continue_final_message``), not closed and followed by a new
    assistant turn: the count asked of /tokenize must render it the same way."""
    prefilled = [*COLORS, {"role": "assistant", "content": PREFILL}]
    expected = vllm.prompt_tokens(
        prefilled, continue_final_message=True, add_generation_prompt=False
    )
    assert expected < vllm.prompt_tokens(prefilled)  # the closed turn is a few tokens more
    events, message = stream_events(client, max_tokens=3, messages=prefilled)
    assert events[0].message.usage.input_tokens == expected == prompt_of(message)


CACHED = [{"role": "user", "content": "Summarise: " + "the cat sat on the mat. " * 60}]


@pytest.mark.parametrize("side", ["client", "native"])
def test_a_repeated_prompt_reports_vllms_prefix_cache_as_cache_read_input_tokens(
    side, request, vllm
):
    """vLLM reuses the KV blocks of an earlier prompt and, with --enable-prompt-tokens-details,
    says how many tokens came from them: Anthropic's cache_read_input_tokens, through chat
    completions and through vLLM's own /v1/messages alike."""
    sdk = request.getfixturevalue(side)
    size = vllm.prompt_tokens(CACHED)
    ask(sdk, False, max_tokens=2, messages=CACHED)
    usage = ask(sdk, False, max_tokens=2, messages=CACHED).usage
    assert usage.cache_read_input_tokens and usage.cache_read_input_tokens > size // 2, usage
    assert usage.input_tokens + usage.cache_read_input_tokens == size


# --- stop sequences, max_tokens, prefill -----------------------------------------------------


def _full_colors(vllm: VllmServer) -> str:
    return own_answer(vllm, COLORS, 20)["message"]["content"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_stop_sequence_ends_the_text_before_it_and_is_named(client, vllm, stream):
    full = _full_colors(vllm)
    assert "Blue" in full, full
    message = ask(client, stream, max_tokens=20, messages=COLORS, stop_sequences=["Blue"])
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "Blue")
    assert text_of(message) == full[: full.index("Blue")]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_max_tokens_cuts_the_answer_with_stop_reason_max_tokens(client, vllm, stream):
    own = own_answer(vllm, COLORS, 3)
    assert own["finish_reason"] == "length"
    message = ask(client, stream, max_tokens=3, messages=COLORS)
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert message.usage.output_tokens == 3
    assert text_of(message) == own["message"]["content"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_prefill_answer_is_the_continuation_only(client, vllm, stream):
    prefilled = [*COLORS, {"role": "assistant", "content": PREFILL}]
    own = vllm.chat(
        {
            "messages": prefilled,
            "max_tokens": 12,
            "continue_final_message": True,
            "add_generation_prompt": False,
        }
    ).json()["choices"][0]["message"]["content"]
    assert own.strip() and not own.startswith("1. Red")
    message = ask(client, stream, max_tokens=12, messages=prefilled)
    assert text_of(message) == own


# --- thinking --------------------------------------------------------------------------------


def test_thinking_switch_reaches_a_template_without_it_harmlessly(client, vllm):
    """The ``vllm`` dialect sends ``chat_template_kwargs.enable_thinking``; SmolLM2's template
    has no such switch, so the answer is the plain one, with no thinking block."""
    plain = ask(client, False, max_tokens=8, messages=COLORS)
    for thinking in ({"type": "enabled", "budget_tokens": 1024}, {"type": "disabled"}):
        message = ask(client, False, max_tokens=8, messages=COLORS, thinking=thinking)
        assert shape(message) == shape(plain)


# --- tools (the Hermes template and parser) --------------------------------------------------

WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather for a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
TIME = {
    "name": "get_time",
    "description": "Get the current local time in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
TOOLS = [WEATHER, TIME]
OSLO = [{"role": "user", "content": "What is the weather in Oslo?"}]
# SmolLM2 with tool_choice "auto" answers in text: every call here is forced.
CHOICES = {
    "any": {"type": "any"},
    "named": {"type": "tool", "name": "get_weather"},
    "any-single": {"type": "any", "disable_parallel_tool_use": True},
}


def tool_uses(message: Any) -> list[Any]:
    assert all(b.type in ("text", "tool_use") for b in message.content), message.content
    return [b for b in message.content if b.type == "tool_use"]


# Each choice once (a forced call takes several seconds here); the streamed named call is
# test_streamed_tool_input_is_input_json_deltas_that_join_to_the_input.
@pytest.mark.parametrize(
    ("stream", "choice"),
    [(False, "any"), (False, "named"), (True, "any-single")],
    ids=["json-any", "json-named", "stream-any-single"],
)
def test_a_forced_tool_call_becomes_a_tool_use_block_with_an_object_input(client, stream, choice):
    message = ask(
        client, stream, max_tokens=40, tools=TOOLS, tool_choice=CHOICES[choice], messages=OSLO
    )
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    uses = tool_uses(message)
    assert len(uses) >= 1 and uses[0].name == "get_weather", uses
    assert uses[0].input == {"city": "Oslo"}
    # vLLM's own call id (chatcmpl-tool-…), kept as the gateway keeps every backend's usable
    # ids, not one of Anthropic's toolu_… form: a known difference (README).
    assert uses[0].id.startswith("chatcmpl-tool-")
    if choice != "any":
        assert len(uses) == 1, uses


def test_streamed_tool_input_is_input_json_deltas_that_join_to_the_input(client):
    request = {"max_tokens": 40, "tools": TOOLS, "tool_choice": CHOICES["named"], "messages": OSLO}
    events, message = stream_events(client, **request)
    check_grammar(events)
    assert shape(message) == shape(ask(client, False, **request))
    [index] = [i for i, b in enumerate(message.content) if b.type == "tool_use"]
    deltas = [e.delta for e in events if e.type == "content_block_delta" and e.index == index]
    assert (
        deltas
        and json.loads("".join(d.partial_json for d in deltas)) == message.content[index].input
    )


def _string_argument_examples() -> list[dict[str, Any]]:
    """Earlier turns in which the assistant wrote its calls with a bare string as the
    arguments (``"arguments": "Berlin"``): SmolLM2 then writes its next call that way too, and
    vLLM's hermes parser passes it on as ``arguments: "\\"Oslo\\""``, JSON text that is not
    an object (vLLM checks arguments against the schema only with --tool-strict-level)."""
    turns: list[dict[str, Any]] = []
    for city in ("Berlin", "Rome", "Madrid"):
        call = f'<tool_call>\n{{"name": "get_weather", "arguments": "{city}"}}\n</tool_call>'
        turns += [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": call},
            {"role": "user", "content": "12C, sunny"},
            {"role": "assistant", "content": "It is 12C and sunny."},
        ]
    return [*turns, *OSLO]


STRING_ARGUMENTS = _string_argument_examples()


def test_tool_arguments_that_are_not_an_object_reach_the_client_as_an_object(client, vllm):
    """Anthropic's ``input`` is always an object: vLLM's JSON string is handed over wrapped
    as ``_raw_arguments`` (what the gateway does with any arguments it cannot read as an
    object), so the tool can refuse it and the model try again."""
    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "parameters": WEATHER["input_schema"]},
        }
    ]
    own = vllm.chat(
        {"messages": STRING_ARGUMENTS, "max_tokens": 30, "tools": tools, "tool_choice": "required"}
    ).json()["choices"][0]["message"]
    [call] = own["tool_calls"]
    raw = call["function"]["arguments"]
    assert isinstance(json.loads(raw), str), raw  # JSON text, but not of an object
    message = ask(
        client,
        True,  # streamed: the arguments are held to the call's end, then repaired
        max_tokens=30,
        tools=[WEATHER],
        tool_choice={"type": "any"},
        messages=STRING_ARGUMENTS,
    )
    assert message.stop_reason == "tool_use"
    [use] = tool_uses(message)
    assert use.name == "get_weather" and use.input == {"_raw_arguments": raw}


# --- structured output -----------------------------------------------------------------------

CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_output_config_format_makes_vllm_answer_json_of_the_schema(client, stream):
    message = ask(
        client,
        stream,
        max_tokens=30,
        messages=CAPITAL,
        extra_body={
            **T0,
            "output_config": {"format": {"type": "json_schema", "schema": CITY_SCHEMA}},
        },
    )
    answer = json.loads(text_of(message))
    assert set(answer) == {"city"} and isinstance(answer["city"], str), answer
    assert message.stop_reason == "end_turn"


# --- context overflow ------------------------------------------------------------------------

WINDOW = 2048  # --max-model-len
HUGE = [{"role": "user", "content": "word " * 2500}]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_prompt_longer_than_the_context_is_a_400_in_claude_codes_words_with_its_size(
    client, vllm, stream
):
    """vLLM stops tokenizing one token past the window, so it reports "at least 2049" tokens
    whatever the prompt's size; Claude Code, which compacts by about the difference, is told
    the exact size, counted by vLLM's /tokenize when the error comes."""
    size = vllm.prompt_tokens(HUGE)
    assert size > WINDOW + 1
    with pytest.raises(anthropic.BadRequestError) as caught:
        ask(client, stream, max_tokens=10, messages=HUGE)
    body = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    found = CLAUDE_CODE_OVERFLOW.search(body["error"]["message"])
    assert found, body["error"]["message"]
    assert (int(found[1]), int(found[2])) == (size, WINDOW)
    assert "at least 2049 input tokens" in body["error"]["message"]  # vLLM's words, kept


FILLING = [{"role": "user", "content": "word " * 1980}]  # 2011 tokens: 37 left in the window


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_answer_that_fills_the_context_stops_with_model_context_window_exceeded(
    client, vllm, stream
):
    """vLLM 0.32 takes a max_tokens that does not fit beside the prompt and stops when the
    window is full, with the same "length" as at max_tokens: the gateway tells the two apart
    by the usage (fewer tokens than max_tokens), as Anthropic's API says it."""
    size = vllm.prompt_tokens(FILLING)
    assert WINDOW - 100 < size < WINDOW
    message = ask(client, stream, max_tokens=100, messages=FILLING)
    assert message.stop_reason == "model_context_window_exceeded"
    assert message.usage.output_tokens + size == WINDOW


# --- a client that hangs up ------------------------------------------------------------------

LONG = [{"role": "user", "content": "Write a very long story about a dragon."}]


def hang_up_mid_stream(server: Gunicorn, vllm: VllmServer) -> None:
    """Start a long story, read a few deltas, hang up; vLLM must stop generating it. The story
    runs to max_tokens (600) if nobody stops it. Counted in tokens, not seconds, so that a slow
    machine cannot fail it: most of them are never generated. (The wait is bounded only so that
    a gateway that never hangs up cannot hold the test forever.)"""
    generated_before = vllm.metric("generation_tokens_total")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"model": MODEL, "max_tokens": 600, "stream": True, "temperature": 0, "messages": LONG}
    conn.request("POST", "/v1/messages", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    deltas = 0
    while deltas < 5:
        line = response.readline()
        assert line, "the stream ended early"
        deltas += line.startswith(b"event: content_block_delta")
    assert vllm.running() == 1
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client hangs up without reading on
    conn.close()
    deadline = time.monotonic() + 300
    while vllm.running():
        assert time.monotonic() < deadline, "vLLM still generating 300 s after the hang-up"
        time.sleep(0.1)
    generated = vllm.metric("generation_tokens_total") - generated_before
    assert generated < 300, f"{generated} of 600 tokens generated"


def test_client_disconnect_mid_stream_aborts_vllms_generation(gateway, vllm):
    hang_up_mid_stream(gateway, vllm)


# --- the model list --------------------------------------------------------------------------


def test_models_list_what_vllm_serves(client, vllm):
    own = [m["id"] for m in requests.get(vllm.v1 + "/models", timeout=5).json()["data"]]
    assert own == [SERVED]
    assert SERVED in [m.id for m in client.models.list()]
    assert client.models.retrieve(SERVED).id == SERVED
    assert ask(client, False, model=SERVED, max_tokens=2, messages=COLORS).model == SERVED


# --- vLLM's own /v1/messages, through the passthrough ----------------------------------------


def test_native_text_answer_is_vllms_text_and_usage(native, vllm):
    own = own_answer(vllm, COLORS, 20)
    message = ask(native, False, max_tokens=20, messages=COLORS)
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.id.startswith("msg_")
    assert text_of(message) == own["message"]["content"]
    assert message.usage.output_tokens == own["usage"]["completion_tokens"]
    assert prompt_of(message) == own["usage"]["prompt_tokens"]


def test_native_stream_follows_the_event_grammar_and_equals_the_json_message(native):
    message = ask(native, False, max_tokens=20, messages=COLORS)
    events, streamed = stream_events(native, max_tokens=20, messages=COLORS)
    check_grammar(events)
    assert shape(streamed) == shape(message)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_native_stop_sequence_is_named_with_stop_reason_stop_sequence(native, vllm, stream):
    full = _full_colors(vllm)
    message = ask(native, stream, max_tokens=20, messages=COLORS, stop_sequences=["Blue"])
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "Blue")
    assert text_of(message) == full[: full.index("Blue")]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_native_max_tokens_stops_with_max_tokens(native, stream):
    message = ask(native, stream, max_tokens=3, messages=COLORS)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3


def test_native_count_tokens_is_vllms_count(native, vllm):
    counted = native.messages.count_tokens(model=MODEL, system=SYSTEM, messages=COLORS)
    assert counted.input_tokens == vllm.prompt_tokens(
        [{"role": "system", "content": SYSTEM}, *COLORS]
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_native_forced_tool_call_is_a_tool_use_block(native, stream):
    message = ask(
        native, stream, max_tokens=40, tools=TOOLS, tool_choice=CHOICES["named"], messages=OSLO
    )
    assert message.stop_reason == "tool_use"
    [use] = tool_uses(message)
    assert use.name == "get_weather" and isinstance(use.input, dict)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_native_prompt_longer_than_the_context_is_a_400_in_claude_codes_words(native, stream):
    """vLLM says no more of the prompt's size than "at least 2049", and, unlike through chat
    completions, the gateway cannot count it: vLLM's /v1/messages/count_tokens stops at the
    window too, and its /tokenize takes OpenAI's messages (a known difference, README)."""
    with pytest.raises(anthropic.BadRequestError) as caught:
        ask(native, stream, max_tokens=10, messages=HUGE)
    body = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    found = CLAUDE_CODE_OVERFLOW.search(body["error"]["message"])
    assert found, body["error"]["message"]
    assert (int(found[1]), int(found[2])) == (WINDOW + 1, WINDOW)


def test_native_stream_message_start_carries_the_cache_counts(native, vllm):
    """vLLM's own message_start has input_tokens (the whole prompt) and output_tokens only;
    Anthropic's, and the gateway's through chat completions, have both cache counts too. The
    passthrough adds them as 0; the cached part still comes in message_delta."""
    size = vllm.prompt_tokens(CACHED)
    ask(native, False, max_tokens=2, messages=CACHED)  # in vLLM's prefix cache from here on
    events, message = stream_events(native, max_tokens=2, messages=CACHED)
    start = events[0].message.usage
    assert (start.cache_creation_input_tokens, start.cache_read_input_tokens) == (0, 0)
    assert start.input_tokens == size
    assert message.usage.cache_read_input_tokens and message.usage.cache_read_input_tokens > 0
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == size


# A request vLLM's own validation refuses (its pydantic models: top_k must be an integer),
# and one its handler refuses (a text block without text leaves nothing to render): what the
# request adds to the body, and its messages.
NATIVE_REFUSED = {
    "validation": ({"top_k": "three"}, COLORS),
    "handler": ({}, [{"role": "user", "content": [{"type": "text"}]}]),
}


@pytest.mark.parametrize("kind", NATIVE_REFUSED)
def test_native_refusals_reach_the_client_as_anthropic_errors(native, vllm, kind):
    """vLLM's /v1/messages answers a request its validation refuses in OpenAI's shape
    (``{"error": {"type": "Bad Request", …}}``) and one its handler refuses in Anthropic's
    with a type of its own (``BadRequestError``): through the passthrough the client gets
    Anthropic's envelope and type for both, with vLLM's words."""
    extra, messages = NATIVE_REFUSED[kind]
    body = {"model": SERVED, "max_tokens": 5, "messages": messages, **extra}
    direct = requests.post(vllm.url + "/v1/messages", json=body, timeout=30)
    own = direct.json()
    assert direct.status_code == 400, own
    if kind == "validation":
        assert "type" not in own and own["error"]["type"] == "Bad Request", own
    else:
        assert own["type"] == "error" and own["error"]["type"] == "BadRequestError", own
    with pytest.raises(anthropic.BadRequestError) as caught:
        ask(native, False, max_tokens=5, messages=messages, extra_body={**T0, **extra})
    error = caught.value.body
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"] == " ".join(own["error"]["message"].split())
    assert error["request_id"].startswith("req_")


def test_native_client_disconnect_mid_stream_aborts_vllms_generation(messages_gateway, vllm):
    hang_up_mid_stream(messages_gateway, vllm)


# --- message batches -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gateway", "messages_gateway"])
def test_a_batch_runs_on_vllm_and_its_answers_are_what_direct_requests_get(name, request):
    """The SDK's batch calls through the translation and through vLLM's own /v1/messages:
    a succeeded result is the direct answer (temperature 0) but for its id and the cache's
    share of the prompt; a bad item is errored alone."""
    server = request.getfixturevalue(name)
    body = {"model": MODEL, "max_tokens": 8, "messages": COLORS}
    direct, found = batch_beside_direct(server, body)
    assert_same_answer_but_for_id_and_cache(found["ask"].message, direct)
    assert found["bad"].error.error.type == "invalid_request_error"


# --- after everything ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gateway", "messages_gateway"])
def test_after_every_test_the_gateway_and_vllm_are_idle_and_serve_the_next_request(
    name, request, vllm
):
    """The same gateways served every test above (overflows and hang-ups among them):
    nothing may be left in flight, in the gateway or in vLLM."""
    server = request.getfixturevalue(name)
    status = requests.get(
        server.url + "/status", headers={"x-api-key": ADMIN_TOKEN}, timeout=5
    ).json()
    assert {n: b["in_flight"] for n, b in status["backends"].items()} == {"default": 0}
    metrics = requests.get(server.url + "/metrics", timeout=5).text
    in_flight = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("gateway_streams_in_flight{")
    ]
    assert sum(in_flight) == 0
    assert vllm.running() == 0 and vllm.metric("num_requests_waiting") == 0
    with anthropic.Anthropic(base_url=server.url, api_key="-", max_retries=0) as sdk:
        assert ask(sdk, True, max_tokens=3, messages=COLORS).stop_reason in (
            "end_turn",
            "max_tokens",
        )
