"""The real-backend tier: the official SDK through real gunicorn to a real llama.cpp server.

llama-server runs SmolLM2-135M-Instruct (Q4_1, 100 MB) on the CPU at temperature 0, so answers
are deterministic and each request takes a few tens of milliseconds. Every test asserts what
Anthropic's API would return for the request; where that depends on the model's words, the
expectation is taken from llama.cpp itself, asked directly with the same prompt.

Two llama-servers, started once for the module: one with the model's own chat template (text,
stops, prefill, counts, overflow, a hang-up, the prefix cache) and one with Qwen2.5's template
for tool calls (SmolLM2 writes ``<tool_call>`` blocks once the conversation shows it a few).
Skipped, with the command that builds the server, when scripts/llama-server has not been run;
CI builds it (.ci/run) and fails here without it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
import requests
from llama import ADMIN_TOKEN, BUILD_HINT, LlamaServer, llama_dir, start_gateway
from servers import Gunicorn
from tier import (
    MODEL,
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
from waiting import eventually

pytestmark = pytest.mark.llama_cpp

COLORS = [{"role": "user", "content": "Name three colors."}]  # "1. Red\n2. Blue\n3. Green"
PREFILL = "1. Red\n2."
# What Claude Code's error handling parses to shrink the conversation and retry.
CLAUDE_CODE_OVERFLOW = re.compile(r"prompt is too long: (\d+) tokens > (\d+) maximum")


# --- servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_home() -> Path:
    home = llama_dir()
    if home is None:
        if os.environ.get("CI"):
            pytest.fail(f"{BUILD_HINT}; .ci/run builds it before the tests")
        pytest.skip(BUILD_HINT)
    return home


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llama")


@pytest.fixture(scope="module")
def plain(llama_home: Path, logs: Path) -> Iterator[LlamaServer]:
    """The model's own template; two slots of 1024 tokens."""
    server = LlamaServer(llama_home, logs / "plain.log", ctx=2048, slots=2)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tooled(llama_home: Path, logs: Path) -> Iterator[LlamaServer]:
    """Qwen2.5's template, for tool calls; two slots of 2048 tokens (the examples are long)."""
    server = LlamaServer(llama_home, logs / "tooled.log", template="qwen2.5", ctx=4096, slots=2)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(plain: LlamaServer, logs: Path) -> Iterator[Gunicorn]:
    server = start_gateway(plain, logs, "gateway")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tool_gateway(tooled: LlamaServer, logs: Path) -> Iterator[Gunicorn]:
    server = start_gateway(tooled, logs, "tool-gateway")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keep_gateway(plain: LlamaServer, logs: Path) -> Iterator[Gunicorn]:
    """Claude Code's attribution line sent to the backend as it came."""
    server = start_gateway(plain, logs, "keep-gateway", billing_header="keep")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def messages_gateway(plain: LlamaServer, logs: Path) -> Iterator[Gunicorn]:
    """llama.cpp's own Anthropic endpoint (/v1/messages) through the passthrough."""
    server = start_gateway(plain, logs, "messages-gateway", protocol="anthropic")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(gateway: Gunicorn) -> Iterator[anthropic.Anthropic]:
    yield from sdk(gateway)


@pytest.fixture(scope="module")
def tool_client(tool_gateway: Gunicorn) -> Iterator[anthropic.Anthropic]:
    yield from sdk(tool_gateway)


@pytest.fixture(scope="module")
def keep_client(keep_gateway: Gunicorn) -> Iterator[anthropic.Anthropic]:
    yield from sdk(keep_gateway)


# --- text and streams ------------------------------------------------------------------------


def test_text_answer_is_a_message_with_llamas_text_and_usage(client, plain):
    own = own_answer(plain, COLORS, 40)
    message = ask(client, False, max_tokens=40, messages=COLORS)
    assert message.type == "message" and message.role == "assistant" and message.model == MODEL
    assert message.id.startswith("msg_")
    assert text_of(message) == own["message"]["content"]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.output_tokens == own["usage"]["completion_tokens"]
    prompt = message.usage.input_tokens + message.usage.cache_read_input_tokens
    assert prompt == own["usage"]["prompt_tokens"] == plain.prompt_tokens(COLORS)


