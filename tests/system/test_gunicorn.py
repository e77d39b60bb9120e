"""The production server: real ``gunicorn -c gunicorn.conf.py wsgi:app`` with the gevent worker."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest
import requests
from fakebackend import FakeBackend, JSONReply, StreamReply, chunk, chunks, error_body
from servers import GUNICORN, ROOT, Gunicorn, free_port
from waiting import eventually

BODY = {
    "model": "claude-haiku-4-5",
    "max_tokens": 50,
    "messages": [{"role": "user", "content": "hi"}],
}


@pytest.fixture(scope="module")
def server(module_backend: FakeBackend, tmp_path_factory) -> Iterator[Gunicorn]:
    log_path = tmp_path_factory.mktemp("gunicorn") / "gunicorn.log"
    env = {"GATEWAY_UPSTREAM_URL": module_backend.url, "GATEWAY_RETRIES": "0"}
    gunicorn = Gunicorn(env, log_path)
    yield gunicorn
    gunicorn.stop()


@pytest.fixture
def sdk(server: Gunicorn) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.url, api_key="k", max_retries=0) as client:
        yield client


def read_events(port: int, body: dict) -> Iterator[tuple[float, str]]:
    """(arrival time, event name) for each SSE event, read line by line off the socket."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/messages", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        while line := response.readline():
            if line.startswith(b"event: "):
                yield time.monotonic(), line[7:].strip().decode()
    finally:
        conn.close()


def test_events_arrive_as_the_backend_produces_them(server, module_backend):
    pieces = [f"w{i} " for i in range(8)]
    reply = StreamReply(chunks(pieces), first_delay=0.1, delay=0.5)
    module_backend.reply(reply)
    arrivals = list(read_events(server.port, {**BODY, "stream": True}))
    names = [name for _, name in arrivals]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    deltas = [t for t, name in arrivals if name == "content_block_delta"]
    # The backend spreads the answer over ~5 s. A buffered relay would deliver nothing before
    # the backend's last event; a streaming one has delivered most of the text by then.
    last_sent = reply.sent_at[-1]
    assert deltas[0] < last_sent
    assert sum(t < last_sent for t in deltas) >= len(deltas) // 2


def test_message_start_does_not_wait_for_the_first_token(server, module_backend):
    """A backend that sends its role chunk at once and then takes its time over the first
    token: the client has the response head and message_start before that token is sent."""
    reply = StreamReply(chunks(["late"]), delay=3.0)
    module_backend.reply(reply)
    arrivals = list(read_events(server.port, {**BODY, "stream": True}))
    first = {name: t for t, name in reversed(arrivals)}
    token_sent = reply.sent_at[1]  # the role chunk is event 0, the first token event 1
    assert first["message_start"] < token_sent
    assert first["content_block_delta"] >= token_sent


def test_sdk_create_and_stream_through_gunicorn(sdk, module_backend):
    module_backend.reply(StreamReply(chunks(["Hello", ", world"], dialect="vllm")))
    with sdk.messages.stream(**BODY) as stream:
        message = stream.get_final_message()
    assert message.content[0].text == "Hello, world"
    assert message.model == "claude-haiku-4-5"
    assert sdk.messages.create(**BODY).content[0].text == "Hello"


def test_access_log_line_carries_the_request_id(server, sdk, module_backend):
    module_backend.reply(StreamReply(chunks(["x"])))
    response = sdk.messages.with_raw_response.create(**BODY, stream=True)
    for _ in response.parse():
        pass
    request_id = response.headers["request-id"]
    matching = eventually(
        lambda: [e for e in server.access_lines() if e["request_id"] == request_id],
        "no access log line for the request",
    )
    entry = matching[0]
    assert entry["status"] == 200 and entry["stream"] is True
    assert entry["stop_reason"] == "end_turn" and entry["client_disconnected"] is False
    assert module_backend.requests[-1].headers["x-request-id"] == request_id


