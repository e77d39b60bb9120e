"""Prometheus metrics, correct under several gunicorn workers (multiprocess mode).

With ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn.conf.py sets it before the workers start),
each worker writes its samples to files there and a scrape merges them, so ``/metrics`` on any
worker reports the whole service. Without it (a single process, e.g. tests) the default
registry is used. Everything is recorded once per request from its outcome
(app.serving.outcome), never per streamed chunk.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

if TYPE_CHECKING:
    from app.serving.outcome import RequestOutcome

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60)

REQUESTS = Counter(
    "gateway_requests_total",
    "Requests answered, by route, backend, HTTP status and whether streamed.",
    ["route", "backend", "status", "stream"],
)
DURATION = Histogram(
    "gateway_request_duration_seconds",
    "Time from request to the last byte of the answer.",
    ["route", "stream"],
    buckets=LATENCY_BUCKETS,
)
TTFT = Histogram(
    "gateway_time_to_first_token_seconds",
    "Time from request to the first streamed content event.",
    ["route"],
    buckets=TTFT_BUCKETS,
)
TOKENS = Counter(
    "gateway_tokens_total",
    "Tokens reported by backends, by direction (input or output).",
    ["route", "backend", "direction"],
)
CACHED_TOKENS = Counter(
    "gateway_cached_input_tokens_total",
    "Input tokens backends report as read from their prompt cache (part of the input tokens).",
    ["route", "backend"],
)
ROUTED = Counter(
    "gateway_routed_total",
    "Requests placed on a backend by `least_busy` or `affinity`, by why that backend: prefix, "
    "session, new, spilled (the known replica was over its load bound) or failover.",
    ["route", "backend", "routed"],
)
STREAMS = Gauge(
    "gateway_streams_in_flight",
    "Streams being relayed right now.",
    ["backend"],
    multiprocess_mode="livesum",
)
BACKEND_ERRORS = Counter(
    "gateway_backend_errors_total",
    "Failed backend attempts and streams, by Anthropic error type.",
    ["backend", "type"],
)
DISCONNECTS = Counter(
    "gateway_client_disconnects_total", "Streams the client left before the end.", ["route"]
)
REJECTED = Counter(
    "gateway_requests_rejected_total",
    "Requests refused before any backend was asked, by reason and client key name.",
    ["reason", "key"],
)
BREAKER_OPEN = Gauge(
    "gateway_backend_breaker_open",
    "1 while a worker holds the backend's circuit breaker open.",
    ["backend"],
    multiprocess_mode="livemax",
)

KEY_TOKENS = Counter(
    "gateway_key_tokens_total",
    "Tokens used by client key, by kind (input, output, cached input read); the per-model, "
    "per-day records are in the state store (python -m app.usage).",
    ["key", "kind"],
)
STORE_UP = Gauge(
    "gateway_state_store_up",
    "0 while a worker cannot reach the state store (limits then fail open or closed, as "
    "configured), else 1.",
    multiprocess_mode="livemin",
)
STORE_UP.set(1)

BATCH_ITEMS = Counter(
    "gateway_batch_items_total",
    "Batch items done, by result (succeeded or errored; canceled and expired items are "
    "counted in gateway_batches' request counts when their batch ends).",
    ["result"],
)
BATCH_RETRIES = Counter(
    "gateway_batch_item_retries_total",
    "Batch items given back to be tried later: their backend was busy or failing.",
    ["backend", "status"],
)
BATCH_RUNNING = Gauge(
    "gateway_batch_items_in_flight",
    "Batch items being run right now.",
    multiprocess_mode="livesum",
)
BATCHES = Gauge(
    "gateway_batches",
    "Batches by processing status, as the last sweep found them.",
    ["status"],
    multiprocess_mode="mostrecent",
)
BATCH_QUEUE_AGE = Gauge(
    "gateway_batch_queue_age_seconds",
    "Age of the oldest batch still in progress (0: none), as the last sweep found it.",
    multiprocess_mode="mostrecent",
)


_children: dict[tuple[Any, ...], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, looked up once per label set (``labels`` takes a lock and
    builds the child's key on every call)."""
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def record(outcome: RequestOutcome, duration: float) -> None:
    """One finished request, from its outcome."""
    route = outcome.route or ""
    backend = outcome.backend or ""
    stream = "true" if outcome.stream else "false"
    _child(REQUESTS, route, backend, str(outcome.status or 0), stream).inc()
    _child(DURATION, route, stream).observe(duration)
    if outcome.ttft is not None:
        _child(TTFT, route).observe(outcome.ttft)
    tokens = outcome.tokens
    if tokens is not None:
        if tokens.prompt:
            _child(TOKENS, route, backend, "input").inc(tokens.prompt)
        if tokens.output:
            _child(TOKENS, route, backend, "output").inc(tokens.output)
        if tokens.cached:
            _child(CACHED_TOKENS, route, backend).inc(tokens.cached)
        if outcome.key:
            for kind, count in (
                ("input", tokens.prompt),
                ("output", tokens.output),
                ("cached", tokens.cached),
            ):
                if count:
                    _child(KEY_TOKENS, outcome.key, kind).inc(count)
    if outcome.routed is not None:
        _child(ROUTED, route, backend, outcome.routed).inc()
    if outcome.client_disconnected:
        _child(DISCONNECTS, route).inc()
    if outcome.rejected:
        _child(REJECTED, outcome.rejected, outcome.key or "").inc()
    if backend and outcome.error and outcome.status == 200:
        _child(BACKEND_ERRORS, backend, outcome.error).inc()  # failed mid-stream


def streams_in_flight(backend: str) -> Any:
    """The gauge of one backend's open streams (``inc`` when one starts, ``dec`` at its end)."""
    return _child(STREAMS, backend)


def backend_failed(backend: str, error_type: str) -> None:
    _child(BACKEND_ERRORS, backend, error_type).inc()


def breaker_changed(backend: str, is_open: bool) -> None:
    BREAKER_OPEN.labels(backend).set(1 if is_open else 0)


def store_changed(up: bool) -> None:
    STORE_UP.set(1 if up else 0)


def batch_items_running(change: int) -> None:
    BATCH_RUNNING.inc(change)


def batch_item_done(result: str) -> None:
    _child(BATCH_ITEMS, result).inc()


def batch_item_retried(backend: str, status: int) -> None:
    _child(BATCH_RETRIES, backend, str(status)).inc()


def batches_seen(by_status: dict[str, int], oldest_age: float) -> None:
    for status, count in by_status.items():
        _child(BATCHES, status).set(count)
    BATCH_QUEUE_AGE.set(oldest_age)


def render() -> tuple[bytes, str]:
    """The exposition text; in multiprocess mode merged from every worker's files."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