def test_streamed_text_follows_the_event_grammar_and_equals_the_json_message(client):
    message = ask(client, False, max_tokens=40, messages=COLORS)
    events, streamed = stream_events(client, max_tokens=40, messages=COLORS)
    check_grammar(events)
    assert shape(streamed) == shape(message)
    deltas = [e.delta.text for e in events if e.type == "content_block_delta"]
    assert len(deltas) > 1  # relayed token by token, not as one piece at the end
    assert "".join(deltas) == text_of(message)


# --- stop sequences, max_tokens, prefill -----------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_stop_sequence_ends_the_text_before_it_and_is_named(client, plain, stream):
    full = own_answer(plain, COLORS, 40)["message"]["content"]
    assert "Blue" in full
    message = ask(client, stream, max_tokens=40, messages=COLORS, stop_sequences=["Blue"])
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == "Blue"
    assert text_of(message) == full[: full.index("Blue")]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_more_than_four_stop_sequences_all_apply(client, plain, stream):
    full = own_answer(plain, COLORS, 40)["message"]["content"]
    stops = ["zebra", "quartz", "violin", "pepper", "Green"]  # the fifth is the one that fires
    assert all(s not in full for s in stops[:4]) and "Green" in full
    message = ask(client, stream, max_tokens=40, messages=COLORS, stop_sequences=stops)
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == "Green"
    assert text_of(message) == full[: full.index("Green")]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_max_tokens_cuts_the_answer_with_stop_reason_max_tokens(client, plain, stream):
    own = own_answer(plain, COLORS, 3)
    assert own["finish_reason"] == "length"
    message = ask(client, stream, max_tokens=3, messages=COLORS)
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert message.usage.output_tokens == 3
    assert text_of(message) == own["message"]["content"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_prefill_answer_is_the_continuation_only(client, plain, stream):
    prefilled = [*COLORS, {"role": "assistant", "content": PREFILL}]
    own = own_answer(plain, prefilled, 40)["message"]["content"]
    # llama.cpp continues the prefill but answers with the prefill and the continuation.
    continuation = own[len(PREFILL) :] if own.startswith(PREFILL) else own
    assert continuation.strip()
    message = ask(client, stream, max_tokens=40, messages=prefilled)
    text = text_of(message)
    assert not text.startswith("1. Red")
    assert text == continuation
    assert message.stop_reason == "end_turn"


def test_llamas_own_messages_endpoint_names_its_stop_sequence_with_stop_reason_stop_sequence(
    messages_gateway, plain
):
    """llama.cpp's /v1/messages says ``stop_sequence: "Blue"`` beside ``end_turn``."""
    full = own_answer(plain, COLORS, 40)["message"]["content"]
    with anthropic.Anthropic(base_url=messages_gateway.url, api_key="-", max_retries=0) as sdk:
        for stream in (False, True):
            message = ask(sdk, stream, max_tokens=40, messages=COLORS, stop_sequences=["Blue"])
            assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "Blue")
            assert text_of(message) == full[: full.index("Blue")]


