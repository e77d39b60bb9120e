"""gunicorn's gevent worker with five changes: a cheaper ``sendall`` on client sockets, a
response's head sent together with its first body bytes, a ``Date`` header formatted once
per second, a garbage collector tuned for a long-lived heap, and three per-request costs of
gunicorn's own code cut (app/gunicorn_speedups.py).

gevent's ``sendall`` asks the kernel for SO_SNDBUF on every call (a ``getsockopt`` system call,
to size its write chunks) and gunicorn calls it once per streamed event: profiled, that was a
tenth of the worker's CPU per relayed chunk. Here a write goes straight to the socket and only
what does not fit takes gevent's cooperative ``send``. Everything else is the stock gevent
worker. The module imports nothing of the app but app.gunicorn_speedups (which imports only
gunicorn), because gunicorn loads worker classes in the master.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from typing import Any

import gevent
from gunicorn import util as gunicorn_util
from gunicorn.workers.ggevent import GeventWorker

from app import gunicorn_speedups


class ClientSocket:
    """A client socket with a cheaper ``sendall``, which also sends a response's head with
    its first body bytes.

    A write first goes straight to the non-blocking socket under gevent's (most writes fit
    in the send buffer at once); only what does not fit takes gevent's cooperative ``send``.
    A TLS socket (gunicorn's own ``certfile``) always takes gevent's path: its plain socket
    carries ciphertext.

    gunicorn writes a response's head and then each body piece, each with its own
    ``sendall``: two system calls (and two wake-ups of the client) for every JSON answer and
    for a stream's first event. While ``hold_head`` is set (the worker sets it for each
    request), the first write, if it is a final response head, is kept and goes out with the
    next one; the worker flushes whatever is still held when the request is done.
    """

    __slots__ = ("_sock", "_raw", "hold_head", "_held")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._raw = None if hasattr(sock, "pending") else getattr(sock, "_sock", None)
        self.hold_head = False
        self._held = b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def sendall(self, data: bytes) -> None:
        if self.hold_head:
            self.hold_head = False
            if data[:5] == b"HTTP/" and data[9:10] != b"1":  # a head, not 100 Continue
                self._held = data
                return
        if self._held:
            data, self._held = self._held + data, b""
        self._send(data)

    def flush(self) -> None:
        self.hold_head = False
        if self._held:
            data, self._held = self._held, b""
            self._send(data)

    def _send(self, data: bytes) -> None:
        sent = 0
        if self._raw is not None:
            try:
                sent = self._raw.send(data)
            except BlockingIOError:
                pass
        if sent < len(data):
            view = memoryview(data)
            send = self._sock.send
            while sent < len(view):
                sent += send(view[sent:])


class CachedHTTPDate:
    """gunicorn's ``Date`` header, formatted once per second instead of once per response
    (``email.utils.formatdate`` was 3% of the worker's CPU per request)."""

    def __init__(self, format_date: Callable[..., str]) -> None:
        self.format_date = format_date
        self.second = -1
        self.text = ""

    def __call__(self, timestamp: float | None = None) -> str:
        if timestamp is not None:
            return self.format_date(timestamp)
        now = time.time()
        second = int(now)
        if second != self.second:
            self.text = self.format_date(now)
            self.second = second
        return self.text


# Young objects collected after this many net allocations (CPython's default is 700), and the
# older generations less often. See GatewayWorker.load_wsgi.
GC_THRESHOLDS = (20_000, 50, 100)


def tune_gc() -> None:
    """Collect what loading the app left behind, then move every object alive now (modules,
    the app, its config and tables) out of the collector's sight, and collect less often.

    A worker holding hundreds of open streams has a large heap of objects that live for the
    whole request, and each of CPython's collections of the older generations walks all of it:
    profiled under 500 streams arriving at once, the collector was a tenth of the worker's CPU.
    Cycles are still collected; only the frozen startup objects are never scanned again.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class GatewayWorker(GeventWorker):
    def init_process(self) -> None:
        if not isinstance(gunicorn_util.http_date, CachedHTTPDate):
            gunicorn_util.http_date = CachedHTTPDate(gunicorn_util.http_date)
        gunicorn_speedups.apply(self.cfg)
        super().init_process()

    def handle_usr1(self, sig: int, frame: Any) -> None:
        # As GeventWorker does, off the signal handler; the environ base (whose wsgi.errors
        # holds the log's streams) is built again only once the files are reopened.
        def reopen() -> None:
            super(GeventWorker, self).handle_usr1(sig, frame)
            gunicorn_speedups.forget_base_environ()

        gevent.spawn(reopen)

    def load_wsgi(self) -> None:
        super().load_wsgi()
        tune_gc()  # in the worker, after the fork and the app's import

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        super().handle(listener, ClientSocket(client), addr)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        sock.hold_head = True
        try:
            done = super().handle_request(listener_name, req, sock, addr)
        except BaseException:  # StopIteration included: gunicorn's "close after this response"
            with contextlib.suppress(OSError):
                sock.flush()
            raise
        sock.flush()
        return done
