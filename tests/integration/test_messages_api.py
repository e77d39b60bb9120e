"""POST /v1/messages end to end: the official anthropic SDK -> gateway -> a real fake backend."""

from __future__ import annotations

import http.client
import json
import re

import anthropic
import pytest
import requests
from fakebackend import (
    JSONReply,
    RawReply,
    StreamReply,
    chunk,
    chunks,
    completion,
    error_body,
)
from metrics import metric_sum

USER_HI = [{"role": "user", "content": "hi"}]


def create(client: anthropic.Anthropic, **kwargs):
    kwargs.setdefault("model", "claude-sonnet-4-6")
    kwargs.setdefault("max_tokens", 64)
    kwargs.setdefault("messages", USER_HI)
    return client.messages.create(**kwargs)


def stream_final(client: anthropic.Anthropic, **kwargs):
    kwargs.setdefault("model", "claude-sonnet-4-6")
    kwargs.setdefault("max_tokens", 64)
    kwargs.setdefault("messages", USER_HI)
    with client.messages.stream(**kwargs) as stream:
        events = [event.type for event in stream]
        return stream.get_final_message(), events


# --- non-streaming -------------------------------------------------------------------------


def test_create_returns_anthropic_message_with_requested_model(client, backend):
    backend.reply(JSONReply(completion("Hi there", cached_tokens=4)))
    message = create(client)
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and len(message.id) >= 24
    assert message.model == "claude-sonnet-4-6"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Hi there"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens == 6
    assert message.usage.cache_read_input_tokens == 4
    assert message.usage.output_tokens == 5


def test_request_is_translated_for_the_backend(make_gateway, backend):
    gateway = make_gateway({"dialect": "vllm", "model": "qwen3-32b"})
    with gateway.client() as client:
        create(
            client,
            system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            messages=[
                {"role": "user", "content": "one"},
                {"role": "user", "content": [{"type": "text", "text": "two"}]},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "three"},
            ],
            stop_sequences=["###"],
            metadata={"user_id": "u-1"},
            extra_body={"temperature": 0.2, "top_p": 0.9, "top_k": 40},
        )
    sent = backend.requests[-1].json
    assert sent["model"] == "qwen3-32b"
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one\n\ntwo"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "three"},
    ]
    assert sent["max_tokens"] == 64 and sent["top_k"] == 40
    assert sent["temperature"] == 0.2 and sent["top_p"] == 0.9 and sent["user"] == "u-1"
    # The gateway matches stop sequences itself, on a stream it can end as soon as one appears.
    assert "stop" not in sent and sent["stream"] is True


def test_claude_code_shaped_request_is_accepted(client, backend):
    """Query string, beta header, system role inside messages, untranslated extras."""
    backend.reply(JSONReply(completion("done")))
    message = client.messages.create(
        model="claude-opus-4-7",
        max_tokens=8192,
        messages=[
            {"role": "system", "content": "You are Claude Code."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}],
            },
        ],
        extra_headers={"anthropic-beta": "context-management-2025-06-27,oauth-2025-04-20"},
        extra_query={"beta": "true"},
        extra_body={
            "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]},
            "output_config": {"effort": "high"},
            "thinking": {"type": "adaptive"},
            "service_tier": "auto",
        },
    )
    assert message.content[0].text == "done"
    recorded = backend.requests[-1]
    assert recorded.json["messages"][0] == {"role": "system", "content": "You are Claude Code."}
    for dropped in ("context_management", "output_config", "thinking", "service_tier"):
        assert dropped not in recorded.json


def test_vllm_stop_reason_string_becomes_stop_sequence(client, backend):
    backend.reply(JSONReply(completion("a", extra_choice={"stop_reason": "###"})))
    message = create(client, stop_sequences=["###", "END"])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "###"


# The fake backend's answers say they used 5 output tokens.
@pytest.mark.parametrize(
    ("finish_reason", "max_tokens", "stop_reason"),
    [
        ("stop", 64, "end_turn"),
        ("length", 5, "max_tokens"),
        # A length stop short of the cap it was sent: the context window filled first (vLLM
        # 0.32 lowers max_tokens to what fits, llama.cpp checks only the prompt).
        ("length", 64, "model_context_window_exceeded"),
        ("content_filter", 64, "refusal"),
        (None, 64, "end_turn"),
    ],
)
def test_finish_reason_maps_to_stop_reason(client, backend, finish_reason, max_tokens, stop_reason):
    backend.reply(JSONReply(completion("x", finish_reason=finish_reason)))
    assert create(client, max_tokens=max_tokens).stop_reason == stop_reason