def test_client_disconnect_closes_the_backend_stream(server, module_backend):
    before = module_backend.closed_by_client
    module_backend.reply(StreamReply(chunks([f"t{i}" for i in range(400)]), delay=0.02))
    events = read_events(server.port, {**BODY, "stream": True})
    for _, name in events:
        if name == "content_block_delta":
            break
    events.close()  # hang up mid-stream
    assert module_backend.wait_closed(before + 1, timeout=30)


def test_backend_failures_do_not_take_the_worker_down(server, sdk, module_backend):
    pid_before = _worker_pids(server)
    module_backend.reply(
        JSONReply(error_body("boom"), status=500),
        StreamReply(chunks(["a", "b"]), cut_after=1),
    )
    with pytest.raises(anthropic.InternalServerError):
        sdk.messages.create(**BODY)
    with pytest.raises(anthropic.APIStatusError):
        with sdk.messages.stream(**BODY) as stream:
            stream.get_final_message()
    assert sdk.messages.create(**BODY).content[0].text == "Hello"
    assert _worker_pids(server) == pid_before


def _worker_pids(server: Gunicorn) -> set[int]:
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
    return {int(p) for p in children.read_text().split()}


def test_bad_config_stops_gunicorn_with_one_clear_line(tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text('[upstream]\nurl = "http://127.0.0.1:1/v1"\nread_timeout = "soon"\n')
    result = subprocess.run(
        [str(GUNICORN), "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT,
        env={
            **os.environ,
            "GATEWAY_CONFIG": str(config),
            "GATEWAY_BIND": f"127.0.0.1:{free_port()}",
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "gateway: bad configuration: upstream.read_timeout: must be a number (got 'soon')"
    ]


def test_agent_loop_streamed_through_gunicorn(sdk, module_backend):
    """A two-tool-call agent loop, every turn streamed, the way SDK-based agents run."""
    tools = [
        {
            "name": "read_file",
            "description": "Read a file.",
            "input_schema": {
                "type": "object",
                "properties": {"path": {"type": "string"}},
                "required": ["path"],
            },
        }
    ]
    files = {"a.txt": "alpha", "b.txt": "beta"}

    def call(call_id: str, path: str) -> list[dict]:
        fragment = {
            "index": 0,
            "id": call_id,
            "type": "function",
            "function": {"name": "read_file"},
        }
        return [
            chunk({"role": "assistant", "content": "Reading."}),
            chunk(
                {"tool_calls": [{**fragment, "function": {"name": "read_file", "arguments": ""}}]}
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"path": '}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": f'"{path}"}}'}}]}),
            chunk({}, "tool_calls"),
        ]

    module_backend.reply(
        StreamReply(call("call_1", "a.txt"), delay=0.01),
        StreamReply(call("call_2", "b.txt"), delay=0.01),
        StreamReply(chunks(["alpha", " and ", "beta"]), delay=0.01),
    )
    messages: list[dict] = [{"role": "user", "content": "Read a.txt then b.txt."}]
    for _turn in range(5):
        with sdk.messages.stream(
            model="claude-sonnet-4-6", max_tokens=200, messages=messages, tools=tools
        ) as stream:
            message = stream.get_final_message()
        messages.append({"role": "assistant", "content": message.content})
        if message.stop_reason != "tool_use":
            break
        results = [
            {"type": "tool_result", "tool_use_id": block.id, "content": files[block.input["path"]]}
            for block in message.content
            if block.type == "tool_use"
        ]
        messages.append({"role": "user", "content": results})
    assert message.stop_reason == "end_turn"
    assert message.content[0].text == "alpha and beta"
    last = module_backend.requests[-1].json["messages"]
    assert [m["role"] for m in last] == ["user", "assistant", "tool", "assistant", "tool"]
    assert last[2] == {"role": "tool", "tool_call_id": "call_1", "content": "alpha"}
    assert last[4] == {"role": "tool", "tool_call_id": "call_2", "content": "beta"}


def test_hup_reloads_config_without_dropping_streams(module_backend, tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text(f'[upstream]\nurl = "{module_backend.url}"\nmodel = "model-a"\n')
    env = {"GATEWAY_CONFIG": str(config), "GATEWAY_GRACEFUL_TIMEOUT": "10"}
    server = Gunicorn(env, tmp_path / "gunicorn.log")
    try:
        stream = StreamReply(chunks([f"t{i} " for i in range(10)]), delay=0.5)  # ~5 s
        module_backend.reply(stream)
        finished: list[list[str]] = []
        reader = threading.Thread(
            target=lambda: finished.append(
                [n for _, n in read_events(server.port, {**BODY, "stream": True})]
            )
        )
        reader.start()
        eventually(lambda: stream.sent_at, "the stream under way")
        config.write_text(f'[upstream]\nurl = "{module_backend.url}"\nmodel = "model-b"\n')
        os.kill(server.process.pid, signal.SIGHUP)
        eventually(
            lambda: _backend_model(server, module_backend) == "model-b", "the new config in use"
        )
        reader.join(timeout=30)
        assert finished and finished[0][-1] == "message_stop"  # the old worker drained it

        config.write_text("[upstream\nbroken")
        os.kill(server.process.pid, signal.SIGHUP)
        eventually(
            lambda: "keeping the last good one" in server.log_path.read_text(),
            "the bad reload logged",
        )
        assert server.process.poll() is None  # the master survives a bad reload
        assert _backend_model(server, module_backend) == "model-b"  # the last good config
    finally:
        server.stop()


def _backend_model(server: Gunicorn, backend: FakeBackend) -> str:
    reply = requests.post(server.url + "/v1/messages", json=BODY, timeout=10)
    assert reply.status_code == 200, reply.text
    return backend.requests[-1].json["model"]


def test_shutdown_ends_a_long_stream_with_an_error_event_not_a_cut(module_backend, tmp_path):
    env = {"GATEWAY_UPSTREAM_URL": module_backend.url, "GATEWAY_GRACEFUL_TIMEOUT": "4"}
    server = Gunicorn(env, tmp_path / "gunicorn.log")
    before = module_backend.closed_by_client
    module_backend.reply(StreamReply(chunks([f"t{i} " for i in range(60)]), delay=0.2))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        body = json.dumps({**BODY, "stream": True})
        conn.request("POST", "/v1/messages", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.readline() == b"event: message_start\n"
        server.process.send_signal(signal.SIGTERM)
        rest = response.read()  # raises IncompleteRead if the stream were cut
    finally:
        conn.close()
        server.stop()
    last = rest.strip().split(b"\n\n")[-1]
    assert last.startswith(b"event: error\n")
    assert json.loads(last.split(b"data: ", 1)[1])["error"]["type"] == "overloaded_error"
    assert b"event: message_stop" not in rest
    assert module_backend.wait_closed(before + 1, timeout=30)


def test_term_with_an_idle_keep_alive_connection_stops_at_once(module_backend, tmp_path):
    """nginx always holds idle keep-alive connections to the gateway: TERM must not wait
    for them to time out (75 s), only for the requests in flight (none here)."""
    env = {"GATEWAY_UPSTREAM_URL": module_backend.url, "GATEWAY_GRACEFUL_TIMEOUT": "60"}
    server = Gunicorn(env, tmp_path / "gunicorn.log")
    idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        idle.request("POST", "/v1/messages", json.dumps(BODY), {"Content-Type": "application/json"})
        assert idle.getresponse().read()  # served; the connection now waits for its next request
        started = time.monotonic()
        server.process.terminate()
        server.process.wait(timeout=30)
        assert time.monotonic() - started < 20  # far from the 60 s it would wait for the idle one
    finally:
        idle.close()
        server.stop()
