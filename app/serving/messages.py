"""``POST /v1/messages``: from a parsed body to the response, JSON or a relayed stream.

Check, route, hold the key to its limits, dispatch (translation happens per backend attempt),
translate the answer back. What the request did goes into its outcome (app.serving.outcome)
as it is learnt; a JSON answer's end is the hooks' (app.serving.web), a stream's is its own
(``_stream``), and whichever it is gives back the backend's slot, the thread's claim and the
key's, and writes the access line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, cast

import requests
from flask import Response

from app import ids, jsonc
from app.backends.dispatch import Attempt, Dispatcher, backend_streams
from app.backends.routing import resolve
from app.config import Route, Settings
from app.errors import GatewayError, UpstreamError
from app.ops import metrics
from app.policy.threads import ThreadTurn, begin_turn
from app.serving.green import client_watch
from app.serving.outcome import Answer, Delivery, RequestOutcome, Tokens
from app.serving.prompt_count import PromptCount
from app.serving.relay import Observer, StreamOutcome, Translator, relay
from app.serving.state import Phase, RequestState, run_each
from app.state.guard import GuardedStore
from app.translate.accumulate import MessageAccumulator
from app.translate.passthrough import PassthroughStream, passthrough_id, passthrough_stop
from app.translate.request import check_request, stop_sequences
from app.translate.response import translate_response
from app.translate.sse import encode_all
from app.translate.stream import StreamTranslator, message_events
from app.translate.text_filter import prefill_of
from app.translate.tools import parallel_disabled

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
JSON = "application/json"
THREAD_KINDS = ("create", "continue")


class Messages:
    """The messages route of one worker: its settings, its backends and its store."""

    def __init__(self, settings: Settings, dispatcher: Dispatcher, store: GuardedStore) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.store = store

    def create(
        self,
        body: Any,
        state: RequestState,
        headers: Mapping[str, str],
        environ: dict[str, Any],
    ) -> Response:
        """The answer to one request; a thread's turn, if it is one, fails with it."""
        outcome = _outcome(state)
        turn = None
        if isinstance(body, dict):
            thread = body.get("thread")
            if isinstance(thread, dict) and thread.get("type") in THREAD_KINDS:
                outcome.thread = thread["type"]  # also when the thread is refused
            turn = begin_turn(body, state.owner, self.store, self.settings.threads)
        try:
            return self._create(body, state, turn, headers, environ)
        except BaseException:
            if turn is not None:
                turn.failed()
            raise

    def _create(
        self,
        body: Any,
        state: RequestState,
        turn: ThreadTurn | None,
        headers: Mapping[str, str],
        environ: dict[str, Any],
    ) -> Response:
        check_request(body)
        route = resolve(self.settings, body["model"])
        outcome = _outcome(state)
        stream = bool(body.get("stream"))
        outcome.model, outcome.route, outcome.stream = body["model"], route.name, stream
        state.admit(body)
        dispatcher = self.dispatcher
        count = PromptCount(state.request_id) if backend_streams(body) else None
        # Until the first byte goes to the client, a client that hangs up ends the request,
        # and with it the backend's work on it.
        with client_watch(environ):
            attempt = self._send(route, body, state, headers, count)
            try:
                if count is not None and _is_event_stream(attempt.result):
                    translator = _translator(attempt, body, count, relayed=stream)
                    if stream:
                        return _stream(dispatcher, attempt, translator, state, self.settings, turn)
                    response = _collect(attempt, translator, body, state, outcome, turn)
                else:
                    response = _whole_answer(attempt, body, outcome, stream, turn)
            except BaseException as exc:
                _abandon(dispatcher, attempt, exc)
                raise
        dispatcher.finish(attempt, ok=True)
        return response

    def _send(
        self,
        route: Route,
        body: Any,
        state: RequestState,
        headers: Mapping[str, str],
        count: PromptCount | None,
    ) -> Attempt:
        """The first backend that answered, recorded in the request's outcome; ``count``
        learns the prompt each attempt sends, to count it while the backend works."""
        attempt = self.dispatcher.send(
            route,
            body,
            state.request_id,
            headers,
            on_send=count.start if count is not None else None,
            pinned=state.batch.backend if state.batch is not None else None,
            trace=state.trace,
        )
        outcome = _outcome(state)
        outcome.backend = attempt.target.backend
        outcome.backend_model = attempt.model
        outcome.attempts = attempt.attempts
        outcome.routed = attempt.routed
        return attempt


def _outcome(state: RequestState) -> RequestOutcome:
    """The outcome every /v1/ request has (app.serving.web's first hook made it)."""
    outcome = state.outcome
    assert outcome is not None
    return outcome


def _whole_answer(
    attempt: Attempt,
    body: dict[str, Any],
    outcome: RequestOutcome,
    stream: bool,
    turn: ThreadTurn | None,
) -> Response:
    """A complete answer: JSON, or for a stream request (a backend that ignored ``stream``
    answers with JSON too) the same message as a stream of events. A thread keeps it before
    the client can read it, so the client's next turn finds it."""
    if isinstance(attempt.result, requests.Response):
        attempt = replace(attempt, result=_read_whole(attempt))
    if attempt.span is not None and isinstance(attempt.result, dict):
        named = attempt.result.get("model")  # the backend's own name, for the trace
        attempt.span.response_model = named if isinstance(named, str) else None
    return _answer(attempt, _message(attempt, body), outcome, stream, turn)


