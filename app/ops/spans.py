"""A request's spans: its SERVER span and its attempts' CLIENT spans (app.ops.tracing says
when and why). Imported only when tracing is on: OpenTelemetry's API takes a tenth of a second
or more to import, which a gateway without tracing, and every command-line tool, is spared.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from app.ops.tracing import (
    answer_attributes,
    attempt_attributes,
    error_type,
    request_attributes,
    server_attributes,
)
from app.serving.outcome import RequestOutcome

# W3C trace context only: baggage is the client's to send on, not the gateway's.
PROPAGATOR = TraceContextTextMapPropagator()


class EnvironGetter(Getter[Mapping[str, Any]]):
    """Reads a header from a WSGI environ (``traceparent`` is ``HTTP_TRACEPARENT``)."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get("HTTP_" + key.upper().replace("-", "_"))
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return []


ENVIRON_GETTER = EnvironGetter()


class AttemptSpan:
    """One backend attempt's CLIENT span, and the headers that carry it to the backend. A
    failed attempt ends at once; the one that answered ends with the request, when its
    usage and finish reason are known, at the time its answer was over (``done``)."""

    __slots__ = ("span", "headers", "started", "done_at", "ended", "response_model")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.headers: dict[str, str] = {}
        PROPAGATOR.inject(self.headers, context=trace.set_span_in_context(span))
        self.started = time.monotonic()
        self.done_at: int | None = None  # ns since the epoch, as spans take it
        self.ended = False
        self.response_model: str | None = None  # what the backend's answer named, if it did

    def done(self) -> None:
        """The backend's answer is over (the dispatcher gave its slot back)."""
        if self.done_at is None:
            self.done_at = time.time_ns()

    def failed(self, error: BaseException) -> None:
        """The attempt failed before an answer came: it ends now, with the error's type."""
        if self.ended:
            return
        self.ended = True
        span = self.span
        if span.is_recording():
            kind = error_type(error)
            span.set_attribute("error.type", kind)
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    def close(self, outcome: RequestOutcome, request_started: float) -> None:
        """The answering attempt, at the request's end: what the answer said (usage, finish
        reason, time to its first chunk), and its end when its answer was over."""
        if self.ended:
            return
        self.ended = True
        span = self.span
        if span.is_recording():
            span.set_attributes(answer_attributes(outcome, self.started - request_started))
            if self.response_model:
                span.set_attribute("gen_ai.response.model", self.response_model)
            if outcome.error:
                span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=self.done_at)


class RequestTrace:
    """A request's SERVER span, and the attempts' spans under it."""

    __slots__ = ("tracer", "span", "attempt")

    def __init__(self, tracer: Tracer, environ: Mapping[str, Any], route: str | None) -> None:
        self.tracer = tracer
        method = environ.get("REQUEST_METHOD", "GET")
        parent = PROPAGATOR.extract(environ, getter=ENVIRON_GETTER)
        name = f"{method} {route}" if route else method
        self.span = span = tracer.start_span(name, context=parent, kind=SpanKind.SERVER)
        if span.is_recording():
            span.set_attributes(request_attributes(environ, route))
        self.attempt: AttemptSpan | None = None

    def begin_attempt(
        self,
        *,
        backend: str,
        provider: str,
        model: str,
        url: str,
        stream: bool,
        max_tokens: object = None,
    ) -> AttemptSpan:
        """A CLIENT span for an attempt about to go out, a child of the request's span."""
        parent = trace.set_span_in_context(self.span)
        span = self.tracer.start_span(f"chat {model}", context=parent, kind=SpanKind.CLIENT)
        if span.is_recording():
            span.set_attributes(attempt_attributes(backend, provider, model, url, stream))
            if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
                span.set_attribute("gen_ai.request.max_tokens", max_tokens)
        self.attempt = AttemptSpan(span)
        return self.attempt

    def end(self, outcome: RequestOutcome, started: float) -> None:
        """The request is over: the answering attempt's span, then the request's."""
        if self.attempt is not None:
            self.attempt.close(outcome, started)
        span = self.span
        if span.is_recording():
            span.set_attributes(server_attributes(outcome))
            if (outcome.status or 0) >= 500:
                span.set_status(Status(StatusCode.ERROR))
        span.end()
