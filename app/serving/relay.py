"""The streamed response body: backend SSE bytes in, Anthropic SSE bytes out, as they come.

A plain generator (no Flask request context inside), so gunicorn writes each piece as soon as it
is yielded, and ``close()`` on client disconnect lands in the ``finally`` that closes the
backend connection and so stops generation there.

The backend body is read with a short socket timeout (app.backends.client.BodyReader), so the relay
wakes up while the backend is silent: to send ``ping`` events (which keep proxies from timing
the stream out and reveal a client that went away), to enforce the idle and total timeouts,
and to end the stream cleanly when the worker is shutting down.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from app.backend_http import Response
from app.backends.client import BodyReader, UpstreamClient
from app.errors import GatewayError, Overloaded, UpstreamError, UpstreamTimeout
from app.serving import lifecycle
from app.translate.passthrough import PassthroughStream
from app.translate.sse import DONE, SSEDecoder, encode, encode_all
from app.translate.stream import PING, StreamTranslator

log = logging.getLogger("gateway")
Translator = StreamTranslator | PassthroughStream
PING_BYTES = encode(PING)
# The longest the relay sleeps in a silent stream: how late it can notice a shutdown.
MAX_WAKE = 1.0
# A moment of backend silence with no ping due (``_items``): nothing to translate.
SILENCE = b""
# After [DONE], how long to wait for the body's end so the connection can be pooled again.
DRAIN_WAIT = 1.0


class StreamOutcome:
    """What the access log needs once the stream is over."""

    __slots__ = ("first_token_at", "completed", "bytes_out")

    def __init__(self) -> None:
        self.first_token_at: float | None = None
        self.completed = False  # False at the end means the client went away mid-stream
        self.bytes_out = 0


class StreamBody:
    """A relayed stream as a WSGI body, handed to gunicorn as it is (the Flask response is
    ``direct_passthrough``): gunicorn then resumes the relay generator itself for each piece,
    with no werkzeug wrapper adding two Python calls per chunk. ``close`` (gunicorn calls it
    when the response is over or the client has gone) closes the generator, and ends the
    stream's bookkeeping even if the generator never ran."""

    __slots__ = ("pieces", "outcome", "on_end", "ended")

    def __init__(self, on_end: Callable[[StreamOutcome], None]) -> None:
        self.outcome = StreamOutcome()
        self.on_end = on_end
        self.ended = False
        self.pieces: Iterator[bytes] = iter(())

    def __iter__(self) -> Iterator[bytes]:
        return self.pieces

    def close(self) -> None:
        close = getattr(self.pieces, "close", None)
        if close is not None:
            close()
        self.end()

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.on_end(self.outcome)


def relay(
    client: UpstreamClient,
    response: Response,
    translator: Translator,
    on_end: Callable[[StreamOutcome], None],
    *,
    deadline: float | None = None,
    ping_interval: float = 15.0,
) -> StreamBody:
    """``deadline`` (monotonic): past it the stream ends with a timeout error event."""
    stream = StreamBody(on_end)
    stream.pieces = _relay(stream, client, response, translator, deadline, ping_interval)
    return stream


def _relay(
    stream: StreamBody,
    client: UpstreamClient,
    response: Response,
    translator: Translator,
    deadline: float | None,
    ping_interval: float,
) -> Iterator[bytes]:
    outcome = stream.outcome
    idle = client.idle_timeout
    wake = min(t for t in (ping_interval, idle, MAX_WAKE) if t)
    body = BodyReader(client, response, wake)
    try:
        head = encode_all(translator.start())
        if head and not body.pending:  # the backend is still thinking: tell the client now
            outcome.bytes_out += len(head)
            yield head
            head = b""
        # Else body bytes came with the backend's head: message_start goes out with whatever
        # they translate to, in one write, and alone if that is nothing (a role-only chunk).
        items = _items(body, client.name, ping_interval, idle, deadline)
        for piece in _translate(items, translator, outcome):
            if head:
                piece, head = head + piece, b""
            if piece:
                outcome.bytes_out += len(piece)
                yield piece
        if head:
            outcome.bytes_out += len(head)
            yield head
        outcome.completed = True
        if translator.stop_reason is not None and not body.complete:
            body.drain(DRAIN_WAIT)
    finally:
        body.close()
        stream.end()


def _items(
    body: BodyReader, name: str, ping_interval: float, idle: float, deadline: float | None
) -> Iterator[bytes | None]:
    """Body bytes as they arrive; None when a ping is due, SILENCE after a quiet ``wake``;
    errors for timeouts and shutdown."""
    last_data = last_ping = time.monotonic()
    while True:
        if lifecycle.draining:
            raise Overloaded("the gateway is restarting; please retry the request")
        data = body.read()
        now = time.monotonic()
        if deadline is not None and now > deadline:
            raise UpstreamTimeout(f"backend {name} exceeded the total time allowed")
        if data is None:
            if now - last_data >= idle:
                raise UpstreamTimeout(f"backend {name} sent nothing for {idle:g} s")
            if ping_interval and now - last_ping >= ping_interval:
                last_ping = now
                yield None
            else:
                yield SILENCE
            continue
        if not data:
            return
        last_data = last_ping = now
        yield data


def _translate(
    items: Iterator[bytes | None], translator: Translator, outcome: StreamOutcome
) -> Iterator[bytes]:
    decoder = SSEDecoder()
    saw_done = False
    try:
        for data in items:
            if data is None:
                yield PING_BYTES
                continue
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
            else:
                yield b""  # nothing to send, but the caller may hold something to flush
            if saw_done or translator.ended:
                break
        else:
            events = [e for p in decoder.close() if p != DONE for e in translator.feed_data(p)]
            if events:
                yield encode_all(events)
        final = translator.finish(saw_done=saw_done)
    except GatewayError as exc:
        # A broken connection after the finish reason loses only the usage chunk.
        if translator.finish_reason and not isinstance(exc, Overloaded):
            final = translator.finish(saw_done=True)
        else:
            final = translator.fail(exc)
    except Exception:
        log.exception("stream relay failed")
        final = translator.fail(UpstreamError("internal error while relaying the stream"))
    if final:
        yield encode_all(final)
