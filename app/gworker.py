"""gunicorn's gevent worker with two changes: a cheaper ``sendall`` on client sockets, and a
``Date`` header formatted once per second.

gevent's ``sendall`` asks the kernel for SO_SNDBUF on every call (a ``getsockopt`` system call,
to size its write chunks) and gunicorn calls it once per streamed event: profiled, that was a
tenth of the worker's CPU per relayed chunk. Here ``sendall`` is a loop over ``send``, which
gevent makes cooperative the same way. Everything else is the stock gevent worker; the module
imports nothing of the app, because gunicorn loads worker classes in the master.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gunicorn import util as gunicorn_util
from gunicorn.workers.ggevent import GeventWorker


class ClientSocket:
    """A client socket whose ``sendall`` sends without the per-call ``getsockopt``.

    A write first goes straight to the non-blocking socket under gevent's (most writes fit
    in the send buffer at once); only what does not fit takes gevent's cooperative ``send``.
    A TLS socket (gunicorn's own ``certfile``) always takes gevent's path: its plain socket
    carries ciphertext.
    """

    __slots__ = ("_sock", "_raw")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._raw = None if hasattr(sock, "pending") else getattr(sock, "_sock", None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def sendall(self, data: bytes) -> None:
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


class GatewayWorker(GeventWorker):
    def init_process(self) -> None:
        if not isinstance(gunicorn_util.http_date, CachedHTTPDate):
            gunicorn_util.http_date = CachedHTTPDate(gunicorn_util.http_date)
        super().init_process()

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        super().handle(listener, ClientSocket(client), addr)
