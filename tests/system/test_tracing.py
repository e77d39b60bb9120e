"""OpenTelemetry traces from real gunicorn gevent workers, received by a small OTLP/HTTP
receiver on 127.0.0.1 that decodes the protobuf: what each span says, how the spans hang
together, the ``traceparent`` the backend is sent, what never appears in them, and a collector
that never answers costing the requests nothing."""

from __future__ import annotations

import gzip
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from fakebackend import FakeBackend, JSONReply, StreamReply, chunks, completion, error_body
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from servers import Gunicorn
from waiting import eventually

CLIENT_KEY = "sk-client-key-a1b2c3d4e5f6"
BACKEND_KEY = "sk-backend-key-0f9e8d7c6b5a"
GOOD_KEY = "sk-good-backend-key-77aa88bb"
PROMPT = "the secret prompt about aubergines"
ANSWER = "the secret answer about artichokes"
SERVER = Span.SpanKind.SPAN_KIND_SERVER
CLIENT = Span.SpanKind.SPAN_KIND_CLIENT


class Receiver:
    """An OTLP/HTTP traces endpoint: keeps every request's raw bytes and decoded spans."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    data = gzip.decompress(data)
                request = ExportTraceServiceRequest()
                request.ParseFromString(data)
                with receiver.lock:
                    receiver.bodies.append(data)
                    for resource in request.resource_spans:
                        for scope in resource.scope_spans:
                            receiver.spans.extend(scope.spans)
                    receiver.resources = [r.resource for r in request.resource_spans]
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.resources: list[Any] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def trace(self, trace_id: bytes, count: int) -> list[Span]:
        """The spans of one trace, once ``count`` of them have come."""

        def found() -> list[Span] | None:
            with self.lock:
                spans = [s for s in self.spans if s.trace_id == trace_id]
            return spans if len(spans) >= count else None

        return eventually(found, f"{count} spans of trace {trace_id.hex()}")


class BlackHole:
    """A collector that accepts connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)  # read nothing, answer nothing

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def attributes(span: Span) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for item in span.attributes:
        value = item.value
        kind = value.WhichOneof("value")
        if kind == "array_value":
            found[item.key] = [getattr(v, v.WhichOneof("value")) for v in value.array_value.values]
        else:
            found[item.key] = getattr(value, kind)
    return found


@dataclass
class World:
    gateway: Gunicorn
    receiver: Receiver
    flaky: FakeBackend
    good: FakeBackend


def config(directory: Path, flaky: FakeBackend, good: FakeBackend) -> Path:
    path = directory / "gateway.toml"
    path.write_text(
        f"""
[routing]
retries = 2
backoff = 0.01
breaker_failures = 100
[[auth.keys]]
name = "alice"
key_env = "ALICE_KEY"
[[backends]]
name = "flaky"
url = "{flaky.url}"
api_key = "{BACKEND_KEY}"
[[backends]]
name = "good"
url = "{good.url}"
api_key = "{GOOD_KEY}"
dialect = "vllm"
[[routes]]
name = "failover"
match = "claude-failover"
targets = [
  {{ backend = "flaky", model = "flaky-model" }},
  {{ backend = "good", model = "good-model" }},
]
[[routes]]
name = "plain"
match = "*"
targets = [{{ backend = "good", model = "good-model" }}]
"""
    )
    return path


def otel_env(endpoint: str, **more: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_SERVICE_NAME": "gateway-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "ALICE_KEY": CLIENT_KEY,
        **more,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    directory = tmp_path_factory.mktemp("tracing")
    receiver = Receiver()
    with FakeBackend() as flaky, FakeBackend() as good:
        env = {"GATEWAY_CONFIG": str(config(directory, flaky, good)), **otel_env(receiver.url)}
        gateway = Gunicorn(env, directory / "gunicorn.log")
        try:
            yield World(gateway, receiver, flaky, good)
        finally:
            gateway.stop()
            receiver.close()


def post(url: str, body: dict[str, Any], **headers: str) -> requests.Response:
    return requests.post(
        url + "/v1/messages", json=body, headers={"x-api-key": CLIENT_KEY, **headers}, timeout=30
    )


def message(model: str = "claude-haiku-4-5", **more: Any) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 50,
        "messages": [{"role": "user", "content": PROMPT}],
        **more,
    }


PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"