def test_request_id_is_returned_and_sent_to_backend(client, backend):
    response = client.messages.with_raw_response.create(model="m", max_tokens=5, messages=USER_HI)
    request_id = response.headers["request-id"]
    assert request_id.startswith("req_")
    assert response.parse()._request_id == request_id
    assert backend.requests[-1].headers["x-request-id"] == request_id


def test_incoming_request_id_is_kept(gateway, backend):
    reply = requests.post(
        gateway.url + "/v1/messages",
        json={"model": "m", "max_tokens": 5, "messages": USER_HI},
        headers={"X-Request-ID": "0123456789abcdef0123456789abcdef"},
        timeout=10,
    )
    assert reply.headers["request-id"] == "0123456789abcdef0123456789abcdef"
    assert backend.requests[-1].headers["x-request-id"] == "0123456789abcdef0123456789abcdef"


def test_backend_api_key_is_sent_as_bearer(make_gateway, backend):
    with make_gateway({"api_key": "sk-backend"}).client() as client:
        create(client)
    assert backend.requests[-1].headers["authorization"] == "Bearer sk-backend"


def test_leading_blank_lines_before_json_are_tolerated(client, backend):
    backend.reply(JSONReply(completion("ok"), leading_blank_lines=3))
    assert create(client).content[0].text == "ok"


# --- streaming ------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["openai", "vllm", "llamacpp"])
def test_stream_accumulates_to_the_full_message(client, backend, dialect):
    backend.reply(StreamReply(chunks(["Hel", "lo", " world"], dialect=dialect, cached_tokens=3)))
    message, events = stream_final(client)
    assert message.content[0].text == "Hello world"
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == 7 and message.usage.output_tokens == 5
    assert message.usage.cache_read_input_tokens == 3
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "message_delta" in events


def test_stream_asks_backend_for_usage(client, backend):
    backend.reply(StreamReply(chunks(["x"])))
    stream_final(client)
    sent = backend.requests[-1].json
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_stream_without_usage_still_reports_integer_usage(client, backend):
    backend.reply(StreamReply(chunks(["four", " words", " here"], usage=None)))
    message, _ = stream_final(client)
    assert message.usage.output_tokens > 0
    assert isinstance(message.usage.input_tokens, int)


def test_stream_tolerates_crlf_comments_and_missing_done(client, backend):
    backend.reply(
        StreamReply(
            chunks(["a", "b"]),
            line_ending="\r\n",
            comments=[(0, "keep-alive"), (2, "OPENROUTER PROCESSING")],
            done=False,
        )
    )
    message, _ = stream_final(client)
    assert message.content[0].text == "ab"


def test_stream_over_close_delimited_body(client, backend):
    backend.reply(StreamReply(chunks(["x", "y"]), chunked=False))
    message, _ = stream_final(client)
    assert message.content[0].text == "xy"


def test_backend_rejecting_stream_options_is_retried_without_them(make_gateway, backend):
    backend.reject_stream_options = True
    with make_gateway().client() as client:
        backend.reply(
            StreamReply(chunks(["ok"], usage=None)), StreamReply(chunks(["again"], usage=None))
        )
        first, _ = stream_final(client)
        second, _ = stream_final(client)
    assert first.content[0].text == "ok" and second.content[0].text == "again"
    bodies = [r.json for r in backend.requests]
    assert "stream_options" in bodies[0] and "stream_options" not in bodies[1]
    assert "stream_options" not in bodies[2]  # remembered for the worker's lifetime


def test_stream_response_headers(gateway, backend):
    backend.reply(StreamReply(chunks(["x"])))
    with requests.post(
        gateway.url + "/v1/messages",
        json={"model": "m", "max_tokens": 5, "messages": USER_HI, "stream": True},
        stream=True,
        timeout=10,
    ) as reply:
        body = reply.content.decode()
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert reply.headers["cache-control"] == "no-cache"
    assert reply.headers["x-accel-buffering"] == "no"
    assert reply.headers["request-id"].startswith("req_")
    for block in body.strip().split("\n\n"):
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        assert f'"type":"{name_line[7:]}"' in data_line
    assert body.index("event: ping") > body.index("event: content_block_start")


def test_stream_stop_sequence_from_vllm(client, backend):
    backend.reply(StreamReply(chunks(["a"], dialect="vllm", extra_choice={"stop_reason": "END"})))
    message, _ = stream_final(client, stop_sequences=["END"])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "END"


