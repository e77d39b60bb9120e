"""The streamed response body: backend SSE bytes in, Anthropic SSE bytes out, as they come.

A plain generator (no Flask request context inside), so gunicorn writes each piece as soon as it
is yielded, and ``close()`` on client disconnect lands in the ``finally`` that closes the
backend connection and so stops generation there.

The backend is read by a helper thread (a greenlet under gevent) feeding a queue, so that the
relay wakes up while the backend is silent: to send ``ping`` events (which keep proxies from
timing the stream out and reveal a client that went away), to enforce the total deadline, and
to end the stream cleanly when the worker is shutting down.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator

from urllib3 import HTTPResponse

from app import lifecycle
from app.errors import GatewayError, Overloaded, UpstreamError, UpstreamTimeout
from app.translate.passthrough import PassthroughStream
from app.translate.sse import DONE, SSEDecoder, encode, encode_all
from app.translate.stream import PING, StreamTranslator
from app.upstream import UpstreamClient

log = logging.getLogger("gateway")
Translator = StreamTranslator | PassthroughStream
PING_BYTES = encode(PING)
_EOF = object()
# After [DONE], how long to wait for the body's end so the connection can be pooled again.
DRAIN_WAIT = 1.0


class StreamOutcome:
    """What the access log needs once the stream is over."""

    __slots__ = ("first_token_at", "completed", "bytes_out")

    def __init__(self) -> None:
        self.first_token_at: float | None = None
        self.completed = False  # False at the end means the client went away mid-stream
        self.bytes_out = 0


def relay(
    client: UpstreamClient,
    response: HTTPResponse,
    translator: Translator,
    on_end: Callable[[StreamOutcome], None],
    *,
    deadline: float | None = None,
    ping_interval: float = 15.0,
) -> Iterator[bytes]:
    """``deadline`` (monotonic): past it the stream ends with a timeout error event."""
    outcome = StreamOutcome()
    # Without pings or a deadline nothing needs waking: read directly, no helper thread.
    reader = _Reader(client, response) if ping_interval or deadline else None
    try:
        head = encode_all(translator.start())
        outcome.bytes_out += len(head)
        yield head
        items = reader.items(ping_interval, deadline) if reader else client.iter_bytes(response)
        for piece in _translate(items, client, translator, outcome, deadline):
            outcome.bytes_out += len(piece)
            yield piece
        outcome.completed = True
        if translator.stop_reason is not None:
            if reader:
                reader.wait_for_end(DRAIN_WAIT)
            else:
                _drain(client, response)
    finally:
        if reader:
            reader.close()
        else:
            response.close()
        on_end(outcome)


def _spawn(target: Callable[[], None]) -> None:
    """Run ``target`` concurrently: a greenlet under gevent (without Thread.start's wait for
    the new thread to run, a full trip round the event loop), else a daemon thread."""
    if _gevent_threads():
        import gevent

        gevent.spawn(target)
    else:
        threading.Thread(target=target, daemon=True).start()


def _gevent_threads() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey and monkey.is_module_patched("threading"))


class _Reader:
    """The backend body, read in its own thread into a queue of byte blocks."""

    def __init__(self, client: UpstreamClient, response: HTTPResponse) -> None:
        self.client = client
        self.response = response
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.done = threading.Event()
        _spawn(self._run)
        lifecycle.register(self.queue)

    def _run(self) -> None:
        try:
            for data in self.client.iter_bytes(self.response):
                self.queue.put(data)
            self.queue.put(_EOF)
        except GatewayError as exc:
            self.queue.put(exc)
        except BaseException:  # closed under our feet: the relay is over anyway
            self.queue.put(UpstreamError(f"reading from backend {self.client.name} failed"))
        finally:
            self.done.set()

    def items(self, ping_interval: float, deadline: float | None) -> Iterator[bytes | None]:
        """Byte blocks as they arrive; None after each ``ping_interval`` of silence."""
        wait = ping_interval or None
        while True:
            if deadline is not None:
                left = max(deadline - time.monotonic(), 0.001)
                wait = min(wait, left) if wait else left
            try:
                item = self.queue.get(timeout=wait)
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise UpstreamTimeout(
                        f"backend {self.client.name} exceeded the total time allowed"
                    ) from None
                yield None
                continue
            if item is _EOF:
                return
            if item is lifecycle.DRAIN:
                raise Overloaded("the gateway is restarting; please retry the request")
            if isinstance(item, GatewayError):
                raise item
            yield item  # type: ignore[misc]

    def wait_for_end(self, seconds: float) -> None:
        """After [DONE], let the reader see the body's end so the connection is reused."""
        self.done.wait(seconds)

    def close(self) -> None:
        """Stop the reader and drop the connection (so the backend stops generating).

        The file object must not be closed under a read in progress, so the socket is shut
        down first, which ends the reader's blocked read, and the reader is awaited.
        """
        lifecycle.unregister(self.queue)
        if not self.done.is_set():
            try:
                self.response.shutdown()
            except (OSError, ValueError, RuntimeError, AttributeError):
                pass
            self.done.wait(2.0)
        try:
            self.response.close()
        except RuntimeError:  # the reader is somehow still inside a read
            log.warning("backend %s: connection closed while still being read", self.client.name)


def _translate(
    items: Iterator[bytes | None],
    client: UpstreamClient,
    translator: Translator,
    outcome: StreamOutcome,
    deadline: float | None,
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
        if translator.finish_reason and not isinstance(exc, Overloaded):
            final = translator.finish(saw_done=True)
        else:
            final = translator.fail(exc)
    except Exception:
        log.exception("stream relay failed")
        final = translator.fail(UpstreamError("internal error while relaying the stream"))
    if final:
        yield encode_all(final)


def _drain(client: UpstreamClient, response: HTTPResponse) -> None:
    """Read to the end of the body after ``[DONE]`` so the connection returns to the pool."""
    try:
        for _ in client.iter_bytes(response):
            pass
    except GatewayError:
        pass
