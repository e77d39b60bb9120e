"""The tracing module's pure parts: when the environment turns traces on, what each span says,
and how a request's spans hang together (an in-memory exporter: no collector, no socket; the
OTLP export through real gunicorn is tests/system/test_tracing.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from app.errors import Overloaded, UpstreamTimeout
from app.ops import tracing
from app.ops.spans import RequestTrace
from app.ops.tracing import plan
from app.serving.outcome import Answer, RequestOutcome, Tokens

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}


def test_traces_are_off_without_an_endpoint():
    assert not plan({}).enabled
    assert not plan({"OTEL_SERVICE_NAME": "gw", "OTEL_TRACES_SAMPLER": "always_on"}).enabled


@pytest.mark.parametrize(
    "variable", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
)
def test_either_endpoint_variable_turns_traces_on(variable):
    assert plan({variable: "http://collector:4318"}).enabled


@pytest.mark.parametrize(
    "extra",
    [
        {"OTEL_SDK_DISABLED": "true"},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_TRACES_EXPORTER": "console"},
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
    ],
)
def test_a_disabled_sdk_or_an_exporter_the_gateway_lacks_keeps_traces_off(extra):
    decided = plan({**ENDPOINT, **extra})
    assert not decided.enabled and decided.reason


def test_the_protocol_the_gateway_ships_may_be_named():
    assert plan({**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}).enabled
    assert plan({**ENDPOINT, "OTEL_TRACES_EXPORTER": "otlp"}).enabled


def test_tracing_is_off_in_a_process_that_never_started_it():
    assert tracing.tracer is None
    assert tracing.begin({"REQUEST_METHOD": "POST"}, "/v1/messages") is None


@pytest.fixture
def exported() -> Iterator[tuple[InMemorySpanExporter, TracerProvider]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter, provider
    provider.shutdown()


def outcome(**fields: object) -> RequestOutcome:
    made = RequestOutcome(
        request_id="req_1", method="POST", path="/v1/messages", worker=1, client=None,
        key="alice", forwarded_for=None,
    )  # fmt: skip
    for name, value in fields.items():
        setattr(made, name, value)
    return made


ENVIRON = {
    "REQUEST_METHOD": "POST",
    "PATH_INFO": "/v1/messages",
    "HTTP_TRACEPARENT": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
}


def begin_attempt(trace: RequestTrace, backend: str = "good", model: str = "m") -> object:
    return trace.begin_attempt(
        backend=backend,
        provider="vllm",
        model=model,
        url="http://user:pw@127.0.0.1:8000/v1",
        stream=True,
        max_tokens=64,
    )


def test_a_request_continues_the_callers_trace_and_its_attempts_are_children(exported):
    exporter, provider = exported
    trace = RequestTrace(provider.get_tracer("t"), ENVIRON, "/v1/messages")
    first = begin_attempt(trace, "flaky", "m1")
    first.failed(Overloaded("busy"))
    second = begin_attempt(trace, "good", "m2")
    second.done()
    answered = outcome(
        status=200, answer=Answer("end_turn", Tokens(input=3, output=5, cached=4)), ttft=0.5
    )
    trace.end(answered, second.started - 0.2)

    spans = {s.name: s for s in exporter.get_finished_spans()}
    server, failed, ok = spans["POST /v1/messages"], spans["chat m1"], spans["chat m2"]
    assert server.kind is SpanKind.SERVER and failed.kind is ok.kind is SpanKind.CLIENT
    assert server.context.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736
    assert server.parent.span_id == 0x00F067AA0BA902B7
    assert failed.parent.span_id == ok.parent.span_id == server.context.span_id
    assert failed.attributes["error.type"] == "overloaded_error"
    assert failed.status.status_code is StatusCode.ERROR
    assert ok.end_time == second.done_at
    assert ok.attributes["gen_ai.usage.input_tokens"] == 7  # the cached part counted in
    assert ok.attributes["gen_ai.usage.cache_read.input_tokens"] == 4
    assert ok.attributes["gen_ai.response.finish_reasons"] == ("end_turn",)
    # From the attempt's start, which came 0.2 s after the request's.
    assert ok.attributes["gen_ai.response.time_to_first_chunk"] == pytest.approx(0.3)
    assert ok.attributes["server.address"] == "127.0.0.1"  # not the URL's credentials
    assert server.attributes["http.response.status_code"] == 200


def test_each_attempt_carries_its_own_span_to_the_backend(exported):
    _, provider = exported
    trace = RequestTrace(provider.get_tracer("t"), ENVIRON, "/v1/messages")
    attempt = begin_attempt(trace)
    context = attempt.span.get_span_context()
    expected = f"00-{context.trace_id:032x}-{context.span_id:016x}-01"
    assert attempt.headers == {"traceparent": expected}


def test_an_unsampled_request_still_passes_its_context_on_and_records_nothing(exported):
    exporter, _ = exported
    provider = TracerProvider(sampler=ALWAYS_OFF, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace = RequestTrace(provider.get_tracer("t"), {"REQUEST_METHOD": "POST"}, None)
    attempt = begin_attempt(trace)
    trace.end(outcome(status=200), 0.0)
    assert int(attempt.headers["traceparent"].split("-")[3], 16) & 1 == 0  # sampled: no
    assert exporter.get_finished_spans() == ()


def test_a_server_error_marks_the_request_span_and_a_stream_error_the_attempt(exported):
    exporter, provider = exported
    trace = RequestTrace(provider.get_tracer("t"), {"REQUEST_METHOD": "POST"}, None)
    begin_attempt(trace)
    trace.end(outcome(status=504, error="timeout_error"), 0.0)
    spans = {s.kind: s for s in exporter.get_finished_spans()}
    assert spans[SpanKind.SERVER].name == "POST"  # no route matched
    assert spans[SpanKind.SERVER].attributes["error.type"] == "timeout_error"
    assert spans[SpanKind.SERVER].status.status_code is StatusCode.ERROR
    assert spans[SpanKind.CLIENT].attributes["error.type"] == "timeout_error"


def test_an_attempt_span_ends_once(exported):
    exporter, provider = exported
    trace = RequestTrace(provider.get_tracer("t"), ENVIRON, "/v1/messages")
    attempt = begin_attempt(trace)
    attempt.failed(UpstreamTimeout("slow"))
    attempt.failed(UpstreamTimeout("slow"))
    trace.end(outcome(status=504), 0.0)
    assert len(exporter.get_finished_spans()) == 2


def test_an_error_type_is_the_gateways_name_for_it_or_the_exceptions_class():
    assert tracing.error_type(UpstreamTimeout("backend x did not answer")) == "timeout_error"
    assert tracing.error_type(KeyError("secret")) == "KeyError"


def test_the_server_span_names_the_key_never_what_it_is():
    found = tracing.server_attributes(outcome(status=200, client="c_1234", route="r"))
    assert found["gateway.key_name"] == "alice"
    assert "c_1234" not in found.values()
    assert "error.type" not in found
