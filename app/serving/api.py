"""The HTTP surface: ``POST /v1/messages`` (JSON or SSE), ``count_tokens``, ``/v1/models``,
the probes and ``/metrics`` (the admin routes are in app.serving.admin).

Views stay thin: parse, route, dispatch (translation happens per backend attempt), translate
back. Failures are raised as ``GatewayError`` and rendered by the app-level handlers in
``app.serving.web``, so every error, wherever it starts, leaves in the same Anthropic envelope.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import requests
from flask import Blueprint, Response, current_app, request

from app import ids, jsonc
from app.backends.dispatch import Attempt, Dispatcher, backend_streams
from app.backends.routing import backend_model, resolve
from app.config import Settings
from app.errors import GatewayError, UpstreamError
from app.ops import metrics
from app.ops.health import Readiness
from app.policy.threads import ThreadTurn, begin_turn
from app.serving.body import parse_json, read_within
from app.serving.catalog import Catalog
from app.serving.green import client_watch
from app.serving.prompt_count import PromptCount
from app.serving.relay import StreamOutcome, relay
from app.serving.state import RequestState, current
from app.state.guard import GuardedStore
from app.translate.accumulate import MessageAccumulator
from app.translate.passthrough import PassthroughStream, passthrough_id, passthrough_stop
from app.translate.request import check_request, stop_sequences, translate_request
from app.translate.response import translate_response
from app.translate.sse import encode_all
from app.translate.stream import StreamTranslator, message_events
from app.translate.text_filter import prefill_of
from app.translate.tokens import estimate_prompt_tokens
from app.translate.tools import parallel_disabled

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
JSON = "application/json"
THREAD_KINDS = ("create", "continue")


def create_blueprint(settings: Settings, dispatcher: Dispatcher, store: GuardedStore) -> Blueprint:
    bp = Blueprint("messages", __name__)
    readiness = Readiness()

    @bp.post("/v1/messages")
    def create_message() -> Response:
        body = _json_body(settings)
        state = _state()
        turn = None
        if isinstance(body, dict):
            thread = body.get("thread")
            if isinstance(thread, dict) and thread.get("type") in THREAD_KINDS:
                state.access["thread"] = thread["type"]  # also when the thread is refused
            turn = begin_turn(body, state.owner, store, settings.threads)
        try:
            return _create_message(body, state, turn)
        except BaseException:
            if turn is not None:
                turn.failed()
            raise

    def _create_message(body: Any, state: RequestState, turn: ThreadTurn | None) -> Response:
        check_request(body)
        route = resolve(settings, body["model"])
        access = state.access
        stream = bool(body.get("stream"))
        access.update(model=body["model"], route=route.name, stream=stream)
        state.admit(body)
        count = PromptCount(state.request_id) if backend_streams(body) else None
        # Until the first byte goes to the client, a client that hangs up ends the request,
        # and with it the backend's work on it.
        with client_watch(request.environ):
            attempt = dispatcher.send(
                route,
                body,
                state.request_id,
                request.headers,
                on_send=count.start if count is not None else None,
            )
            access.update(
                backend=attempt.target.backend,
                backend_model=attempt.model,
                attempts=attempt.attempts,
            )
            try:
                if count is not None and _is_event_stream(attempt.result):
                    translator = _translator(attempt, body, count, relayed=stream)
                    if stream:
                        return _stream(dispatcher, attempt, translator, settings, turn)
                    response = _collect(attempt, translator, body, access, turn)
                else:
                    response = _whole_answer(attempt, body, access, stream, turn)
            except BaseException as exc:
                _abandon(dispatcher, attempt, exc)
                raise
        dispatcher.finish(attempt, ok=True)
        return response

    @bp.post("/v1/messages/count_tokens")
    def count_tokens() -> Response:
        body = _json_body(settings)
        if isinstance(body, dict):
            body = {**body, "max_tokens": 1, "stream": False}  # not part of this request
            body.pop("thread", None)  # a count is never a turn of a thread
        check_request(body)
        route = resolve(settings, body["model"])
        target = (dispatcher.balancer.plan(route) or list(route.targets))[0]
        client = dispatcher.clients[target.backend]
        model = backend_model(target, body["model"])
        state = _state()
        state.access.update(model=body["model"], route=route.name, backend=target.backend)
        if client.config.protocol == "anthropic":
            dropped = ("max_tokens", "stream")  # not part of a count_tokens body
            payload = {k: v for k, v in body.items() if k not in dropped} | {"model": model}
        else:
            payload = translate_request(
                body,
                backend_model=model,
                dialect=client.config.dialect,
                billing_header=settings.translate.billing_header,
            )
        count = client.count_tokens(payload, state.request_id)
        how = "estimate" if count is None else "exact"
        if count is None:
            count = estimate_prompt_tokens(payload)
        headers = {"x-gateway-token-count": how}
        return Response(jsonc.dumps({"input_tokens": count}), mimetype=JSON, headers=headers)

    catalog = Catalog(settings, dispatcher.clients)

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

    return bp


def _state() -> RequestState:
    """The request's state with its access entry (every /v1/ request has both)."""
    state = current()
    assert state is not None and state.access is not None
    return state


