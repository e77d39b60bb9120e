"""Flask wiring: the app factory, request ids, client keys and their limits, the access log
hook and the error envelope.

Error handlers are registered on the app, not the blueprint, because routing errors (404, 405)
never reach blueprint handlers, and every error must leave as an Anthropic envelope.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import PathConverter

from app import jsonc
from app.backends.balancer import Balancer
from app.backends.client import BackendClient
from app.backends.dispatch import Dispatcher
from app.backends.placement import Placer
from app.backends.session import Transport, new_session
from app.batches.files import BatchFiles, batch_directory
from app.batches.item import ENVIRON_KEY as BATCH_ITEM
from app.batches.item import BatchItem
from app.batches.runner import Runner
from app.batches.service import Batches
from app.config import WORKER_CONNECTIONS, Settings, load_settings_or_last_good
from app.console import create_console_blueprint
from app.errors import (
    AuthenticationFailed,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    RequestTooLarge,
    UpstreamError,
)
from app.ops import metrics, tracing
from app.ops.access_log import configure_logging, request_id_from
from app.policy import auth
from app.policy.limits import KeyPolicy, key_table
from app.serving.admin import create_admin_blueprint
from app.serving.api import create_blueprint
from app.serving.batches import BATCHES_PATH, create_batches_blueprint
from app.serving.outcome import Delivery, RequestOutcome
from app.serving.state import ENVIRON_KEY, Ledger, Phase, RequestState, current
from app.serving.worker import close_connection
from app.state.buffer import UsageBuffer
from app.state.guard import GuardedStore
from app.state.open import open_store
from app.translate.redact import redact

log = logging.getLogger("gateway")


class ModelId(PathConverter):
    """A model id in a path: anything, slashes included, a leading one too."""

    regex = ".+"
    part_isolating = False  # it spans "/" (werkzeug guesses from the regex otherwise)


def build_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings_or_last_good()
    configure_logging(settings.log_level)
    redact.set_secrets(secrets_of(settings))
    app = Flask("gateway")
    # Werkzeug answers a path with "//" in it by a redirect, an HTML page, to the merged one;
    # a model named by its file (llama.cpp's "/models/x.gguf") has one in GET /v1/models/{id}.
    app.url_map.merge_slashes = False
    app.url_map.converters["model_id"] = ModelId
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    store = open_store(settings.state, on_change=metrics.store_changed)
    dispatcher = build_dispatcher(settings, store)
    app.extensions["gateway.dispatcher"] = dispatcher
    ledger = Ledger(store, UsageBuffer(store), settings.state.lease_seconds)
    app.extensions["gateway.ledger"] = ledger
    keys = key_table(settings.keys)
    app.register_blueprint(create_blueprint(settings, dispatcher, store))
    app.register_blueprint(create_admin_blueprint(settings, dispatcher, keys, store))
    batches = _add_batches(app, settings, store, dispatcher) if settings.batches.enabled else None
    app.register_blueprint(create_console_blueprint(settings, dispatcher, keys, store, batches))
    app.before_request(_request_starter(keys, ledger, settings.admin_token))
    app.after_request(_finish_request)
    app.teardown_request(_end_request)
    app.register_error_handler(GatewayError, _gateway_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)
    return app


def _add_batches(
    app: Flask, settings: Settings, store: GuardedStore, dispatcher: Dispatcher
) -> Batches:
    """The batch routes, and the worker's runner (started by gunicorn.conf.py's
    post_worker_init, once the worker is ready), which also publishes the worker's requests in
    flight per backend, where every worker's batch items find the idle room."""
    files = BatchFiles(batch_directory(settings))
    batches = Batches(settings.batches, store, files)
    app.register_blueprint(create_batches_blueprint(settings, batches))
    app.extensions["gateway.batch_runner"] = Runner(app, settings, store, files, dispatcher)
    return batches