def test_stream_cut_by_backend_ends_with_error_event(client, backend):
    backend.reply(StreamReply(chunks(["a", "b", "c"]), cut_after=2))
    with pytest.raises(anthropic.APIStatusError, match="before the answer was complete"):
        stream_final(client)


def test_a_stream_replaced_by_an_error_answer_gives_back_what_it_held(
    make_gateway, backend, gateway_log
):
    """A relayed stream built, then replaced by an error answer before it left the app (here
    an after-request hook of the test's own fails for it): the client gets the error, the
    backend sees its connection closed, nothing stays in flight, and the access line says 500
    once."""
    gateway = make_gateway(admin={"token": "t"})

    @gateway.app.after_request
    def fail_streams(response):
        if response.mimetype == "text/event-stream":
            raise RuntimeError("an after-request hook failed")
        return response

    backend.reply(StreamReply(chunks(["x"] * 100), delay=0.1))  # ten seconds of answer
    reply = requests.post(
        gateway.url + "/v1/messages",
        json={"model": "m", "max_tokens": 64, "messages": USER_HI, "stream": True},
        timeout=30,
    )
    assert reply.status_code == 500
    assert reply.json()["error"]["type"] == "api_error"
    assert backend.wait_closed(1, timeout=5)  # long before the answer's end
    status = requests.get(gateway.url + "/status", headers={"x-api-key": "t"}, timeout=5).json()
    assert status["backends"]["default"]["in_flight"] == 0
    metrics = requests.get(gateway.url + "/metrics", timeout=5).text
    assert metric_sum(metrics, "gateway_streams_in_flight") == 0
    lines = [r.msg for r in gateway_log.records if r.name == "gateway.access"]
    assert [(line["status"], line["request_id"]) for line in lines if line["stream"]] == [
        (500, reply.headers["request-id"])
    ]


def test_in_stream_backend_error_becomes_error_event(client, backend):
    events = [
        chunk({"role": "assistant", "content": "par"}),
        error_body("engine crashed", code=500),
    ]
    backend.reply(StreamReply(events))
    with pytest.raises(anthropic.APIStatusError, match="engine crashed"):
        stream_final(client)


# A tool call whose function is not an object, or whose arguments are a number: the backend's
# answer is unusable, and the client is told so by name, not with the gateway's own error.
MALFORMED_CALLS = [
    {"index": 0, "id": "call_1", "type": "function", "function": "get_weather"},
    {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": 42}},
]
MALFORMED_IDS = ["function_string", "arguments_number"]


@pytest.mark.parametrize("call", MALFORMED_CALLS, ids=MALFORMED_IDS)
def test_a_malformed_tool_call_in_a_json_answer_is_a_backend_error(client, backend, call):
    answer = completion(None, finish_reason="tool_calls", extra_message={"tool_calls": [call]})
    backend.reply(JSONReply(answer))
    with pytest.raises(anthropic.InternalServerError) as caught:
        create(client)
    error = caught.value.body["error"]
    assert error["type"] == "api_error"
    assert re.match(r"backend \S+ sent .*tool call", error["message"])  # names it


@pytest.mark.parametrize("call", MALFORMED_CALLS, ids=MALFORMED_IDS)
def test_a_malformed_tool_call_in_a_stream_ends_it_with_a_backend_error_event(
    client, backend, call
):
    events = [chunk({"role": "assistant", "content": ""}), chunk({"tool_calls": [call]})]
    backend.reply(StreamReply([*events, chunk({}, "tool_calls")]))
    with pytest.raises(anthropic.APIStatusError) as caught:
        stream_final(client)
    error = caught.value.body["error"]
    assert error["type"] == "api_error"
    assert re.match(r"backend \S+ sent .*tool call", error["message"])  # names it


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error_class", "error_type"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (401, anthropic.AuthenticationError, "authentication_error"),
        (403, anthropic.PermissionDeniedError, "permission_error"),
        (404, anthropic.NotFoundError, "not_found_error"),
        (413, anthropic.APIStatusError, "request_too_large"),
        (422, anthropic.BadRequestError, "invalid_request_error"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (502, anthropic.InternalServerError, "api_error"),
        (503, anthropic.InternalServerError, "overloaded_error"),
        (504, anthropic.InternalServerError, "timeout_error"),
    ],
)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_backend_status_maps_to_sdk_error(client, backend, status, error_class, error_type, stream):
    backend.reply(JSONReply(error_body("backend says no"), status=status))
    with pytest.raises(error_class) as caught:
        if stream:
            stream_final(client)
        else:
            create(client)
    assert caught.value.body["error"]["type"] == error_type
    assert caught.value.response.headers["request-id"].startswith("req_")


