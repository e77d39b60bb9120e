"""Tests for the fake OpenAI backend, driven by stdlib HTTP clients over real TCP.

The integration tests trust this fake to reproduce wire-level behaviour (framing, timing, hang-ups),
so each behaviour is checked here with a client that cannot paper over it.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager

import pytest
from fakebackend import (
    FakeBackend,
    HangReply,
    JSONReply,
    RawReply,
    StreamReply,
    chunk,
    chunks,
    completion,
)

CHAT = "/v1/chat/completions"


@pytest.fixture
def fb() -> Iterator[FakeBackend]:
    with FakeBackend() as backend:
        yield backend


@contextmanager
def connect(backend: FakeBackend, timeout: float = 5.0) -> Iterator[http.client.HTTPConnection]:
    conn = http.client.HTTPConnection("127.0.0.1", backend.port, timeout=timeout)
    try:
        yield conn
    finally:
        conn.close()


def post(
    conn: http.client.HTTPConnection,
    body: object,
    path: str = CHAT,
    headers: dict[str, str] | None = None,
) -> http.client.HTTPResponse:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    conn.request("POST", path, body=payload, headers=all_headers)
    return conn.getresponse()


def raw_post(backend: FakeBackend, body: dict) -> bytes:
    """Send one request on a bare socket and return every byte until the server closes."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", backend.port), timeout=5) as sock:
        sock.sendall(head.encode() + payload)
        received = b""
        while data := sock.recv(65536):
            received += data
    return received


def data_lines(body: bytes) -> list[str]:
    return [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]


# --- lifecycle ----------------------------------------------------------------------------


def test_url_and_idempotent_stop() -> None:
    backend = FakeBackend().start()
    assert backend.url == f"http://127.0.0.1:{backend.port}/v1"
    backend.stop()
    backend.stop()
    with pytest.raises(ConnectionRefusedError), connect(backend) as conn:
        post(conn, {})


def test_stop_ends_a_hanging_reply_promptly() -> None:
    backend = FakeBackend().start()
    backend.reply(HangReply(30))
    with connect(backend, timeout=0.3) as conn, pytest.raises(TimeoutError):
        post(conn, {"model": "m"})
    started = time.monotonic()
    backend.stop()
    assert time.monotonic() - started < 10  # not the reply's 30 s


def test_stop_closes_idle_keep_alive_connections() -> None:
    backend = FakeBackend().start()
    with connect(backend) as conn:
        post(conn, {"model": "m"}).read()
        started = time.monotonic()
        backend.stop()  # the handler thread is blocked reading the next request
        assert time.monotonic() - started < 10


# --- JSON replies ---------------------------------------------------------------------------


def test_json_replies_keep_the_connection_alive(fb: FakeBackend) -> None:
    fb.reply(JSONReply(completion("one")), JSONReply(completion("two")))
    with connect(fb) as conn:
        first = post(conn, {"model": "m"})
        assert first.status == 200
        assert json.loads(first.read())["choices"][0]["message"]["content"] == "one"
        sock = conn.sock
        assert sock is not None
        second = post(conn, {"model": "m"})
        assert json.loads(second.read())["choices"][0]["message"]["content"] == "two"
        assert conn.sock is sock
    assert len(fb.requests) == 2


def test_json_reply_status_headers_delay_and_blank_lines(fb: FakeBackend) -> None:
    body = {"error": {"message": "slow down", "type": "rate_limit_exceeded"}}
    fb.reply(
        JSONReply(body, status=429, headers={"Retry-After": "3"}, delay=0.2, leading_blank_lines=2)
    )
    started = time.monotonic()
    with connect(fb) as conn:
        resp = post(conn, {"model": "m"})
        raw = resp.read()
    assert time.monotonic() - started >= 0.2
    assert resp.status == 429
    assert resp.getheader("Retry-After") == "3"
    assert resp.getheader("Content-Type") == "application/json"
    assert raw.startswith(b"\n\n{")
    assert json.loads(raw) == body


def test_str_body_is_sent_as_html(fb: FakeBackend) -> None:
    fb.reply(JSONReply("<html>502 Bad Gateway</html>", status=502))
    with connect(fb) as conn:
        resp = post(conn, {})
        assert resp.status == 502
        assert resp.getheader("Content-Type").startswith("text/html")
        assert resp.read() == b"<html>502 Bad Gateway</html>"


def test_raw_reply(fb: FakeBackend) -> None:
    fb.reply(RawReply(b'{"choices": [', status=200, headers={"X-Test": "1"}))
    with connect(fb) as conn:
        resp = post(conn, {})
        assert resp.getheader("X-Test") == "1"
        assert resp.read() == b'{"choices": ['