def _answer(
    attempt: Attempt,
    message: dict[str, Any],
    outcome: RequestOutcome,
    stream: bool,
    turn: ThreadTurn | None,
) -> Response:
    stop_reason = message.get("stop_reason")
    outcome.answer = Answer(
        stop_reason if isinstance(stop_reason, str) else None, Tokens.of(message.get("usage"))
    )
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
            raise UpstreamError(
                f"backend {attempt.client.name} returned no message", backend_fault=True
            )
        fixed = {**passthrough_stop(message), **passthrough_id(message)}
        return {**message, "model": body["model"], **fixed}
    options = _answer_options(attempt, body)
    # A Message is a dict at run time; the views add to it as to any answer.
    return cast(dict[str, Any], translate_response(attempt.result, **options))


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
        "backend": attempt.client.name,
    }


def _deadline(attempt: Attempt, state: RequestState) -> float | None:
    """When the backend's answer must be over (monotonic), counted from the request's start."""
    total = attempt.client.config.timeouts.total
    return state.started + total if total else None


def _translator(
    attempt: Attempt, body: dict[str, Any], count: PromptCount, *, relayed: bool
) -> Translator:
    """``relayed``: the events go to the client as they come (else they are added up into
    one JSON answer, and tool arguments are best held to each call's end and repaired)."""
    if attempt.client.config.protocol == "anthropic":
        return PassthroughStream(model=body["model"])
    options = _answer_options(attempt, body)
    return StreamTranslator(**options, input_tokens=count.get, stream_tools=relayed)


def _collect(
    attempt: Attempt,
    translator: Translator,
    body: dict[str, Any],
    state: RequestState,
    outcome: RequestOutcome,
    turn: ThreadTurn | None,
) -> Response:
    """A JSON answer read as a stream from the backend (a request with stop sequences: the
    backend's work ends as soon as one appears), added up into one message."""
    reply = MessageAccumulator()
    pieces = relay(
        attempt.client,
        attempt.result,
        translator,
        lambda end: None,
        deadline=_deadline(attempt, state),
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
        raise UpstreamError(
            f"backend {attempt.client.name} returned no message", backend_fault=True
        )
    return _answer(attempt, {**message, "model": body["model"]}, outcome, False, turn)


def _stream(
    dispatcher: Dispatcher,
    attempt: Attempt,
    translator: Translator,
    state: RequestState,
    settings: Settings,
    turn: ThreadTurn | None,
) -> Response:
    """The answer relayed as it comes. From here on the stream's end (``StreamBody.close``,
    which gunicorn always calls) ends the request: the backend's slot and the gauge back, the
    thread's claim given back unless its reply was kept, the access line written and the
    key settled with the store (its slot back, its tokens as used). Each of those runs
    whatever happened to the others."""
    outcome = _outcome(state)
    in_flight = metrics.streams_in_flight(attempt.target.backend)

    def on_end(end: StreamOutcome) -> None:
        _note_delivery(outcome, end)
        run_each(
            (
                in_flight.dec,
                turn.failed if turn is not None else _nothing,  # unless kept at message_stop
                lambda: dispatcher.finish(attempt, ok=_stream_verdict(end, translator)),
                lambda: _note_end(outcome, end, translator, state.started),
                state.end,
            ),
            state.request_id,
        )

    body = relay(
        attempt.client,
        attempt.result,
        translator,
        on_end,
        deadline=_deadline(attempt, state),
        ping_interval=settings.ping_interval,
        observe=_thread_observer(turn) if turn is not None else None,
    )
    response = Response(
        body, mimetype="text/event-stream", headers={**SSE_HEADERS, **attempt.headers}
    )
    response.direct_passthrough = True  # app.serving.relay.StreamBody: gunicorn iterates the relay
    in_flight.inc()
    state.stream = body
    state.advance(Phase.STREAMING)
    return response


def _nothing() -> None:
    pass


def _note_delivery(outcome: RequestOutcome, end: StreamOutcome) -> None:
    """How the stream left. One that never did was replaced by an error answer, whose status
    is the outcome's already, or its client hung up just as it was built (499)."""
    if end.relayed:
        outcome.status, outcome.delivery = 200, Delivery.STREAM
        outcome.client_disconnected = not end.completed
    elif outcome.status is None:
        outcome.status, outcome.delivery, outcome.client_disconnected = 499, Delivery.NONE, True


def _note_end(
    outcome: RequestOutcome, end: StreamOutcome, translator: Translator, started: float
) -> None:
    """What the stream did, into the request's outcome; the usage last, as the one part a
    backend's odd stream can make unreadable. Nothing, for a stream that never left."""
    if not end.relayed:
        return
    outcome.error = translator.error_type
    outcome.bytes_out = end.bytes_out
    if end.first_token_at is not None:
        outcome.ttft = end.first_token_at - started
    outcome.answer = answer = Answer(translator.stop_reason)
    answer.tokens = Tokens.of(translator.final_usage)


def _thread_observer(turn: ThreadTurn) -> Observer:
    """Adds up the streamed reply; at ``message_stop``, before it is written, the thread
    keeps it, so a client that continues on reading it finds it."""
    reply = MessageAccumulator()

    def observe(events: Sequence[Mapping[str, Any]]) -> None:
        reply.feed(events)
        if reply.complete and not turn.done:
            message = reply.message
            if message is not None:
                turn.succeeded(message)

    return observe


def _stream_verdict(end: StreamOutcome, translator: Translator) -> bool | None:
    """Served (True), could not serve (False), or nothing said about the backend: the client
    left, or the stream ended for a reason of the gateway's own (a shutdown) or the client's."""
    if not end.completed:
        return None
    error = translator.error
    if error is None:
        return True
    return False if error.backend_fault else None
