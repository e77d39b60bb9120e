"""OpenTelemetry traces, off unless the standard ``OTEL_*`` variables ask for them.

One SERVER span per request, from its first hook to its end (``RequestState.end``: after a
JSON answer is written, or once a stream's last byte has gone), and under it one CLIENT span
per backend attempt (a retry and a failover are attempts of their own), with the GenAI
semantic conventions' ``gen_ai.*`` attributes. An incoming W3C ``traceparent`` is continued,
and each attempt sends its own on to the backend.

The spans are made by hand at the gateway's own seams (app.serving.web, app.backends.dispatch,
app.serving.state), not by the Flask and requests instrumentations: those patch the libraries,
and the Flask one ends a server span before an SSE stream is over.

The SDK starts in each gunicorn worker after it forked and gevent patched it (``start``, from
``post_worker_init``), never in the master, whose threads a fork would not carry over; the
batch processor's thread is then a greenlet. Export goes through a bounded queue to the
OTLP/HTTP exporter in that greenlet, with a timeout, so a collector that is down or slow
costs a request nothing but the span's place in the queue (full, the oldest span is dropped).

What goes into an attribute: names, counts, statuses and error types. Never a prompt, an
answer, a client key or a backend key, nor an error message (a backend's may quote either).
With tracing off, ``tracer`` is None and a request pays one check of it; nor is OpenTelemetry
imported (a tenth of a second or more): the spans are app.ops.spans, loaded by ``start``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from app.serving.outcome import RequestOutcome

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import Tracer

    from app.ops.spans import RequestTrace

log = logging.getLogger("gateway")

SCOPE = "anthropic-gateway"  # the instrumentation scope, and the default service.name
# How long a stopping worker waits for its last spans to leave (a collector that is down
# must not hold up a restart).
FLUSH_SECONDS = 3.0
TRUE = ("true", "1", "yes", "on")

tracer: Tracer | None = None  # set in each worker by ``start`` when tracing is on
processor: BatchSpanProcessor | None = None


@dataclass(frozen=True)
class Plan:
    """Whether the environment asks for traces, and if not, why (for the worker's log)."""

    enabled: bool
    reason: str = ""


def plan(environ: Mapping[str, str]) -> Plan:
    """Traces go out when an OTLP endpoint is named (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
    or ``OTEL_EXPORTER_OTLP_ENDPOINT``), the SDK is not disabled and the exporter and
    protocol asked for are the one the gateway ships: OTLP over HTTP with protobuf."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() in TRUE:
        return Plan(False, "OTEL_SDK_DISABLED")
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not (endpoint or "").strip():
        return Plan(False, "no OTLP endpoint")
    exporter = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter != "otlp":
        return Plan(False, f"OTEL_TRACES_EXPORTER={exporter} (only otlp is supported)")
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol != "http/protobuf":
        return Plan(False, f"OTLP protocol {protocol} (only http/protobuf is supported)")
    return Plan(True)


def start(environ: Mapping[str, str] = os.environ) -> bool:
    """In a worker, after gevent patched it: the SDK, its batch processor and the exporter,
    each configured by the standard variables (sampler, endpoint, headers, timeout, queue).
    True when traces are on."""
    wanted = plan(environ)
    if not wanted.enabled:
        if wanted.reason not in ("no OTLP endpoint", "OTEL_SDK_DISABLED"):
            log.warning("tracing is off: %s", wanted.reason)
        return False
    try:
        _start_sdk()
    except Exception:  # a worker that cannot trace still serves
        log.exception("tracing is off: the OpenTelemetry SDK did not start")
        return False
    return True


def _start_sdk() -> None:
    global tracer, processor
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: SCOPE}))
    # OTEL_TRACES_SAMPLER and _ARG; shut down by ``stop`` at the worker's exit, not at exit.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    processor = BatchSpanProcessor(OTLPSpanExporter())  # OTEL_BSP_*, OTEL_EXPORTER_OTLP_*
    provider.add_span_processor(processor)
    import app.ops.spans  # noqa: F401 (the span classes, loaded before the first request)

    tracer = provider.get_tracer(SCOPE)


def stop(seconds: float = FLUSH_SECONDS) -> None:
    """On a worker's way out: the spans still queued sent, waiting ``seconds`` at most. The
    processor's own shutdown may wait 30 s (and each export the exporter's timeout), so it
    runs in a thread of its own (a greenlet, in a worker) that is left behind if it is late."""
    global tracer, processor
    if processor is not None:
        closing = threading.Thread(target=processor.shutdown, name="otel-shutdown", daemon=True)
        closing.start()
        closing.join(seconds)
        if closing.is_alive():
            log.warning("trace spans not sent within %.0f s of the worker's exit", seconds)
    tracer = processor = None


def begin(environ: Mapping[str, Any], route: str | None) -> RequestTrace | None:
    """A request's trace, or None with tracing off (the one check a request pays then)."""
    current = tracer
    if current is None:
        return None
    from app.ops.spans import RequestTrace  # loaded by ``start`` already

    return RequestTrace(current, environ, route)