COUNTING = [
    {"role": "user", "content": "Count from 1 to 2000, separated by commas."},
    {"role": "assistant", "content": ", ".join(str(i) for i in range(1, 190)) + ","},
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_context_that_fills_up_stops_with_model_context_window_exceeded(client, plain, stream):
    """The prompt fits the slot, the answer does not: llama.cpp stops at the slot's end with
    the same "length" as at max_tokens, having predicted fewer tokens than it was allowed."""
    size, window = plain.prompt_tokens(COUNTING), plain.slot_context()
    assert window - 300 < size < window - 50
    message = ask(client, stream, max_tokens=400, messages=COUNTING)
    assert message.stop_reason == "model_context_window_exceeded"
    assert message.usage.output_tokens + size == window
    capped = ask(client, stream, max_tokens=20, messages=COUNTING)
    assert capped.stop_reason == "max_tokens"


# --- token counts ----------------------------------------------------------------------------

SYSTEM = "You are a terse assistant. Answer in one line."


def test_count_tokens_is_llamas_own_count_of_the_prompt(client, plain):
    counted = client.messages.with_raw_response.count_tokens(
        model=MODEL, system=SYSTEM, messages=COLORS
    )
    expected = plain.prompt_tokens([{"role": "system", "content": SYSTEM}, *COLORS])
    assert counted.parse().input_tokens == expected
    assert counted.headers["x-gateway-token-count"] == "exact"
    message = ask(client, False, max_tokens=5, system=SYSTEM, messages=COLORS)
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == expected


def test_stream_message_start_reports_the_exact_prompt_size(client, plain):
    expected = plain.prompt_tokens([{"role": "system", "content": SYSTEM}, *COLORS])
    events, message = stream_events(client, max_tokens=5, system=SYSTEM, messages=COLORS)
    start = events[0].message.usage
    assert start.input_tokens == expected  # known before the first token, not 0
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == expected


# --- context overflow ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_prompt_longer_than_the_context_is_a_400_in_claude_codes_words(client, plain, stream):
    messages = [{"role": "user", "content": "word " * 1500}]
    size, window = plain.prompt_tokens(messages), plain.slot_context()
    assert size > window
    with pytest.raises(anthropic.BadRequestError) as caught:
        ask(client, stream, max_tokens=10, messages=messages)
    error = caught.value
    assert error.status_code == 400
    assert error.body["type"] == "error"
    assert error.body["error"]["type"] == "invalid_request_error"
    found = CLAUDE_CODE_OVERFLOW.search(error.body["error"]["message"])
    assert found, error.body["error"]["message"]
    assert (int(found[1]), int(found[2])) == (size, window)


def test_a_stream_refused_before_it_starts_is_logged_as_a_stream_with_its_backend(client, gateway):
    messages = [{"role": "user", "content": "word " * 1500}]
    with pytest.raises(anthropic.BadRequestError) as caught:
        ask(client, True, max_tokens=10, messages=messages)
    request_id = caught.value.response.headers["request-id"]
    line = access_line(gateway, request_id)
    assert line["stream"] is True and line["status"] == 400
    assert line["backend"] == "default" and line["attempts"] == 1
    assert line["error"] == "invalid_request_error"


def access_line(server: Gunicorn, request_id: str) -> dict[str, Any]:
    def written() -> dict[str, Any] | None:
        for raw in server.log_path.read_text(errors="replace").split("\n"):
            if request_id in raw and raw.startswith("{"):
                entry = json.loads(raw)
                if entry.get("request_id") == request_id and "status" in entry:
                    return entry
        return None

    return eventually(written, f"no access line for {request_id}")


# --- the model list --------------------------------------------------------------------------


def test_models_list_what_llama_serves_and_retrieve_answers_every_name_messages_serves(
    client, plain
):
    own = [m["id"] for m in requests.get(plain.v1 + "/models", timeout=5).json()["data"]]
    listed = [m.id for m in client.models.list()]
    assert own and set(own) <= set(listed)
    for name in (MODEL, own[0]):
        assert client.models.retrieve(name).id == name
        assert ask(client, False, model=name, max_tokens=2, messages=COLORS).model == name


# --- tools (Qwen2.5's template) --------------------------------------------------------------

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


def _example(number: int, cities: list[str]) -> list[dict[str, Any]]:
    """An earlier turn of the conversation that asked about ``cities`` and got tool calls:
    a 135M model answers with ``<tool_call>`` blocks only after seeing a few."""
    uses = [
        {
            "type": "tool_use",
            "id": f"toolu_ex{number}{i}",
            "name": "get_weather",
            "input": {"city": c},
        }
        for i, c in enumerate(cities)
    ]
    results = [
        {"type": "tool_result", "tool_use_id": u["id"], "content": "12C, sunny"} for u in uses
    ]
    return [
        {"role": "user", "content": "What is the weather in " + " and in ".join(cities) + "?"},
        {"role": "assistant", "content": uses},
        {"role": "user", "content": results},
        {"role": "assistant", "content": "It is 12C and sunny."},
    ]


ONE_CALL = [
    *_example(1, ["Berlin"]),
    *_example(2, ["Rome"]),
    *_example(3, ["Madrid"]),
    {"role": "user", "content": "What is the weather in Oslo?"},
]
TWO_CALLS = [
    *_example(1, ["Berlin", "Rome"]),
    *_example(2, ["Madrid", "Lisbon"]),
    *_example(3, ["Vienna", "Prague"]),
    *_example(4, ["Athens", "Sofia"]),
    {"role": "user", "content": "What is the weather in Oslo and in Paris?"},
]
NO_PARALLEL = {"type": "any", "disable_parallel_tool_use": True}


def tool_uses(message: Any) -> list[Any]:
    assert all(b.type in ("text", "tool_use") for b in message.content), message.content
    return [b for b in message.content if b.type == "tool_use"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_tool_call_becomes_a_tool_use_block(tool_client, stream):
    message = ask(tool_client, stream, max_tokens=60, tools=TOOLS, messages=ONE_CALL)
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    uses = tool_uses(message)
    assert len(uses) == 1, uses
    assert (uses[0].name, uses[0].input) == ("get_weather", {"city": "Oslo"})
    assert uses[0].id


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_parallel_tool_calls_become_tool_use_blocks_in_order(tool_client, stream):
    message = ask(tool_client, stream, max_tokens=80, tools=TOOLS, messages=TWO_CALLS)
    assert message.stop_reason == "tool_use"
    uses = tool_uses(message)
    assert len(uses) == 2
    assert [u.name for u in uses] == ["get_weather", "get_weather"]
    assert uses[0].input == {"city": "Oslo"} and set(uses[1].input) == {"city"}
    assert len({u.id for u in uses}) == 2


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_disable_parallel_tool_use_gives_exactly_one_tool_call(tool_client, stream):
    # llama.cpp itself still calls two tools here with parallel_tool_calls false: its grammar
    # makes each <tool_call> hold one call but lets the calls repeat.
    message = ask(
        tool_client,
        stream,
        max_tokens=80,
        tools=TOOLS,
        tool_choice=NO_PARALLEL,
        messages=TWO_CALLS,
    )
    assert message.stop_reason == "tool_use"
    uses = tool_uses(message)
    assert len(uses) == 1, uses
    assert (uses[0].name, uses[0].input) == ("get_weather", {"city": "Oslo"})


def test_streamed_tool_calls_are_input_json_deltas_that_join_to_the_input(tool_client):
    plain_message = ask(tool_client, False, max_tokens=80, tools=TOOLS, messages=TWO_CALLS)
    events, message = stream_events(tool_client, max_tokens=80, tools=TOOLS, messages=TWO_CALLS)
    check_grammar(events)
    assert shape(message) == shape(plain_message)
    assert len(tool_uses(message)) == 2
    for index, block in enumerate(message.content):
        if block.type != "tool_use":
            continue
        # check_grammar saw that every delta of a tool_use block is an input_json_delta.
        deltas = [e.delta for e in events if e.type == "content_block_delta" and e.index == index]
        assert deltas, f"no input_json_delta for block {index}"
        assert json.loads("".join(d.partial_json for d in deltas)) == block.input


def test_streamed_tool_input_arrives_in_the_pieces_llama_cpp_streams(tool_client):
    """llama.cpp streams a call's arguments token by token ({, ", city, ":, ...); the client
    sees them as they come, as it would from Anthropic, not in one piece at the end."""
    events, message = stream_events(tool_client, max_tokens=60, tools=TOOLS, messages=ONE_CALL)
    [index] = [i for i, b in enumerate(message.content) if b.type == "tool_use"]
    pieces = [
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta" and e.index == index and e.delta.partial_json
    ]
    assert len(pieces) > 1, pieces


# --- a client that hangs up ------------------------------------------------------------------

LONG = [{"role": "user", "content": "Write a very long story about a dragon."}]


def test_client_disconnect_mid_stream_frees_the_llama_slot(gateway, plain):
    """The story runs to max_tokens (900) if nobody stops it. After the hang-up llama.cpp stops
    generating it: counted in tokens, not seconds, so that a slow machine cannot fail it, most
    of what remained at the hang-up is never generated. (The wait is bounded only so that a
    gateway that never hangs up cannot hold the test forever.)"""
    predicted = plain.metric("tokens_predicted_total")
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    body = {"model": MODEL, "max_tokens": 900, "stream": True, "temperature": 0, "messages": LONG}
    conn.request("POST", "/v1/messages", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    deltas = 0
    while deltas < 5:
        line = response.readline()
        assert line, "the stream ended early"
        deltas += line.startswith(b"event: content_block_delta")
    busy = [s for s in plain.slots() if s["is_processing"]]
    assert len(busy) == 1
    remaining = busy[0]["next_token"][0]["n_remain"]
    assert remaining >= 600
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client hangs up without reading on
    conn.close()
    deadline = time.monotonic() + 300
    while any(s["is_processing"] for s in plain.slots()):
        assert time.monotonic() < deadline, "llama.cpp still generating 300 s after the hang-up"
        time.sleep(0.05)
    generated = plain.metric("tokens_predicted_total") - predicted  # counted when a slot frees
    assert generated < 900 - remaining // 2, f"{generated} of 900 tokens generated"


# --- the prefix cache and Claude Code's attribution line -------------------------------------

CLAUDE_CODE_PROMPT = (
    "You are Claude Code, Anthropic's official CLI for Claude.\n\n"
    "You are an interactive CLI tool that helps users with software engineering tasks. "
    "Use the instructions below and the tools available to you to assist the user.\n\n"
    + "\n".join(
        f"- Rule {i}: keep answers short, prefer editing existing files to creating new ones, "
        "never commit unless asked, and run the tests before saying a change is done."
        for i in range(1, 15)
    )
)


def _claude_code_request(max_tokens: int = 5) -> dict[str, Any]:
    """Shaped like Claude Code's: its attribution line (a fresh ``cch`` each request) as the
    first system block, then its long instructions."""
    billing = (
        "x-anthropic-billing-header: cc_version=2.0.14; cc_entrypoint=cli; "
        f"cch={secrets.token_hex(3)[:5]};"
    )
    return {
        "max_tokens": max_tokens,
        "system": [
            {"type": "text", "text": billing},
            {"type": "text", "text": CLAUDE_CODE_PROMPT, "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [{"role": "user", "content": "Say hello."}],
    }


def _second_of_two(client: anthropic.Anthropic) -> Any:
    ask(client, False, **_claude_code_request())
    return ask(client, False, **_claude_code_request())


def test_normalised_billing_header_lets_llama_reuse_the_cached_prompt(client):
    usage = _second_of_two(client).usage
    prompt = usage.input_tokens + usage.cache_read_input_tokens
    assert prompt > 500
    # All but the last token comes from the cache (llama.cpp always evaluates one).
    assert usage.cache_read_input_tokens >= prompt - 2, usage


def test_kept_billing_header_makes_llama_recompute_the_prompt(keep_client):
    usage = _second_of_two(keep_client).usage
    prompt = usage.input_tokens + usage.cache_read_input_tokens
    assert prompt > 500
    # Only the template's opening and the line up to ``cch=`` match the earlier request.
    assert usage.cache_read_input_tokens < 40, usage
    assert usage.input_tokens > prompt - 40


# --- message batches -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gateway", "messages_gateway"])
def test_a_batch_runs_on_llama_and_its_answers_are_what_direct_requests_get(name, request):
    """The SDK's batch calls through the translation and through llama.cpp's own /v1/messages:
    a succeeded result is the direct answer (temperature 0) but for its id and the cache's
    share of the prompt; a bad item is errored alone."""
    server = request.getfixturevalue(name)
    body = {"model": MODEL, "max_tokens": 12, "messages": COLORS}
    direct, found = batch_beside_direct(server, body)
    assert_same_answer_but_for_id_and_cache(found["ask"].message, direct)
    assert found["bad"].error.error.type == "invalid_request_error"


# --- after everything ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gateway", "tool_gateway"])
def test_after_every_test_the_gateway_holds_nothing_and_serves_the_next_request(
    name, request, plain, tooled
):
    """The same gateways served every test above (faults, hang-ups and overflows among
    them): nothing may be left in flight, in the gateway or in llama.cpp."""
    server = request.getfixturevalue(name)
    status = requests.get(
        server.url + "/status", headers={"x-api-key": ADMIN_TOKEN}, timeout=5
    ).json()
    assert {n: b["in_flight"] for n, b in status["backends"].items()} == {"default": 0}
    assert not any(b["probing"] for b in status["backends"].values())
    metrics = requests.get(server.url + "/metrics", timeout=5).text
    in_flight = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("gateway_streams_in_flight{")
    ]
    assert sum(in_flight) == 0
    assert not any(slot["is_processing"] for slot in plain.slots() + tooled.slots())
    with anthropic.Anthropic(base_url=server.url, api_key="-", max_retries=0) as sdk:
        assert ask(sdk, True, max_tokens=5, messages=COLORS).stop_reason in (
            "end_turn",
            "max_tokens",
        )