def _json_body(settings: Settings) -> Any:
    """The request body as JSON (app.serving.body), noted as read for app.serving.web."""
    environ = request.environ
    data = read_within(environ, current_app.config["MAX_CONTENT_LENGTH"], settings.body_timeout)
    _state().body_read = True
    return parse_json(data)


def _whole_answer(
    attempt: Attempt,
    body: dict[str, Any],
    access: dict[str, Any],
    stream: bool,
    turn: ThreadTurn | None,
) -> Response:
    """A complete answer: JSON, or for a stream request (a backend that ignored ``stream``
    answers with JSON too) the same message as a stream of events. A thread keeps it before
    the client can read it, so the client's next turn finds it."""
    if isinstance(attempt.result, requests.Response):
        attempt = replace(attempt, result=_read_whole(attempt))
    return _answer(attempt, _message(attempt, body), access, stream, turn)


def _answer(
    attempt: Attempt,
    message: dict[str, Any],
    access: dict[str, Any],
    stream: bool,
    turn: ThreadTurn | None,
) -> Response:
    access.update(stop_reason=message.get("stop_reason"), **_tokens(message.get("usage")))
    if turn is not None:
        turn.succeeded(message)
    if stream:
        events = encode_all(message_events(message))
        headers = {**SSE_HEADERS, **attempt.headers}
        return Response(events, mimetype="text/event-stream", headers=headers)
    return Response(jsonc.dumps(message), mimetype=JSON, headers=attempt.headers)


def _abandon(dispatcher: Dispatcher, attempt: Attempt, error: BaseException) -> None:
    """An answer that will not reach the client: close its body if it is still open, and
    give the backend's slot back, counting it only if the failure says the backend cannot
    serve."""
    result = attempt.result
    if isinstance(result, requests.Response):
        result.close()
    fault = isinstance(error, GatewayError) and error.backend_fault
    dispatcher.finish(attempt, ok=False if fault else None)


def _is_event_stream(response: Any) -> bool:
    return isinstance(response, requests.Response) and "text/event-stream" in response.headers.get(
        "content-type", ""
    )


def _read_whole(attempt: Attempt) -> Any:
    """A streaming request answered with one JSON body (some backends ignore ``stream``)."""
    data = attempt.client.read_body(attempt.result)
    try:
        return jsonc.loads(data.strip())
    except jsonc.JSONDecodeError:
        name = attempt.client.name
        message = f"backend {name} answered a stream request with neither SSE nor JSON"
        raise UpstreamError(message, backend_fault=True) from None


def _message(attempt: Attempt, body: dict[str, Any]) -> dict[str, Any]:
    if attempt.client.config.protocol == "anthropic":
        message = attempt.result
        if not isinstance(message, dict) or message.get("type") != "message":
            message = f"backend {attempt.client.name} returned no message"
            raise UpstreamError(message, backend_fault=True)
        fixed = {**passthrough_stop(message), **passthrough_id(message)}
        return {**message, "model": body["model"], **fixed}
    return translate_response(attempt.result, **_answer_options(attempt, body))


def _answer_options(attempt: Attempt, body: dict[str, Any]) -> dict[str, Any]:
    """What a translator needs to make the backend's answer Anthropic's, JSON or stream
    alike: the client's names and stop sequences, and what the backend was sent (its
    prefill, the output cap after any clamping)."""
    sent = attempt.payload or {}
    max_tokens = sent.get(attempt.client.config.dialect.max_tokens_field)
    return {
        "model": body["model"],
        "message_id": ids.message_id(),
        "stop_sequences": stop_sequences(body),
        "think_tags": attempt.client.config.dialect.think_tags,
        "prefill": prefill_of(sent),
        "single_tool": parallel_disabled(body),
        "max_tokens": max_tokens if isinstance(max_tokens, int) else None,
    }