def secrets_of(settings: Settings) -> list[str]:
    """What must never appear in a relayed or logged backend text: the backends' keys and
    the values of headers sent to them, and the admin token."""
    found = [settings.admin_token]
    for backend in settings.backends.values():
        found.append(backend.api_key)
        found.extend(backend.headers.values())
        if "@" in backend.proxy:  # credentials in the proxy URL
            found.append(backend.proxy.split("://", 1)[-1].rsplit("@", 1)[0])
    return [s for s in found if s]


def build_dispatcher(settings: Settings, store: GuardedStore | None = None) -> Dispatcher:
    """The worker's one requests session, a client (adapter and pool) per backend on it, the
    worker's health bookkeeping, and the store's count of requests in flight per backend."""
    # Keep as many backend connections as the worker can have requests in flight.
    concurrency = int(os.environ.get("GATEWAY_WORKER_CONNECTIONS") or WORKER_CONNECTIONS)
    session = new_session()
    clients = {
        name: BackendClient(config, Transport(session, config, config.pool_size or concurrency))
        for name, config in settings.backends.items()
    }
    limits = {name: config.max_concurrency for name, config in settings.backends.items()}
    balancer = Balancer(limits, settings.routing, on_breaker=metrics.breaker_changed)
    placer = Placer(settings, store) if store is not None else None
    return Dispatcher(settings, clients, balancer, placer=placer)


# Probes and scrapes, polled every few seconds: no access line and no request metrics, which
# would otherwise be mostly about the monitoring itself.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def _request_starter(
    keys: Mapping[bytes, KeyPolicy], ledger: Ledger, admin_token: str
) -> Callable[[], None]:
    """The first hook of every request; with client keys configured it also lets in only
    requests with a known, live key on /v1/ routes (and the admin token on the batch routes).
    A batch item's request (app/batches/execute.py) runs as its batch's key."""

    worker = os.getpid()  # the app is built in each worker, after the fork
    by_name = {policy.name: policy for policy in keys.values()}

    def start_request() -> None:
        environ = request.environ  # one lookup through the proxy, then a plain dict
        started = time.monotonic()
        request_id = request_id_from(environ.get("HTTP_X_REQUEST_ID"))
        environ[ENVIRON_KEY] = state = RequestState(started, request_id, ledger)
        path = request.path
        if path in QUIET_PATHS:
            return
        item: BatchItem | None = environ.get(BATCH_ITEM)
        if item is not None:
            key, digest = by_name.get(item.owner), None
            state.batch = item
        else:
            key, digest = auth.identify(keys, environ)
        state.key = key
        state.outcome = outcome = RequestOutcome(
            request_id=request_id,
            method=environ.get("REQUEST_METHOD", "GET").upper(),
            path=path,
            worker=worker,
            client=auth.client_id(digest),
            key=key.name if key is not None else None,
            forwarded_for=environ.get("HTTP_X_FORWARDED_FOR"),
        )
        if tracing.tracer is not None:
            rule = request.url_rule
            state.trace = tracing.begin(environ, rule.rule if rule is not None else None)
        if item is not None:
            outcome.batch, outcome.custom_id = item.batch_id, item.custom_id
        if path.startswith(BATCHES_PATH) and auth.is_admin(environ, admin_token):
            state.admin = True
            return
        if keys and path.startswith("/v1/"):
            if key is None:
                if item is not None:  # the batch's key was taken out of the config
                    outcome.rejected = "unauthenticated"
                    raise AuthenticationFailed("invalid API key", should_retry=False)
                _refuse(digest, outcome)
            refusal = key.refusal(time.time())
            if refusal is not None:
                outcome.rejected = "key_revoked" if key.revoked else "key_expired"
                raise AuthenticationFailed(refusal, should_retry=False)

    return start_request


