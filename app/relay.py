"""The streamed response body: backend SSE bytes in, Anthropic SSE bytes out, as they come.

A plain generator (no Flask request context inside), so gunicorn writes each piece as soon as it
is yielded, and ``close()`` on client disconnect lands in the ``finally`` that closes the
backend connection and so stops generation there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import requests

from app.errors import GatewayError, UpstreamError, UpstreamTimeout
from app.translate.passthrough import PassthroughStream
from app.translate.sse import DONE, SSEDecoder, encode_all
from app.translate.stream import StreamTranslator
from app.upstream import UpstreamClient

log = logging.getLogger("gateway")
Translator = StreamTranslator | PassthroughStream


class StreamOutcome:
    """What the access log needs once the stream is over."""

    __slots__ = ("first_token_at", "completed", "bytes_out")

    def __init__(self) -> None:
        self.first_token_at: float | None = None
        self.completed = False  # False at the end means the client went away mid-stream
        self.bytes_out = 0


def relay(
    client: UpstreamClient,
    response: requests.Response,
    translator: Translator,
    on_end: Callable[[StreamOutcome], None],
    *,
    deadline: float | None = None,
) -> Iterator[bytes]:
    """``deadline`` (monotonic): past it the stream ends with a timeout error event."""
    outcome = StreamOutcome()
    try:
        head = encode_all(translator.start())
        outcome.bytes_out += len(head)
        yield head
        for piece in _translate(client, response, translator, outcome, deadline):
            outcome.bytes_out += len(piece)
            yield piece
        outcome.completed = True
        if translator.stop_reason is not None:
            _drain(client, response)
    finally:
        response.close()
        on_end(outcome)


def _translate(
    client: UpstreamClient,
    response: requests.Response,
    translator: Translator,
    outcome: StreamOutcome,
    deadline: float | None,
) -> Iterator[bytes]:
    decoder = SSEDecoder()
    saw_done = False
    try:
        for data in client.iter_bytes(response):
            events = []
            for payload in decoder.feed(data):
                if payload == DONE:
                    saw_done = True
                    break
                events.extend(translator.feed_data(payload))
            if events:
                if outcome.first_token_at is None:
                    outcome.first_token_at = time.monotonic()
                yield encode_all(events)
            if saw_done or translator.ended:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise UpstreamTimeout(f"backend {client.name} exceeded the total time allowed")
        else:
            events = [e for p in decoder.close() if p != DONE for e in translator.feed_data(p)]
            if events:
                yield encode_all(events)
        final = translator.finish(saw_done=saw_done)
    except GatewayError as exc:
        # A broken connection after the finish reason loses only the usage chunk.
        if translator.finish_reason:
            final = translator.finish(saw_done=True)
        else:
            final = translator.fail(exc)
    except Exception:
        log.exception("stream relay failed")
        final = translator.fail(UpstreamError("internal error while relaying the stream"))
    if final:
        yield encode_all(final)


def _drain(client: UpstreamClient, response: requests.Response) -> None:
    """Read to the end of the body after ``[DONE]`` so the connection returns to the pool."""
    try:
        for _ in client.iter_bytes(response):
            pass
    except GatewayError:
        pass