def test_a_request_is_a_server_span_with_a_chat_client_span_under_it(world):
    world.good.reply(JSONReply(completion(ANSWER, model="good-model-v2", cached_tokens=4)))
    traceparent = f"00-{PARENT_TRACE}-{PARENT_SPAN}-01"
    reply = post(world.gateway.url, message(), traceparent=traceparent)
    assert reply.status_code == 200, reply.text

    spans = world.receiver.trace(bytes.fromhex(PARENT_TRACE), 2)
    (server,) = [s for s in spans if s.kind == SERVER]
    (client,) = [s for s in spans if s.kind == CLIENT]
    # The client's trace is continued: the request's span is a child of the caller's.
    assert server.parent_span_id == bytes.fromhex(PARENT_SPAN)
    assert client.parent_span_id == server.span_id
    assert server.name == "POST /v1/messages"
    assert client.name == "chat good-model"
    served = attributes(server)
    assert served["http.request.method"] == "POST"
    assert served["http.route"] == "/v1/messages"
    assert served["http.response.status_code"] == 200
    assert served["gateway.request_id"] == reply.headers["request-id"]
    assert served["gateway.key_name"] == "alice"
    asked = attributes(client)
    assert asked["gen_ai.operation.name"] == "chat"
    assert asked["gen_ai.provider.name"] == "vllm"
    assert asked["gen_ai.request.model"] == "good-model"
    assert asked["gen_ai.response.model"] == "good-model-v2"
    assert asked["gen_ai.request.max_tokens"] == 50
    assert asked["gen_ai.usage.input_tokens"] == 10  # the prompt, its cached part included
    assert asked["gen_ai.usage.cache_read.input_tokens"] == 4
    assert asked["gen_ai.usage.output_tokens"] == 5
    assert asked["gen_ai.response.finish_reasons"] == ["end_turn"]
    assert asked["server.address"] == "127.0.0.1"
    assert asked["server.port"] == world.good.port
    assert "error.type" not in asked
    # Inside the request's span in time.
    assert server.start_time_unix_nano <= client.start_time_unix_nano
    assert client.end_time_unix_nano <= server.end_time_unix_nano

    # The backend was sent the attempt's own context, in the same trace.
    sent = world.good.requests[-1].headers["traceparent"]
    assert sent == f"00-{PARENT_TRACE}-{client.span_id.hex()}-01"


def test_a_failover_is_two_client_spans_and_each_attempt_sends_its_own_context(world):
    world.flaky.reply(JSONReply(error_body("overloaded", error_type="server_error"), status=503))
    flaky_before, good_before = len(world.flaky.requests), len(world.good.requests)
    reply = post(world.gateway.url, message("claude-failover"))
    assert reply.status_code == 200, reply.text

    trace_id = bytes.fromhex(world.good.requests[-1].headers["traceparent"].split("-")[1])
    spans = world.receiver.trace(trace_id, 3)
    (server,) = [s for s in spans if s.kind == SERVER]
    clients = sorted((s for s in spans if s.kind == CLIENT), key=lambda s: s.start_time_unix_nano)
    assert [c.name for c in clients] == ["chat flaky-model", "chat good-model"]
    assert all(c.parent_span_id == server.span_id for c in clients)
    failed, answered = (attributes(c) for c in clients)
    assert failed["gateway.backend"] == "flaky" and failed["error.type"] == "overloaded_error"
    assert clients[0].status.code == clients[0].status.STATUS_CODE_ERROR
    assert answered["gateway.backend"] == "good" and "error.type" not in answered
    # Each backend saw the context of its own attempt.
    assert len(world.flaky.requests) == flaky_before + 1
    assert len(world.good.requests) == good_before + 1
    for backend, span in ((world.flaky, clients[0]), (world.good, clients[1])):
        assert backend.requests[-1].headers["traceparent"].split("-")[1:3] == [
            trace_id.hex(),
            span.span_id.hex(),
        ]


def test_a_streamed_request_ends_its_span_once_the_last_byte_has_gone(world):
    events = chunks(["Hel", "lo"], usage={"prompt_tokens": 7, "completion_tokens": 2})
    # The last events come half a second after the first: a span that ended when the view
    # returned would end before the backend had even sent them.
    stream = StreamReply(events, delay=0.1, first_delay=0.1)
    world.good.reply(stream)
    with post(world.gateway.url, message(stream=True)) as reply:
        assert reply.status_code == 200
        body = reply.content
    assert b"message_stop" in body

    trace_id = bytes.fromhex(world.good.requests[-1].headers["traceparent"].split("-")[1])
    spans = world.receiver.trace(trace_id, 2)
    (server,) = [s for s in spans if s.kind == SERVER]
    (client,) = [s for s in spans if s.kind == CLIENT]
    # The backend's last event was written at sent_at[-1] (monotonic); in wall time, no
    # earlier than the stream's start plus the delays before it.
    last_sent = (stream.sent_at[-1] - stream.sent_at[0]) * 1e9
    assert server.end_time_unix_nano - client.start_time_unix_nano > last_sent
    assert client.end_time_unix_nano - client.start_time_unix_nano > last_sent
    assert client.end_time_unix_nano <= server.end_time_unix_nano
    asked = attributes(client)
    assert asked["gen_ai.request.stream"] is True
    assert asked["gen_ai.usage.input_tokens"] == 7
    assert asked["gen_ai.usage.output_tokens"] == 2
    ttft = asked["gen_ai.response.time_to_first_chunk"]
    assert 0.05 < ttft < (client.end_time_unix_nano - client.start_time_unix_nano) / 1e9