def _refuse(digest: bytes | None, outcome: RequestOutcome) -> NoReturn:
    """A /v1/ request without a known key, refused before its body is read. (The key's
    limits are applied once the body is in: a slow upload must not hold a key's slot.)"""
    outcome.rejected = "unauthenticated"
    # x-should-retry: false, or Claude Code retries a wrong key for minutes.
    if digest is None:
        raise AuthenticationFailed(
            "an API key is required: send it as x-api-key or Authorization: Bearer",
            should_retry=False,
        )
    raise AuthenticationFailed("invalid API key", should_retry=False)


def _finish_request(response: Response) -> Response:
    state = current()
    if state is None:
        return response
    # (An error answer that replaced a relayed stream is answered as any other: the stream is
    # closed by the last hook, _end_request.)
    streaming = state.stream is not None and response.response is state.stream
    unread = state.phase < Phase.BODY_READ
    state.advance(Phase.ANSWERED)
    response.headers["request-id"] = state.request_id
    if unread and _has_body(request.environ):
        close_connection(request.environ)  # rather than have gunicorn read the body to waste
    if state.rate_headers:
        response.headers.extend(state.rate_headers)
    outcome = state.outcome
    if not streaming and outcome is not None:
        outcome.status = response.status_code
        outcome.bytes_out = response.content_length
        outcome.delivery = Delivery.BODY
        state.settle()
        # Once the answer is written: the line and the metrics (a tenth of a request's CPU)
        # stay off the client's wait, and the duration covers the write. A stream ends
        # itself (its app.serving.relay.StreamBody), whether or not it ran.
        response.call_on_close(state.end)
    return response


def _has_body(environ: Mapping[str, Any]) -> bool:
    length = environ.get("CONTENT_LENGTH") or ""
    return bool(environ.get("HTTP_TRANSFER_ENCODING")) or (length.isdigit() and length != "0")


def _end_request(error: BaseException | None) -> None:
    """The last hook of every request, run also when no response left the app (the client
    hung up while the backend worked, ``ClientGone``): what the request held goes back, and
    it still gets its access line and its settlement.

    With an error, the app's answer is an error response or none: a relayed stream built
    before it never reaches the server, which would have closed it, so it is closed here
    (its backend connection, its slot, its gauge, its request's end)."""
    state = current()
    if state is None:
        return
    if error is not None and state.stream is not None:
        stream, state.stream = state.stream, None
        stream.close()
        return
    if state.phase >= Phase.ANSWERED or state.outcome is None:
        return
    outcome = state.outcome
    outcome.status, outcome.client_disconnected, outcome.delivery = 499, True, Delivery.NONE
    state.end()


def render(error: GatewayError) -> Response:
    """The Anthropic error envelope as an HTTP response."""
    state = current()
    request_id = state.request_id if state is not None else None
    outcome = state.outcome if state is not None else None
    if outcome is not None:
        outcome.error = error.error_type
        if error.backend is not None:
            outcome.backend, outcome.attempts = error.backend, error.attempts
        if error.status >= 500:
            outcome.error_message = error.message
    response = Response(
        jsonc.dumps(error.payload(request_id)), status=error.status, mimetype="application/json"
    )
    response.headers.update(error.headers)
    return response


def _gateway_error(error: GatewayError) -> Response:
    return render(error)


HTTP_ERRORS: dict[int, type[GatewayError]] = {
    404: NotFound,
    405: MethodNotAllowed,
    413: RequestTooLarge,
}


def _http_error(error: HTTPException) -> Response:
    status = error.code or 500
    kind = HTTP_ERRORS.get(status, InvalidRequest if status < 500 else UpstreamError)
    message = {
        404: f"no route for {request.method} {request.path}",
        405: f"method {request.method} is not allowed on {request.path}",
        413: "request body is larger than the gateway's limit",
    }.get(status, error.description or "request failed")
    response = render(kind(message, status=status))
    allow = error.get_response().headers.get("Allow")
    if allow:
        response.headers["Allow"] = allow
    return response


def _unexpected_error(error: Exception) -> Response:
    state = current()
    log.exception("unhandled error", extra={"request_id": state and state.request_id})
    return render(UpstreamError("internal gateway error"))
