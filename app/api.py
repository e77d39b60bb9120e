"""The HTTP surface: ``POST /v1/messages`` (JSON or SSE) and ``GET /healthz``.

Views stay thin: parse, translate (pure layer), call the backend (upstream client), translate
back. Failures are raised as ``GatewayError`` and rendered by the app-level handlers in
``app.web``, so every error, wherever it starts, leaves in the same Anthropic envelope.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, g, request

from app import ids, jsonc
from app.config import Settings
from app.errors import InvalidRequest
from app.observability import log_access
from app.relay import StreamOutcome, relay
from app.translate.request import stop_sequences, translate_request
from app.translate.response import translate_response
from app.translate.stream import StreamTranslator
from app.upstream import UpstreamClient

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_blueprint(settings: Settings, client: UpstreamClient) -> Blueprint:
    bp = Blueprint("messages", __name__)

    @bp.post("/v1/messages")
    def create_message() -> Response:
        body = _json_body()
        requested = body.get("model") if isinstance(body, dict) else None
        backend_model = settings.backend_model(requested) if isinstance(requested, str) else ""
        payload = translate_request(
            body, backend_model=backend_model, dialect=client.config.dialect
        )
        g.access.update(model=requested, backend_model=backend_model)
        stops = stop_sequences(body)
        if body.get("stream"):
            g.access["stream"] = True
            return _stream(client, payload, requested, stops)
        completion = client.complete(payload, g.request_id)
        message = translate_response(
            completion, model=requested, message_id=ids.message_id(), stop_sequences=stops
        )
        g.access.update(stop_reason=message["stop_reason"], **_tokens(message["usage"]))
        return Response(jsonc.dumps(message), mimetype="application/json")

    @bp.get("/healthz")
    def healthz() -> Response:
        return Response(b'{"status":"ok"}', mimetype="application/json")

    return bp


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
    client: UpstreamClient, payload: dict[str, Any], model: str, stops: list[str]
) -> Response:
    request_id = g.request_id
    upstream = client.open_stream(payload, request_id)  # raises before any byte is sent
    translator = StreamTranslator(model=model, message_id=ids.message_id(), stop_sequences=stops)
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
        headers=SSE_HEADERS,
    )


def _tokens(usage: dict[str, int]) -> dict[str, int]:
    return {
        "input_tokens": usage["input_tokens"] + usage["cache_read_input_tokens"],
        "output_tokens": usage["output_tokens"],
    }