def test_no_prompt_answer_or_key_is_in_what_is_exported(world):
    world.good.reply(JSONReply(completion(ANSWER)))
    assert post(world.gateway.url, message()).status_code == 200
    world.flaky.reply(JSONReply(error_body(f"bad request: {PROMPT}"), status=400))
    assert post(world.gateway.url, message("claude-failover")).status_code == 400
    world.good.reply(StreamReply(chunks([ANSWER])))
    assert post(world.gateway.url, message(stream=True)).status_code == 200
    before = len(world.receiver.spans)
    eventually(lambda: len(world.receiver.spans) >= before + 2, "the last spans")
    exported = b"".join(world.receiver.bodies)
    assert b"alice" in exported  # the key's name is there: the check reads the right bytes
    for secret in (CLIENT_KEY, BACKEND_KEY, GOOD_KEY, PROMPT, ANSWER, "aubergines"):
        assert secret.encode() not in exported, secret
    names = {r.attributes[0].key for r in world.receiver.resources if r.attributes}
    assert names  # a resource came with the spans
    service = {
        a.value.string_value
        for r in world.receiver.resources
        for a in r.attributes
        if a.key == "service.name"
    }
    assert service == {"gateway-under-test"}


def test_sampling_at_ratio_zero_exports_nothing(tmp_path):
    receiver = Receiver()
    with FakeBackend() as backend:
        env = {
            "GATEWAY_UPSTREAM_URL": backend.url,
            **otel_env(
                receiver.url, OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG="0"
            ),
        }
        gateway = Gunicorn(env, tmp_path / "gunicorn.log")
        try:
            for _ in range(5):
                assert post(gateway.url, message()).status_code == 200
            # The master never started the SDK: its batch thread would be a thread of its own
            # there (in a worker it is a greenlet), and a fork would not carry it over.
            assert os.listdir(f"/proc/{gateway.process.pid}/task") == [str(gateway.process.pid)]
        finally:
            gateway.stop()  # the worker's exit flushes what it has
            receiver.close()
    # The context still goes on, marked as not sampled (flags bit 0).
    flags = backend.requests[-1].headers["traceparent"].split("-")[3]
    assert int(flags, 16) & 1 == 0
    assert receiver.spans == []


def test_spans_queued_at_a_worker_exit_are_sent_then(tmp_path):
    receiver = Receiver()
    with FakeBackend() as backend:
        env = {
            "GATEWAY_UPSTREAM_URL": backend.url,
            **otel_env(receiver.url, OTEL_BSP_SCHEDULE_DELAY="60000"),
        }
        gateway = Gunicorn(env, tmp_path / "gunicorn.log")
        try:
            assert post(gateway.url, message()).status_code == 200
            time.sleep(0.5)
            assert receiver.spans == []  # a minute's batch: nothing sent yet
        finally:
            gateway.stop()
            receiver.close()
    assert sorted(s.kind for s in receiver.spans) == [SERVER, CLIENT]


def test_requests_are_served_with_the_collector_black_holed(tmp_path):
    hole = BlackHole()
    with FakeBackend() as backend:
        env = {
            "GATEWAY_UPSTREAM_URL": backend.url,
            # Every request's spans go straight into an export that never returns.
            **otel_env(hole.url, OTEL_BSP_MAX_EXPORT_BATCH_SIZE="1", OTEL_BSP_MAX_QUEUE_SIZE="8"),
        }
        gateway = Gunicorn(env, tmp_path / "gunicorn.log")
        try:
            backend.default = JSONReply(completion(ANSWER))
            for _ in range(40):
                reply = post(gateway.url, message())
                assert reply.status_code == 200
                assert ANSWER in reply.json()["content"][0]["text"]
            backend.default = None
            backend.reply(*(StreamReply(chunks(["a", "b"])) for _ in range(5)))
            for _ in range(5):
                assert b"message_stop" in post(gateway.url, message(stream=True)).content
            eventually(lambda: hole.held, "the exporter to connect to the collector")
        finally:
            gateway.stop()
            hole.close()