def test_rate_limit_keeps_retry_after(client, backend):
    backend.reply(JSONReply(error_body("slow down"), status=429, headers={"Retry-After": "7"}))
    with pytest.raises(anthropic.RateLimitError) as caught:
        create(client)
    assert caught.value.response.headers["retry-after"] == "7"


def test_sdk_retries_a_backend_503_and_then_succeeds(gateway, backend):
    backend.reply(JSONReply(error_body("busy"), status=503, headers={"Retry-After": "0"}))
    backend.reply(JSONReply(completion("second time")))
    with gateway.client(max_retries=1) as client:
        assert create(client).content[0].text == "second time"


def test_context_overflow_message_starts_like_anthropic(client, backend):
    text = "This model's maximum context length is 8192 tokens. However, you requested 9000."
    backend.reply(JSONReply(error_body(text), status=400))
    with pytest.raises(anthropic.BadRequestError, match="prompt is too long"):
        create(client)


def test_html_error_page_from_backend_is_summarised(client, backend):
    backend.reply(JSONReply("<html><body><h1>502 Bad Gateway</h1></body></html>", status=502))
    with pytest.raises(anthropic.InternalServerError, match="502 Bad Gateway"):
        create(client)


def test_non_json_success_body_is_an_api_error(client, backend):
    backend.reply(RawReply(b"not json at all", headers={"Content-Type": "text/plain"}))
    with pytest.raises(anthropic.InternalServerError, match="invalid JSON"):
        create(client)


def test_unreachable_backend_names_it(make_gateway, backend):
    gateway = make_gateway()
    url = backend.url
    backend.stop()
    with gateway.client() as client, pytest.raises(anthropic.APIStatusError) as caught:
        create(client)
    assert caught.value.status_code == 502
    assert "connection refused" in caught.value.message
    assert url.split("//")[1].split("/")[0] in caught.value.message


def test_backend_timeout_is_a_504(make_gateway, backend):
    from fakebackend import HangReply

    backend.reply(HangReply(3))
    with make_gateway({"read_timeout": 0.3}).client() as client:
        with pytest.raises(anthropic.InternalServerError) as caught:
            create(client)
    assert caught.value.status_code == 504
    assert caught.value.body["error"]["type"] == "timeout_error"


def post_raw(gateway, data, **kwargs):
    headers = kwargs.pop("headers", {"Content-Type": "application/json"})
    return requests.post(gateway.url + "/v1/messages", data=data, headers=headers, timeout=10)


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "empty"),
        (b"[1, 2]", 400, "JSON object"),
        (b'{"max_tokens": 5, "messages": []}', 400, "model: field required"),
        (b'{"model": "m", "messages": []}', 400, "max_tokens: field required"),
        (
            b'{"model": "m", "max_tokens": "5", "messages": []}',
            400,
            "max_tokens: must be an integer",
        ),
        (b'{"model": "m", "max_tokens": 5}', 400, "messages: field required"),
        (b'{"model": "m", "max_tokens": 5, "messages": []}', 400, "at least one message"),
        (
            b'{"model": "m", "max_tokens": 5, "messages": [{"role": "bot", "content": "x"}]}',
            400,
            "messages.0.role",
        ),
        (
            b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": 5}]}',
            400,
            "messages.0.content",
        ),
        (
            b'{"model": "m", "max_tokens": 5, "temperature": 3,'
            b' "messages": [{"role": "user", "content": "x"}]}',
            400,
            "temperature",
        ),
    ],
)
def test_bad_requests_get_invalid_request_errors(gateway, backend, data, status, message):
    reply = post_raw(gateway, data)
    assert reply.status_code == status
    body = reply.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert message in body["error"]["message"]
    assert reply.headers["request-id"] == body["request_id"]
    assert backend.requests == []


def test_unknown_route_is_not_found_error(gateway):
    reply = requests.get(gateway.url + "/v1/nothing", timeout=10)
    assert reply.status_code == 404
    assert reply.json()["error"]["type"] == "not_found_error"


def test_wrong_method_is_405_with_allow(gateway):
    reply = requests.get(gateway.url + "/v1/messages", timeout=10)
    assert reply.status_code == 405
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert "POST" in reply.headers["allow"]


