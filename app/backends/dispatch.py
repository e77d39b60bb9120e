"""Sending one client request to a route's backends: translation per target, retries,
failover, and the breaker's bookkeeping.

The policy (the README's table gives it whole), so that a client's own retries are never
multiplied by the gateway's:

- the same backend is asked again only when the request never reached it (no connection was
  made), after a backoff with full jitter;
- any other failure another backend may cure (a broken connection, a 429, a 503, a server
  error) moves the request to the route's next target at once; with none left, the client gets
  the last error, a 429 or 503 with its ``retry-after``, and retries on its own schedule;
- a client error, or a timeout after the request went out (the backend may still be working
  on it), goes back as it is;
- a failure counts against a backend's breaker only when it says the backend cannot serve,
  and one client request counts at most once per backend.

All of it happens before the caller has sent the client a single byte: a streamed answer is
returned once its backend has said 200, and from then on it is never retried or duplicated.
Every slot taken on a backend is released exactly once, by this module when an attempt fails,
and by the caller (``finish``) when the answer is over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.backends.balancer import Balancer, Slot
from app.backends.client import BackendClient
from app.backends.placement import PLACED, Lease, Placer
from app.backends.routing import backend_model
from app.config import Route, Settings, Target
from app.errors import GatewayError, Overloaded
from app.ops import metrics
from app.translate.request import clamp_max_tokens, stop_sequences, translate_request

if TYPE_CHECKING:
    from app.ops.spans import AttemptSpan, RequestTrace

log = logging.getLogger("gateway")


@dataclass
class Attempt:
    """A backend that accepted the request, and what it answered."""

    target: Target
    client: BackendClient
    model: str  # the model name the backend was asked for
    result: Any  # a parsed body, or an open streamed response
    headers: dict[str, str] = field(default_factory=dict)  # x-gateway-* response headers
    attempts: int = 1
    slot: Slot | None = None  # the backend slot this answer holds until ``finish``
    payload: dict[str, Any] | None = None  # what the backend was sent
    lease: Lease | None = None  # its place in the service-wide count, until ``finish``
    span: AttemptSpan | None = None  # its trace span, when tracing is on (app.ops.tracing)

    @property
    def routed(self) -> str | None:
        """Why its backend was chosen (``affinity`` and ``least_busy`` routes)."""
        return self.lease.routed if self.lease is not None else None


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        clients: Mapping[str, BackendClient],
        balancer: Balancer,
        sleep: Callable[[float], None] = time.sleep,
        placer: Placer | None = None,
    ) -> None:
        self.settings = settings
        self.clients = clients
        self.balancer = balancer
        self.sleep = sleep
        self.placer = placer  # None: no state store, every worker orders by what it knows

    def send(
        self,
        route: Route,
        body: dict[str, Any],
        request_id: str,
        client_headers: Mapping[str, str],
        on_send: Callable[[BackendClient, dict[str, Any]], None] | None = None,
        pinned: str | None = None,
        trace: RequestTrace | None = None,
    ) -> Attempt:
        """The first successful attempt; the caller must ``finish`` it when the answer is over.
        ``on_send`` sees each attempt's backend and payload just before it goes out; ``trace``
        gets a span for each attempt, whose context goes to the backend.

        ``pinned``: a batch item, sent only to the backend that had room for it (its slot is
        the batch runner's, app/batches/runner.py), and at its batch priority."""
        queue, ready = self.balancer.split(route)
        lease = None
        if pinned is not None:
            queue = [target for target in queue if target.backend == pinned]
        elif self.placer is not None and route.strategy in PLACED:
            queue, lease = self.placer.order(route, queue, ready, body, client_headers)
        try:
            attempt = self._send(queue, body, request_id, client_headers, on_send, pinned, trace)
        except BaseException:
            if lease is not None:
                lease.release()
            raise
        if lease is not None and self.placer is not None:
            self.placer.landed(lease, attempt.target.backend)
            attempt.lease = lease
        return attempt

    def _send(
        self,
        queue: list[Target],
        body: dict[str, Any],
        request_id: str,
        client_headers: Mapping[str, str],
        on_send: Callable[[BackendClient, dict[str, Any]], None] | None,
        pinned: str | None,
        trace: RequestTrace | None,
    ) -> Attempt:
        budget = self.settings.routing.retries + 1
        again: list[Target] = []  # failed before the request reached them: may be tried again
        prepared: dict[Target, Attempt] = {}  # a retry on the same target reuses it
        counted: set[str] = set()  # backends this request has counted a failure against
        last: GatewayError | None = None
        made = 0
        while made < budget:
            if not queue:
                if not again:
                    break
                queue, again = again, []
                self.sleep(self.balancer.retry_delay(made - 1))
            target = queue.pop(0)
            if target not in prepared:  # the client's own mistakes leave before any backend
                prepared[target] = self._prepare(target, body, batch=pinned is not None)
            slot = self.balancer.acquire(target.backend, batch=pinned is not None)
            if slot is None:
                last = last or _busy(body["model"])
                continue
            made += 1
            if on_send is not None:
                on_send(prepared[target].client, prepared[target].result)
            span = _begin_span(trace, prepared[target], body) if trace is not None else None
            try:
                attempt = self._call(prepared[target], body, request_id, client_headers, span)
            except GatewayError as exc:
                if span is not None:
                    span.failed(exc)
                slot.release(_verdict(exc, target.backend, counted))
                metrics.backend_failed(target.backend, exc.error_type)
                exc.backend, exc.attempts = target.backend, made
                if not exc.retryable:
                    raise
                log.warning("backend %s failed (attempt %d): %s", target.backend, made, exc)
                last = exc
                if not exc.reached:
                    again.append(target)
                continue
            except BaseException as exc:
                if span is not None:
                    span.failed(exc)
                slot.release(None)
                raise
            attempt.slot = slot
            attempt.attempts = made
            attempt.span = span
            return attempt
        raise last or _busy(body["model"])

    def count_slot(self, route: Route) -> tuple[Target, Slot | None]:
        """Where a token count goes, and the slot it holds there while the backend counts
        (the caller releases it, with no verdict: a count says nothing of whether the backend
        can serve messages). The target a message would be sent to: the first of the route's,
        in the balancer's order, whose breaker is closed and that has a slot free (a count is
        never a half-open backend's probe). No slot when that backend has no tokenizer, or
        when none is left: the caller estimates, and a full or failing backend gets no more
        work."""
        planned = self.balancer.plan(route)
        for target in planned:
            if self.balancer.state(target.backend) != "closed":
                continue
            if not has_tokenizer(self.clients[target.backend]):
                return target, None
            slot = self.balancer.acquire(target.backend)
            if slot is not None:
                return target, slot
        return planned[0], None

    def finish(self, attempt: Attempt, *, ok: bool | None) -> None:
        """Give back the backend's slot, telling the breaker how it went (None: no verdict),
        and its place in the service-wide count, and note when its answer was over for its
        span. Safe to call more than once: only the first call counts."""
        if attempt.span is not None:
            attempt.span.done()
        if attempt.slot is not None:
            attempt.slot.release(ok)
        if attempt.lease is not None:
            attempt.lease.release()

    def _prepare(self, target: Target, body: dict[str, Any], batch: bool = False) -> Attempt:
        """The request as this target's backend takes it (``result`` holds the payload)."""
        client = self.clients[target.backend]
        model = backend_model(target, body["model"])
        priority = client.config.batch_priority if batch else 0
        if client.config.protocol == "anthropic":
            extra = {"priority": priority} if priority else {}
            return Attempt(target, client, model, {**body, "model": model, **extra})
        dropped: list[str] = []
        dialect = client.config.dialect
        payload = translate_request(
            body,
            backend_model=model,
            dialect=dialect,
            dropped=dropped,
            billing_header=self.settings.translate.billing_header,
        )
        if priority:
            payload["priority"] = priority  # type: ignore[typeddict-unknown-key]  # vLLM, SGLang
        headers = {"x-gateway-dropped": "; ".join(dropped)} if dropped else {}
        clamped_from = clamp_max_tokens(payload, dialect)
        if clamped_from is not None:
            limit = payload[dialect.max_tokens_field]
            headers["x-gateway-max-tokens"] = f"{limit}; clamped-from={clamped_from}"
        return Attempt(target, client, model, payload, headers)

    def _call(
        self,
        prepared: Attempt,
        body: dict[str, Any],
        request_id: str,
        client_headers: Mapping[str, str],
        span: AttemptSpan | None,
    ) -> Attempt:
        """Send the prepared request; the answer replaces the payload in ``result``."""
        client, payload = prepared.client, prepared.result
        trace = span.headers if span is not None else None
        if client.config.protocol == "anthropic":
            result = client.messages(payload, request_id, client_headers, trace=trace)
        elif backend_streams(body):
            result = client.open_stream(dict(payload), request_id, trace=trace)
        else:
            result = client.complete(payload, request_id, trace=trace)
        # The constructor, not dataclasses.replace, which walks the fields (about 1% of a
        # request's CPU in the profile).
        return Attempt(
            target=prepared.target,
            client=client,
            model=prepared.model,
            result=result,
            headers=prepared.headers,
            payload=payload,
        )


def backend_streams(body: dict[str, Any]) -> bool:
    """Whether the backend is asked for a stream: when the client asked for one, and when it
    gave stop sequences, which the gateway matches itself (app.translate.text_filter) and
    which end the backend's work as soon as one appears."""
    return bool(body.get("stream") or stop_sequences(body))


def _begin_span(trace: RequestTrace, prepared: Attempt, body: dict[str, Any]) -> AttemptSpan:
    """An attempt's span: which backend, its dialect as the provider, the model asked for."""
    config = prepared.client.config
    payload = prepared.result
    return trace.begin_attempt(
        backend=prepared.target.backend,
        provider=config.dialect.name,
        model=prepared.model,
        url=config.url,
        stream=backend_streams(body),
        max_tokens=payload.get(config.dialect.max_tokens_field)
        if config.protocol == "openai"
        else payload.get("max_tokens"),
    )


def has_tokenizer(client: BackendClient) -> bool:
    """Whether ``client.count_tokens`` asks the backend anything (else it is an estimate)."""
    return client.config.protocol == "anthropic" or bool(client.config.dialect.tokenizer)


def _verdict(error: GatewayError, backend: str, counted: set[str]) -> bool | None:
    """False (a failure for the breaker) only for a failure that says the backend cannot
    serve, and only the first time in this client request."""
    if not error.backend_fault or backend in counted:
        return None
    counted.add(backend)
    return False


def _busy(model: str) -> Overloaded:
    return Overloaded(
        f"every backend for model {model!r} is busy; try again shortly",
        headers={"retry-after": "1"},
    )
