"""Sending one client request to a route's backends: translation per target, retries with
backoff and jitter, failover, and the circuit breaker's bookkeeping.

Retries happen only here, before the caller has sent the client a single byte: a streamed
answer is returned once its backend has said 200, and from then on it is never retried or
duplicated. Only failures another attempt may cure are retried (connection errors, 429, 5xx);
moving to another backend is immediate, trying the same one again waits (backoff with full
jitter, or the backend's ``retry-after`` when it is short enough).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.backends.balancer import Balancer
from app.backends.client import BackendClient
from app.backends.routing import backend_model
from app.config import Route, Settings, Target
from app.errors import GatewayError, Overloaded
from app.ops import metrics
from app.translate.request import clamp_max_tokens, translate_request

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


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        clients: Mapping[str, BackendClient],
        balancer: Balancer,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.clients = clients
        self.balancer = balancer
        self.sleep = sleep

    def send(
        self,
        route: Route,
        body: dict[str, Any],
        request_id: str,
        client_headers: Mapping[str, str],
    ) -> Attempt:
        """The first successful attempt; the caller must ``finish`` it when the answer is over."""
        plan = self.balancer.plan(route)
        if not plan:
            raise Overloaded(
                f"no healthy backend for model {body['model']!r}; try again shortly",
                headers={"retry-after": str(int(self.settings.routing.breaker_cooldown))},
            )
        attempts = self.settings.routing.retries + 1
        last: GatewayError | None = None
        prepared_for: dict[Target, Attempt] = {}  # a retry on the same target reuses it
        for number in range(attempts):
            target = plan[number % len(plan)]
            # The client's own mistakes (translation errors) leave before any backend is involved.
            prepared = prepared_for.get(target)
            if prepared is None:
                prepared = prepared_for[target] = self._prepare(target, body)
            if not self.balancer.acquire(target.backend):
                last = last or Overloaded(f"every backend for model {body['model']!r} is busy")
                continue
            try:
                attempt = self._call(prepared, body, request_id, client_headers)
            except GatewayError as exc:
                self.balancer.release(target.backend, ok=False if exc.retryable else None)
                metrics.backend_failed(target.backend, exc.error_type)
                if not exc.retryable:
                    raise
                last = exc
                log.warning("backend %s failed (attempt %d): %s", target.backend, number + 1, exc)
                if number + 1 < attempts:
                    self._pause(number, exc, same=plan[(number + 1) % len(plan)] == target)
                continue
            attempt.attempts = number + 1
            return attempt
        assert last is not None
        raise last

    def finish(self, attempt: Attempt, *, ok: bool | None) -> None:
        """Give back the backend's slot, telling the breaker how it went (None: no verdict)."""
        self.balancer.release(attempt.target.backend, ok=ok)

    def _prepare(self, target: Target, body: dict[str, Any]) -> Attempt:
        """The request as this target's backend takes it (``result`` holds the payload)."""
        client = self.clients[target.backend]
        model = backend_model(target, body["model"])
        if client.config.protocol == "anthropic":
            return Attempt(target, client, model, {**body, "model": model})
        dropped: list[str] = []
        dialect = client.config.dialect
        payload = translate_request(body, backend_model=model, dialect=dialect, dropped=dropped)
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
    ) -> Attempt:
        """Send the prepared request; the answer replaces the payload in ``result``."""
        client, payload = prepared.client, prepared.result
        if client.config.protocol == "anthropic":
            result = client.messages(payload, request_id, client_headers)
        elif body.get("stream"):
            result = client.open_stream(payload, request_id)
        else:
            result = client.complete(payload, request_id)
        # The constructor, not dataclasses.replace, which walks the fields (about 1% of a
        # request's CPU in the profile).
        return Attempt(
            target=prepared.target,
            client=client,
            model=prepared.model,
            result=result,
            headers=prepared.headers,
        )

    def _pause(self, number: int, error: GatewayError, *, same: bool) -> None:
        """Failing over is immediate; the same backend again gets backoff or its retry-after."""
        if not same:
            return
        delay = self.balancer.retry_delay(number)
        retry_after = _retry_after(error.headers)
        if retry_after is not None and retry_after <= self.settings.routing.max_retry_after:
            delay = max(delay, retry_after)
        self.sleep(delay)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    try:
        if "retry-after-ms" in headers:
            return float(headers["retry-after-ms"]) / 1000
        if "retry-after" in headers:
            return float(headers["retry-after"])
    except ValueError:
        return None  # an HTTP date: not worth waiting on inside a request
    return None
