"""The HTTP surface: ``POST /v1/messages`` (JSON or SSE), ``count_tokens``, ``/v1/models``,
the probes and ``/metrics`` (the admin routes are in app.serving.admin).

Views stay thin: they read the body and hand it to the module that serves the route
(app.serving.messages, app.serving.counting). Failures are raised as ``GatewayError`` and
rendered by the app-level handlers in ``app.serving.web``, so every error, wherever it starts,
leaves in the same Anthropic envelope.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from flask import Blueprint, Response, current_app, request

from app import jsonc
from app.backends.dispatch import Dispatcher
from app.config import Settings
from app.ops import metrics
from app.ops.health import Readiness
from app.serving import counting
from app.serving.body import parse_json, read_within
from app.serving.catalog import Catalog
from app.serving.messages import Messages
from app.serving.state import Phase, RequestState, current
from app.state.guard import GuardedStore

JSON = "application/json"


def create_blueprint(settings: Settings, dispatcher: Dispatcher, store: GuardedStore) -> Blueprint:
    bp = Blueprint("messages", __name__)
    _add_api(bp, settings, dispatcher, store)
    _add_probes(bp, dispatcher)
    return bp


def _add_api(
    bp: Blueprint, settings: Settings, dispatcher: Dispatcher, store: GuardedStore
) -> None:
    """The Anthropic API: messages, token counts and models."""
    messages = Messages(settings, dispatcher, store)
    catalog = Catalog(settings, dispatcher.clients)

    @bp.post("/v1/messages")
    def create_message() -> Response:
        """A message, JSON or streamed (app.serving.messages)."""
        body = _json_body(settings)
        # werkzeug's Headers: a mapping of str to str in all but its registration as one.
        headers = cast("Mapping[str, str]", request.headers)
        return messages.create(body, _state(), headers, request.environ)

    @bp.post("/v1/messages/count_tokens")
    def count_tokens() -> Response:
        """The prompt's size, exact or estimated (app.serving.counting)."""
        body = _json_body(settings)
        return counting.count_tokens(body, _state(), settings, dispatcher)

    @bp.get("/v1/models")
    def list_models() -> Response:
        """The configured names and the pass-through backends' own (app.serving.catalog)."""
        return Response(jsonc.dumps(catalog.page(request.args)), mimetype=JSON)

    @bp.get("/v1/models/<model_id:model_id>")
    def get_model(model_id: str) -> Response:
        """Any name ``POST /v1/messages`` would serve; 404 only for one it would refuse.

        A model named by its file (llama.cpp's ``/models/x.gguf``, which the SDK sends as
        ``%2Fmodels%2Fx.gguf``) starts with a slash: the ``model_id`` converter keeps it."""
        return Response(jsonc.dumps(catalog.find(model_id)), mimetype=JSON)


def _add_probes(bp: Blueprint, dispatcher: Dispatcher) -> None:
    """What systemd, a load balancer and Prometheus ask: alive, ready, the metrics."""
    readiness = Readiness()

    @bp.get("/healthz")
    def healthz() -> Response:
        """The process is alive and serving."""
        return Response(b'{"status":"ok"}', mimetype=JSON)

    @bp.get("/readyz")
    def readyz() -> Response:
        """The config is loaded and at least one backend answers HTTP."""
        backends = {
            name: readiness.check(name, client.ready) for name, client in dispatcher.clients.items()
        }
        ready = any(backends.values())
        body = {"status": "ready" if ready else "unavailable", "backends": backends}
        return Response(jsonc.dumps(body), status=200 if ready else 503, mimetype=JSON)

    @bp.get("/metrics")
    def metrics_endpoint() -> Response:
        data, content_type = metrics.render()
        return Response(data, content_type=content_type)


def _state() -> RequestState:
    """The request's state with its outcome (every /v1/ request has both)."""
    state = current()
    assert state is not None and state.outcome is not None
    return state


def _json_body(settings: Settings) -> Any:
    """The request body as JSON (app.serving.body), noted as read for app.serving.web."""
    environ = request.environ
    data = read_within(environ, current_app.config["MAX_CONTENT_LENGTH"], settings.body_timeout)
    _state().advance(Phase.BODY_READ)
    return parse_json(data)
