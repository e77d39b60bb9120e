"""Spans in process, on paths the gunicorn tests (tests/system/test_tracing.py) do not take: an
Anthropic-speaking backend gets the attempt's ``traceparent`` beside the client's Anthropic
headers, and a backend that fails marks its attempt's span and the request's. The gateway's
tracer is an SDK tracer with an in-memory exporter, set where ``tracing.start`` sets it."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import requests
from fakebackend import FakeBackend, HangReply, JSONReply
from inprocess import GatewayServer
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from waiting import eventually

from app.ops import tracing

MESSAGE = {
    "id": "msg_backend",
    "type": "message",
    "role": "assistant",
    "model": "native-model-2",
    "content": [{"type": "text", "text": "native answer"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 3, "cache_read_input_tokens": 2},
}
BODY = {"model": "claude-x", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exported = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exported))
    monkeypatch.setattr(tracing, "tracer", provider.get_tracer("test"))
    yield exported
    provider.shutdown()


def native_gateway(backend: FakeBackend) -> GatewayServer:
    return GatewayServer(
        {
            "upstream": {"url": backend.url, "protocol": "anthropic", "model": "native-model"},
            "routing": {"retries": 0},
        }
    )


def test_an_anthropic_backend_gets_the_attempts_traceparent(backend, exporter):
    backend.routes[("POST", "/v1/messages")] = lambda req: JSONReply(MESSAGE)
    gateway = native_gateway(backend)
    try:
        reply = requests.post(
            gateway.url + "/v1/messages",
            json=BODY,
            headers={"anthropic-version": "2023-06-01", "traceparent": "00-" + "ab" * 16 + "-"
                     + "cd" * 8 + "-01"},
            timeout=10,
        )  # fmt: skip
    finally:
        gateway.close()
    assert reply.status_code == 200, reply.text
    spans = eventually(lambda: exporter.get_finished_spans() or None, "the spans")
    (client,) = [s for s in spans if s.kind is SpanKind.CLIENT]
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER]
    sent = backend.requests[-1].headers
    assert sent["anthropic-version"] == "2023-06-01"
    assert sent["traceparent"] == f"00-{'ab' * 16}-{client.context.span_id:016x}-01"
    assert client.parent.span_id == server.context.span_id
    assert client.attributes["gen_ai.provider.name"] == "generic"
    assert client.attributes["gen_ai.response.model"] == "native-model-2"
    assert client.attributes["gen_ai.usage.input_tokens"] == 14
    assert client.attributes["gen_ai.usage.cache_read.input_tokens"] == 2
    assert json.loads(backend.requests[-1].body)["model"] == "native-model"


def both(exporter: InMemorySpanExporter) -> tuple[ReadableSpan, ...] | None:
    found = exporter.get_finished_spans()
    return found if len(found) == 2 else None


def test_a_backend_that_fails_marks_its_attempt_and_the_request(backend, exporter):
    backend.reply(HangReply(0.1))  # closes the connection without an answer
    gateway = GatewayServer({"upstream": {"url": backend.url}, "routing": {"retries": 0}})
    try:
        reply = requests.post(gateway.url + "/v1/messages", json=BODY, timeout=10)
    finally:
        gateway.close()
    assert reply.status_code == 502
    spans = eventually(lambda: both(exporter), "both spans")
    client = next(s for s in spans if s.kind is SpanKind.CLIENT)
    server = next(s for s in spans if s.kind is SpanKind.SERVER)
    assert client.attributes["error.type"] == "api_error"
    assert client.status.status_code is StatusCode.ERROR
    assert server.attributes["http.response.status_code"] == 502
    assert server.attributes["error.type"] == "api_error"
    assert server.status.status_code is StatusCode.ERROR
    assert client.end_time <= server.end_time