def test_default_reply_answers_plain_and_streaming_requests(fb: FakeBackend) -> None:
    with connect(fb) as conn:
        plain = json.loads(post(conn, {"model": "m"}).read())
        assert plain["choices"][0]["message"]["content"] == "Hello"
        resp = post(conn, {"stream": True, "stream_options": {"include_usage": True}})
        assert resp.getheader("Content-Type") == "text/event-stream"
        lines = data_lines(resp.read())
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    assert (
        "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        == "Hello"
    )
    assert events[-1]["usage"]["total_tokens"] == 15


def test_no_default_gives_500(fb: FakeBackend) -> None:
    fb.default = None
    with connect(fb) as conn:
        assert post(conn, {}).status == 500


# --- routing and recording ------------------------------------------------------------------


def test_unknown_path_is_404_and_recorded(fb: FakeBackend) -> None:
    fb.reply(JSONReply(completion("queued")))
    with connect(fb) as conn:
        conn.request("GET", "/v1/models?limit=5")
        resp = conn.getresponse()
        assert resp.status == 404
        assert json.loads(resp.read())["error"]["message"] == "not found"
        # the queue was not consumed
        assert json.loads(post(conn, {}).read())["choices"][0]["message"]["content"] == "queued"
    assert fb.requests[0].method == "GET"
    assert fb.requests[0].path == "/v1/models?limit=5"
    assert fb.requests[0].json is None


def test_requests_are_recorded_with_headers_and_json(fb: FakeBackend) -> None:
    with connect(fb) as conn:
        post(
            conn,
            {"model": "m", "stream": False},
            path=CHAT + "?x=1",
            headers={"Authorization": "Bearer k", "X-Trace-Id": "t1"},
        ).read()
        post(conn, b"not json").read()
    first, second = fb.requests
    assert (first.method, first.path) == ("POST", CHAT + "?x=1")
    assert first.headers["authorization"] == "Bearer k"
    assert first.headers["x-trace-id"] == "t1"
    assert first.json == {"model": "m", "stream": False}
    assert json.loads(first.body) == first.json
    assert second.body == b"not json"
    assert second.json is None


def test_reject_stream_options_does_not_consume_the_queue() -> None:
    with FakeBackend(reject_stream_options=True) as backend, connect(backend) as conn:
        backend.reply(JSONReply(completion("after retry")))
        resp = post(conn, {"stream": False, "stream_options": {"include_usage": True}})
        assert resp.status == 400
        error = json.loads(resp.read())["error"]
        assert error["message"] == "Unrecognized request argument supplied: stream_options"
        assert error["type"] == "invalid_request_error"
        retry = json.loads(post(conn, {"stream": False}).read())
        assert retry["choices"][0]["message"]["content"] == "after retry"
        assert len(backend.requests) == 2


# --- streams --------------------------------------------------------------------------------


def test_stream_events_arrive_incrementally(fb: FakeBackend) -> None:
    reply = StreamReply([{"n": i} for i in range(5)], delay=0.1)
    fb.reply(reply)
    with connect(fb) as conn:
        resp = post(conn, {"stream": True})
        assert resp.getheader("Transfer-Encoding") == "chunked"
        arrivals: list[tuple[float, bytes]] = []
        while line := resp.readline():
            if line.startswith(b"data: "):
                arrivals.append((time.monotonic(), line))
    assert [line for _, line in arrivals][-1] == b"data: [DONE]\n"
    assert len(arrivals) == 6
    assert arrivals[0][0] < reply.sent_at[-1]  # the first before the last was even written
    assert arrivals[4][0] - arrivals[0][0] >= 0.35  # four gaps of 0.1 s


def test_crlf_line_endings_and_comments(fb: FakeBackend) -> None:
    fb.reply(
        StreamReply(
            [{"a": 1}, '{"broken'],
            line_ending="\r\n",
            comments=[(0, "keep-alive"), (2, "OPENROUTER PROCESSING")],
        )
    )
    with connect(fb) as conn:
        body = post(conn, {}).read()
    assert body == (
        b": keep-alive\r\n\r\n"
        b'data: {"a": 1}\r\n\r\n'
        b'data: {"broken\r\n\r\n'
        b": OPENROUTER PROCESSING\r\n\r\n"
        b"data: [DONE]\r\n\r\n"
    )


def test_done_false_omits_done(fb: FakeBackend) -> None:
    fb.reply(StreamReply([{"a": 1}], done=False))
    with connect(fb) as conn:
        assert data_lines(post(conn, {}).read()) == ['{"a": 1}']


def test_close_delimited_stream(fb: FakeBackend) -> None:
    fb.reply(StreamReply([{"a": 1}, {"b": 2}], chunked=False))
    raw = raw_post(fb, {"stream": True})
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert b"content-length" not in head.lower()
    assert b"connection: close" in head.lower()
    assert body == b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
    with connect(fb) as conn:  # http.client reads it to EOF too
        fb.reply(StreamReply([{"a": 1}], chunked=False))
        assert data_lines(post(conn, {}).read()) == ['{"a": 1}', "[DONE]"]


