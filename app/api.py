"""The HTTP surface: ``POST /v1/messages`` (JSON or SSE), ``count_tokens``, ``/v1/models``
and ``GET /healthz``.

Views stay thin: parse, translate (pure layer), call the backend (upstream client), translate
back. Failures are raised as ``GatewayError`` and rendered by the app-level handlers in
``app.web``, so every error, wherever it starts, leaves in the same Anthropic envelope.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, g, request

from app import ids, jsonc
from app.catalog import find_model, models_page
from app.config import Settings
from app.errors import InvalidRequest
from app.observability import log_access
from app.relay import StreamOutcome, relay
from app.translate.dialect import Dialect
from app.translate.request import clamp_max_tokens, stop_sequences, translate_request
from app.translate.response import translate_response
from app.translate.stream import StreamTranslator
from app.translate.tokens import estimate_prompt_tokens
from app.upstream import UpstreamClient

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_blueprint(settings: Settings, client: UpstreamClient) -> Blueprint:
    bp = Blueprint("messages", __name__)

    dialect = client.config.dialect

    @bp.post("/v1/messages")
    def create_message() -> Response:
        body = _json_body()
        payload, headers = _translate(body, settings, dialect)
        clamped_from = clamp_max_tokens(payload, dialect)
        if clamped_from is not None:
            limit = payload[dialect.max_tokens_field]
            headers["x-gateway-max-tokens"] = f"{limit}; clamped-from={clamped_from}"
        model, stops = body["model"], stop_sequences(body)
        if body.get("stream"):
            g.access["stream"] = True
            return _stream(client, payload, model, stops, headers)
        completion = client.complete(payload, g.request_id)
        message = translate_response(
            completion,
            model=model,
            message_id=ids.message_id(),
            stop_sequences=stops,
            think_tags=dialect.think_tags,
        )
        g.access.update(stop_reason=message["stop_reason"], **_tokens(message["usage"]))
        return Response(jsonc.dumps(message), mimetype="application/json", headers=headers)

    @bp.post("/v1/messages/count_tokens")
    def count_tokens() -> Response:
        body = _json_body()
        if isinstance(body, dict):
            body = {**body, "max_tokens": 1, "stream": False}  # not part of this request
        payload, headers = _translate(body, settings, dialect)
        count = client.count_tokens(payload, g.request_id)
        headers["x-gateway-token-count"] = "estimate" if count is None else "exact"
        if count is None:
            count = estimate_prompt_tokens(payload)
        return Response(
            jsonc.dumps({"input_tokens": count}), mimetype="application/json", headers=headers
        )

    @bp.get("/v1/models")
    def list_models() -> Response:
        return Response(
            jsonc.dumps(models_page(settings, request.args)), mimetype="application/json"
        )

    @bp.get("/v1/models/<path:model_id>")
    def get_model(model_id: str) -> Response:
        return Response(jsonc.dumps(find_model(model_id, settings)), mimetype="application/json")

    @bp.get("/healthz")
    def healthz() -> Response:
        return Response(b'{"status":"ok"}', mimetype="application/json")

    return bp


def _translate(
    body: Any, settings: Settings, dialect: Dialect
) -> tuple[dict[str, Any], dict[str, str]]:
    """The backend payload and the response headers that report what translation changed."""
    requested = body.get("model") if isinstance(body, dict) else None
    backend_model = settings.backend_model(requested) if isinstance(requested, str) else ""
    dropped: list[str] = []
    payload = translate_request(body, backend_model=backend_model, dialect=dialect, dropped=dropped)
    g.access.update(model=requested, backend_model=backend_model)
    headers = {"x-gateway-dropped": "; ".join(dropped)} if dropped else {}
    return payload, headers


def _json_body() -> Any:
    """The request body as JSON, whatever the Content-Type (some clients omit it)."""
    data = request.get_data(cache=False)
    if not data.strip():
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        return jsonc.loads(data)
    except jsonc.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None


def _stream(
    client: UpstreamClient,
    payload: dict[str, Any],
    model: str,
    stops: list[str],
    headers: dict[str, str],
) -> Response:
    request_id = g.request_id
    upstream = client.open_stream(payload, request_id)  # raises before any byte is sent
    translator = StreamTranslator(
        model=model,
        message_id=ids.message_id(),
        stop_sequences=stops,
        think_tags=client.config.dialect.think_tags,
    )
    entry, started = g.access, g.started

    def on_end(outcome: StreamOutcome) -> None:
        entry.update(
            status=200,
            stop_reason=translator.stop_reason,
            error=translator.error_type,
            client_disconnected=not outcome.completed,
            bytes_out=outcome.bytes_out,
            **_tokens(translator.final_usage),
        )
        if outcome.first_token_at is not None:
            entry["ttft_ms"] = round((outcome.first_token_at - started) * 1000, 1)
        log_access(entry, started)

    g.access_deferred = True
    return Response(
        relay(client, upstream, translator, on_end),
        mimetype="text/event-stream",
        headers={**SSE_HEADERS, **headers},
    )


def _tokens(usage: dict[str, int]) -> dict[str, int]:
    return {
        "input_tokens": usage["input_tokens"] + usage["cache_read_input_tokens"],
        "output_tokens": usage["output_tokens"],
    }