# --- attributes (pure) ---------------------------------------------------------------------


def request_attributes(environ: Mapping[str, Any], route: str | None) -> dict[str, Any]:
    """What the request's span says from the start (no query string: it may hold anything)."""
    found: dict[str, Any] = {
        "http.request.method": environ.get("REQUEST_METHOD", "GET"),
        "url.path": environ.get("PATH_INFO", ""),
    }
    if route:
        found["http.route"] = route
    return found


def server_attributes(outcome: RequestOutcome) -> dict[str, Any]:
    """What the request's span says at its end: the gateway's request id (the access line's
    and the client's ``request-id``), who asked by key name, the route, and how it ended
    (the backends and models are the attempts' spans'). The key's name is the operator's
    label for it, never the key. Each attribute costs some µs to record and encode, so the
    request's span keeps to these; the access line has the rest, under the same id."""
    found: dict[str, Any] = {"gateway.request_id": outcome.request_id}
    if outcome.status is not None:
        found["http.response.status_code"] = outcome.status
    optional = (
        ("gateway.key_name", outcome.key),
        ("gateway.route", outcome.route),
        ("gateway.batch_id", outcome.batch),  # a batch item's (its custom_id is the client's)
        ("gateway.rejected", outcome.rejected),
        ("gateway.client_disconnected", outcome.client_disconnected),
    )
    found.update((name, value) for name, value in optional if value is not None)
    if outcome.error:
        found["gateway.error_type"] = outcome.error
    if (outcome.status or 0) >= 500:
        found["error.type"] = outcome.error or str(outcome.status)
    return found


def attempt_attributes(
    backend: str, provider: str, model: str, url: str, stream: bool
) -> dict[str, Any]:
    """An attempt's span from the start, as the GenAI conventions name it."""
    host, port = server_of(url)
    found: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": model,
        "gen_ai.request.stream": stream,
        "gateway.backend": backend,
        "server.address": host,
    }
    if port is not None:
        found["server.port"] = port
    return found


def answer_attributes(outcome: RequestOutcome, attempt_offset: float) -> dict[str, Any]:
    """What the answering attempt learnt: tokens (``input_tokens`` counts the cached part
    too, as the conventions say), why it stopped, and the time from the attempt's start to
    its first chunk (the outcome counts it from the request's: ``attempt_offset`` is how
    long after the request the attempt began)."""
    found: dict[str, Any] = {}
    tokens = outcome.tokens
    if tokens is not None:
        found["gen_ai.usage.input_tokens"] = tokens.prompt
        found["gen_ai.usage.output_tokens"] = tokens.output
        found["gen_ai.usage.cache_read.input_tokens"] = tokens.cached
    answer = outcome.answer
    if answer is not None and answer.stop_reason:
        found["gen_ai.response.finish_reasons"] = (answer.stop_reason,)
    if outcome.ttft is not None:
        found["gen_ai.response.time_to_first_chunk"] = max(outcome.ttft - attempt_offset, 0.0)
    if outcome.error:
        found["error.type"] = outcome.error
    return found


def error_type(error: BaseException) -> str:
    """A failed attempt's ``error.type``: the Anthropic error type the gateway made of it
    (low in cardinality, unlike its message), or the exception's class."""
    kind = getattr(error, "error_type", None)
    return kind if isinstance(kind, str) else type(error).__qualname__


@lru_cache(maxsize=64)
def server_of(url: str) -> tuple[str, int | None]:
    """``server.address`` and ``server.port`` of a backend URL (never its credentials)."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port
