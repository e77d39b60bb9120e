"""The streamed response body: backend SSE bytes in, Anthropic SSE bytes out, as they come.

A plain generator (no Flask request context inside), so gunicorn writes each piece as soon as it
is yielded, and ``close()`` on client disconnect lands in the ``finally`` that closes the
backend response and so stops generation there.

The backend body is iterated by requests in a pump (app.serving.pump), so the relay can wait
on it with a timeout: it wakes while the backend is silent to send ``ping`` events (which keep
proxies from timing the stream out and reveal a client that went away), to enforce the idle and
total timeouts, and to end the stream cleanly when the worker is shutting down. Pieces that
arrived together are translated together and leave in one write.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import requests

from app.backends.client import BackendClient
from app.errors import GatewayError, Overloaded, UpstreamError, UpstreamTimeout
from app.serving import lifecycle
from app.serving.pump import END, Pump
from app.translate.passthrough import PassthroughStream
from app.translate.sse import DONE, SSEDecoder, encode, encode_all
from app.translate.stream import PING, StreamTranslator

log = logging.getLogger("gateway")
Translator = StreamTranslator | PassthroughStream
Observer = Callable[[Sequence[Mapping[str, Any]]], None]
PING_BYTES = encode(PING)
# The longest the relay sleeps in a silent stream: how late it can notice a shutdown.
MAX_WAKE = 1.0
# After [DONE], how long to wait for the body's end so the connection can be pooled again.
DRAIN_WAIT = 1.0


class StreamOutcome:
    """What the relay saw of the stream, for the request's outcome once it is over
    (app.serving.messages puts it there)."""

    __slots__ = ("relayed", "first_token_at", "completed", "bytes_out")

    def __init__(self) -> None:
        self.relayed = False  # False at the end: its response never left the app
        self.first_token_at: float | None = None
        self.completed = False  # False at the end means the client went away mid-stream
        self.bytes_out = 0


class StreamBody:
    """A relayed stream as a WSGI body, handed to gunicorn as it is (the Flask response is
    ``direct_passthrough``): gunicorn then resumes the relay generator itself for each piece,
    with no werkzeug wrapper adding two Python calls per chunk. ``close`` (gunicorn calls it
    when the response is over or the client has gone; the request's last hook when the
    response never left the app) closes the generator, and ends the stream's bookkeeping
    even if the generator never ran: then it closes the backend's answer too (``unread``),
    which only the generator would otherwise have read or closed."""

    __slots__ = ("pieces", "outcome", "on_end", "ended", "unread")

    def __init__(
        self, on_end: Callable[[StreamOutcome], None], unread: Callable[[], None] | None = None
    ) -> None:
        self.outcome = StreamOutcome()
        self.on_end = on_end
        self.ended = False
        self.pieces: Iterator[bytes] = iter(())
        self.unread = unread

    def __iter__(self) -> Iterator[bytes]:
        return self.pieces

    def close(self) -> None:
        try:
            close = getattr(self.pieces, "close", None)
            if close is not None:
                close()
            if not self.ended and self.unread is not None:  # the generator never ran
                self.unread()
        finally:
            self.end()

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.on_end(self.outcome)


def relay(
    client: BackendClient,
    response: requests.Response,
    translator: Translator,
    on_end: Callable[[StreamOutcome], None],
    *,
    deadline: float | None = None,
    ping_interval: float,
    observe: Observer | None = None,
) -> StreamBody:
    """``deadline`` (monotonic): past it the stream ends with a timeout error event.
    ``observe`` sees every list of events before it is written (a thread keeps its reply)."""
    stream = StreamBody(on_end, unread=response.close)
    stream.pieces = _relay(stream, client, response, translator, deadline, ping_interval, observe)
    return stream


def _relay(
    stream: StreamBody,
    client: BackendClient,
    response: requests.Response,
    translator: Translator,
    deadline: float | None,
    ping_interval: float,
    observe: Observer | None,
) -> Iterator[bytes]:
    outcome = stream.outcome
    outcome.relayed = True
    pump = Pump(client.chunks(response), lambda: _stop_reading(response))
    try:
        start = translator.start()
        if observe is not None:
            observe(start)
        head = encode_all(start)
        if head:  # message_start at once: the backend may think for a while
            outcome.bytes_out += len(head)
            yield head
        items = _items(pump, client, ping_interval, deadline)
        decoder = SSEDecoder(client.config.max_line_bytes)
        for piece in _translate(items, decoder, translator, outcome, observe):
            outcome.bytes_out += len(piece)
            yield piece
        outcome.completed = True
        if translator.stop_reason is not None and not translator.cut:
            _await_end(pump, DRAIN_WAIT)  # (after a stop sequence the backend is still writing)
    finally:
        if pump.close():  # closing the body under a read still in progress would fail
            response.close()
        stream.end()


def _stop_reading(response: requests.Response) -> None:
    """Make a read blocked on the backend's socket return (urllib3's ``shutdown``)."""
    try:
        response.raw.shutdown()
    except (ValueError, RuntimeError, OSError):
        pass  # no socket any more: the body was read to its end, or it is closed


def _await_end(pump: Pump, seconds: float) -> None:
    """After the answer's end ([DONE]): let the body's last bytes (normally here already) be
    read, so that its connection goes back to the pool instead of being closed."""
    deadline = time.monotonic() + seconds
    while not pump.done and (left := deadline - time.monotonic()) > 0:
        pump.get(left)


def _items(
    pump: Pump, client: BackendClient, ping_interval: float, deadline: float | None
) -> Iterator[bytes | None]:
    """Body bytes as they arrive (what arrived together, joined); None when a ping is due;
    errors for a failed read, timeouts and shutdown."""
    name, idle = client.name, client.idle_timeout
    wake = min(t for t in (ping_interval, idle, MAX_WAKE) if t)
    last_data = last_ping = time.monotonic()
    while True:
        if lifecycle.draining:
            raise Overloaded("the gateway is restarting; please retry the request")
        item = pump.get(wake)
        now = time.monotonic()
        if deadline is not None and now > deadline:
            message = f"backend {name} exceeded the total time allowed"
            raise UpstreamTimeout(message, backend_fault=True)
        if item is None:
            if now - last_data >= idle:
                message = f"backend {name} sent nothing for {idle:g} s"
                raise UpstreamTimeout(message, backend_fault=True)
            if ping_interval and now - last_ping >= ping_interval:
                last_ping = now
                yield None
            continue
        if item is END:
            return
        if isinstance(item, BaseException):
            raise _read_error(client, item)
        last_data = last_ping = now
        pieces = [item]
        while isinstance(more := pump.ready(), bytes):
            pieces.append(more)
        yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if more is END:
            return
        if more is not None:
            raise _read_error(client, more)


def _read_error(client: BackendClient, exc: BaseException) -> GatewayError:
    """A failed body read: a timeout, or a body cut short (the usual case: the connection
    closed, reset, or broke the chunked framing, which all say the same to the client)."""
    if isinstance(exc, GatewayError):
        return exc
    error = client.transport_error(exc)
    if isinstance(error, UpstreamTimeout):
        return error
    message = f"backend {client.name} closed the stream before the answer was complete"
    return UpstreamError(message, backend_fault=True)


def _translate(
    items: Iterator[bytes | None],
    decoder: SSEDecoder,
    translator: Translator,
    outcome: StreamOutcome,
    observe: Observer | None,
) -> Iterator[bytes]:
    saw_done = False
    try:
        for data in items:
            if data is None:
                yield PING_BYTES
                continue
            events: list[Mapping[str, Any]] = []
            for payload in decoder.feed(data):
                if payload == DONE:
                    saw_done = True
                    break
                events.extend(translator.feed_data(payload))
            if events:
                if outcome.first_token_at is None:
                    outcome.first_token_at = time.monotonic()
                if observe is not None:
                    observe(events)
                yield encode_all(events)
            if saw_done or translator.ended:
                break
        else:
            events = [e for p in decoder.close() if p != DONE for e in translator.feed_data(p)]
            if events:
                if observe is not None:
                    observe(events)
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
        if observe is not None:
            observe(final)
        yield encode_all(final)