def _deadline(attempt: Attempt) -> float | None:
    """When the backend's answer must be over (monotonic), counted from the request's start."""
    total = attempt.client.config.total_timeout
    return _state().started + total if total else None


def _translator(
    attempt: Attempt, body: dict[str, Any], count: PromptCount, *, relayed: bool
) -> StreamTranslator | PassthroughStream:
    """``relayed``: the events go to the client as they come (else they are added up into
    one JSON answer, and tool arguments are best held to each call's end and repaired)."""
    if attempt.client.config.protocol == "anthropic":
        return PassthroughStream(model=body["model"])
    options = _answer_options(attempt, body)
    return StreamTranslator(**options, input_tokens=count.get, stream_tools=relayed)


def _collect(
    attempt: Attempt,
    translator: StreamTranslator | PassthroughStream,
    body: dict[str, Any],
    access: dict[str, Any],
    turn: ThreadTurn | None,
) -> Response:
    """A JSON answer read as a stream from the backend (a request with stop sequences: the
    backend's work ends as soon as one appears), added up into one message."""
    reply = MessageAccumulator()
    pieces = relay(
        attempt.client,
        attempt.result,
        translator,
        lambda outcome: None,
        deadline=_deadline(attempt),
        ping_interval=0,
        observe=reply.feed,
    )
    try:
        for _ in pieces:
            pass
    finally:
        pieces.close()
    if translator.error is not None:
        raise translator.error
    message = reply.message
    if message is None:
        message = f"backend {attempt.client.name} returned no message"
        raise UpstreamError(message, backend_fault=True)
    return _answer(attempt, {**message, "model": body["model"]}, access, False, turn)


def _stream(
    dispatcher: Dispatcher,
    attempt: Attempt,
    translator: StreamTranslator | PassthroughStream,
    settings: Settings,
    turn: ThreadTurn | None,
) -> Response:
    state = _state()
    entry, started = state.access, state.started
    in_flight = metrics.streams_in_flight(attempt.target.backend)

    def on_end(outcome: StreamOutcome) -> None:
        in_flight.dec()
        if turn is not None:
            turn.failed()  # unless its reply was kept at message_stop
        dispatcher.finish(attempt, ok=_stream_verdict(outcome, translator))
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
        state.end()

    # From here on the stream's end (StreamBody.close, which gunicorn always calls) releases
    # the backend slot and the gauge, writes the access line and settles with the store
    # (the key's slot back, its tokens as used).
    in_flight.inc()
    state.access_deferred = True
    body = relay(
        attempt.client,
        attempt.result,
        translator,
        on_end,
        deadline=_deadline(attempt),
        ping_interval=settings.ping_interval,
        observe=_thread_observer(turn) if turn is not None else None,
    )
    response = Response(
        body, mimetype="text/event-stream", headers={**SSE_HEADERS, **attempt.headers}
    )
    response.direct_passthrough = True  # app.serving.relay.StreamBody: gunicorn iterates the relay
    return response


def _thread_observer(turn: ThreadTurn) -> Callable[[list[dict[str, Any]]], None]:
    """Adds up the streamed reply; at ``message_stop``, before it is written, the thread
    keeps it, so a client that continues on reading it finds it."""
    reply = MessageAccumulator()

    def observe(events: list[dict[str, Any]]) -> None:
        reply.feed(events)
        if reply.complete and not turn.done:
            message = reply.message
            if message is not None:
                turn.succeeded(message)

    return observe


def _stream_verdict(outcome: StreamOutcome, translator: Any) -> bool | None:
    """Served (True), could not serve (False), or nothing said about the backend: the client
    left, or the stream ended for a reason of the gateway's own (a shutdown) or the client's."""
    if not outcome.completed:
        return None
    error = translator.error
    if error is None:
        return True
    return False if error.backend_fault else None


def _tokens(usage: Any) -> dict[str, int]:
    if not isinstance(usage, dict):
        return {}
    return {
        "input_tokens": (usage.get("input_tokens") or 0)
        + (usage.get("cache_read_input_tokens") or 0),
        "output_tokens": usage.get("output_tokens") or 0,
        "cached_tokens": usage.get("cache_read_input_tokens") or 0,
    }