def test_body_over_the_limit_is_request_too_large(make_gateway, backend):
    gateway = make_gateway(max_body_bytes=4096)
    big = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 8000}]}
    reply = requests.post(gateway.url + "/v1/messages", json=big, timeout=10)
    assert reply.status_code == 413
    assert reply.json()["error"]["type"] == "request_too_large"
    assert backend.requests == []


def test_chunked_request_body_is_read_and_held_to_the_limit(make_gateway, backend):
    """A body without Content-Length (Transfer-Encoding: chunked) takes werkzeug's path,
    which enforces the same limit as the Content-Length path."""
    gateway = make_gateway(max_body_bytes=4096)
    small = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    backend.reply(JSONReply(completion("ok")))
    ok = requests.post(
        gateway.url + "/v1/messages", data=iter([json.dumps(small).encode()]), timeout=10
    )
    assert ok.status_code == 200, ok.text
    big = {**small, "messages": [{"role": "user", "content": "x" * 8000}]}
    reply = requests.post(
        gateway.url + "/v1/messages", data=iter([json.dumps(big).encode()]), timeout=10
    )
    assert reply.status_code == 413, reply.text
    assert reply.json()["error"]["type"] == "request_too_large"


def test_missing_content_type_is_accepted(gateway, backend):
    reply = post_raw(
        gateway,
        b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}',
        headers={},
    )
    assert reply.status_code == 200


# --- stream timing: pings, idle and total timeouts ------------------------------------------------


def raw_stream(gateway, **body) -> str:
    payload = {"model": "m", "max_tokens": 5, "messages": USER_HI, "stream": True, **body}
    with requests.post(
        gateway.url + "/v1/messages", json=payload, stream=True, timeout=30
    ) as reply:
        assert reply.status_code == 200
        return reply.content.decode()


def event_names(body: str) -> list[str]:
    return [line[7:] for line in body.splitlines() if line.startswith("event: ")]


def test_silent_backend_gets_pings_and_the_stream_completes(make_gateway, backend):
    gateway = make_gateway(ping_interval=0.2)
    backend.reply(StreamReply(chunks(["late", " answer"]), first_delay=2.0))  # ~10 ping times
    names = event_names(raw_stream(gateway))
    assert names[0] == "message_start" and names[-1] == "message_stop"
    first_block = names.index("content_block_start")
    assert names[1:first_block].count("ping") >= 2  # pings while the backend was silent


def test_idle_gap_beyond_idle_timeout_ends_with_timeout_error(make_gateway, backend):
    gateway = make_gateway({"idle_timeout": 0.4}, ping_interval=0.1)
    backend.reply(StreamReply(chunks(["a", "b"]), delay=1.5))  # 1.5 s between chunks
    body = raw_stream(gateway)
    names = event_names(body)
    assert names[-1] == "error" and "message_stop" not in names
    assert "ping" in names
    assert '"type":"timeout_error"' in body.split("event: error")[-1]


def test_total_timeout_ends_a_long_stream_with_timeout_error(make_gateway, backend):
    # text comes every 0.25 s for 10 s, so some has come however slow the machine when the
    # 3 s are up
    gateway = make_gateway({"total_timeout": 3.0})
    backend.reply(StreamReply(chunks([f"w{i}" for i in range(40)]), delay=0.25))
    body = raw_stream(gateway)
    names = event_names(body)
    assert names[-1] == "error" and "content_block_delta" in names
    assert "exceeded the total time" in body


def test_trust_env_sends_backend_calls_through_the_environment_proxy(backend, monkeypatch):
    """With trust_env the environment's http_proxy is used, as curl would (the fake backend
    plays the proxy: it records the absolute URL a proxy is sent)."""
    from inprocess import GatewayServer

    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{backend.port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    gateway = GatewayServer({"upstream": {"url": "http://backend.invalid:9/v1", "trust_env": True}})
    conn = http.client.HTTPConnection("127.0.0.1", int(gateway.url.rsplit(":", 1)[1]), timeout=10)
    try:  # http.client: the test's own request must not go through the proxy
        body = json.dumps({"model": "m", "max_tokens": 5, "messages": USER_HI})
        conn.request("POST", "/v1/messages", body, {"Content-Type": "application/json"})
        assert json.loads(conn.getresponse().read())["content"][0]["text"] == "Hello"
    finally:
        conn.close()
        gateway.close()
    assert backend.requests[-1].path == "http://backend.invalid:9/v1/chat/completions"