def test_cut_after_ends_chunked_stream_without_terminator(fb: FakeBackend) -> None:
    fb.reply(StreamReply([{"n": i} for i in range(5)], cut_after=2))
    raw = raw_post(fb, {"stream": True})
    assert b'{"n": 1}' in raw
    assert b'{"n": 2}' not in raw
    assert b"[DONE]" not in raw
    assert not raw.endswith(b"0\r\n\r\n")
    fb.reply(StreamReply([{"n": i} for i in range(5)], cut_after=2))
    with connect(fb) as conn, pytest.raises(http.client.IncompleteRead):
        post(conn, {"stream": True}).read()


def test_cut_after_close_delimited(fb: FakeBackend) -> None:
    fb.reply(StreamReply([{"n": 0}, {"n": 1}], chunked=False, cut_after=2))
    body = raw_post(fb, {"stream": True}).partition(b"\r\n\r\n")[2]
    assert data_lines(body) == ['{"n": 0}', '{"n": 1}']


def test_wait_closed_detects_client_hang_up(fb: FakeBackend) -> None:
    fb.reply(StreamReply([{"n": i} for i in range(100)], delay=0.2))  # 20 s unless hung up on
    assert fb.wait_closed(1, timeout=0.05) is False
    with connect(fb) as conn:
        resp = post(conn, {"stream": True})
        assert resp.readline().startswith(b"data: ")
        resp.close()
    started = time.monotonic()
    assert fb.wait_closed(1, timeout=15.0) is True
    assert time.monotonic() - started < 15
    assert fb.closed_by_client == 1


def test_connection_usable_after_complete_chunked_stream(fb: FakeBackend) -> None:
    fb.reply(StreamReply([{"a": 1}]), JSONReply(completion("next")))
    with connect(fb) as conn:
        post(conn, {"stream": True}).read()
        sock = conn.sock
        assert json.loads(post(conn, {}).read())["choices"][0]["message"]["content"] == "next"
        assert conn.sock is sock


# --- builders -------------------------------------------------------------------------------


def test_completion_builder() -> None:
    body = completion(
        None,
        finish_reason="tool_calls",
        cached_tokens=4,
        extra_message={"reasoning_content": "hmm", "tool_calls": []},
        extra_choice={"stop_reason": "###"},
    )
    choice = body["choices"][0]
    assert body["object"] == "chat.completion"
    assert choice["message"] == {
        "role": "assistant",
        "content": None,
        "reasoning_content": "hmm",
        "tool_calls": [],
    }
    assert choice["finish_reason"] == "tool_calls"
    assert choice["stop_reason"] == "###"
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}
    assert "usage" not in completion(usage=None)
    assert "prompt_tokens_details" not in completion()["usage"]  # the default is not mutated


def test_chunks_openai() -> None:
    events = chunks(["Hel", "lo"], cached_tokens=3)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"].get("content") for e in events[1:3]] == ["Hel", "lo"]
    assert events[3]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert all(e["usage"] is None for e in events[:4])
    assert events[4]["choices"] == []
    assert events[4]["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}


def test_chunks_vllm_shares_last_piece_with_finish() -> None:
    events = chunks(["Hel", "lo"], dialect="vllm", extra_choice={"stop_reason": "###"})
    assert len(events) == 4
    finish = events[2]["choices"][0]
    assert finish["delta"] == {"content": "lo"}
    assert finish["finish_reason"] == "stop"
    assert finish["stop_reason"] == "###"
    assert events[3]["choices"] == [] and events[3]["usage"]["total_tokens"] == 15


def test_chunks_llamacpp_usage_on_finish_chunk() -> None:
    events = chunks(["Hi"], dialect="llamacpp", finish_reason="length")
    assert len(events) == 3
    finish = events[-1]
    assert finish["choices"][0]["finish_reason"] == "length"
    assert finish["usage"]["completion_tokens"] == 5
    assert finish["timings"]["predicted_n"] == 5


@pytest.mark.parametrize("dialect", ["openai", "vllm", "llamacpp"])
def test_chunks_without_usage(dialect: str) -> None:
    events = chunks(["a"], dialect=dialect, usage=None)
    assert all("usage" not in e for e in events)
    assert all(e["choices"] for e in events)


def test_chunks_rejects_unknown_dialect() -> None:
    with pytest.raises(ValueError):
        chunks(["a"], dialect="nope")


def test_chunk_builder() -> None:
    call = {
        "tool_calls": [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "f", "arguments": ""},
            }
        ]
    }
    event = chunk(call)
    assert event["object"] == "chat.completion.chunk"
    assert event["choices"][0]["delta"] == call
    assert event["choices"][0]["finish_reason"] is None


def test_stream_built_from_chunks_round_trips(fb: FakeBackend) -> None:
    events = chunks(["x", "y"], dialect="vllm")
    fb.reply(StreamReply(events))
    with closing(http.client.HTTPConnection("127.0.0.1", fb.port, timeout=5)) as conn:
        lines = data_lines(post(conn, {"stream": True}).read())
    assert [json.loads(line) for line in lines[:-1]] == events
