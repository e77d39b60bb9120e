"""gunicorn's gevent worker, with five changes, each through a method gunicorn's worker classes
exist to have overridden:

- ``handle``: gunicorn writes to the client through ``ClientSocket``, whose ``sendall`` is a
  loop of gevent's ``send`` and which sends a response's head with its first body bytes;
- ``timeout_ctx`` and ``handle_exit``: the wait for a connection's next request is registered,
  and ended on TERM or HUP, so that idle keep-alive connections close at once instead of
  holding the worker for the whole keep-alive time (75 s; nginx keeps some open all the time),
  while streams still drain;
- ``handle_request``: the app may ask for its connection to be closed after the answer
  (``close_connection``), for a request whose body it did not read: gunicorn would otherwise
  read and discard that body, however long, before the next request. The close lingers, as
  nginx's does: a bounded part of the rest is read and dropped first, so that the client is
  not answered with a reset before it has read the answer;
- ``handle_error``: gunicorn's own error answers (a malformed request line or header, 414,
  431, a broken chunked body) go out as Anthropic error envelopes, not HTML pages;
- ``load_wsgi``: the garbage collector is tuned for a long-lived heap.

The module imports nothing of the app, because gunicorn loads worker classes in the master.
"""

from __future__ import annotations

import contextlib
import gc
import html
import re
import socket
import ssl
import weakref
from collections.abc import MutableMapping
from typing import Any

import gevent
from gunicorn.workers.ggevent import GeventWorker

# Young objects collected after this many net allocations (CPython's default is 700), and the
# older generations less often. See tune_gc.
GC_THRESHOLDS = (20_000, 50, 100)

# A closing connection's unread bytes read and dropped first, at most this many and for at
# most this long, so that the client reads the answer instead of a reset (nginx lingers 5 s).
LINGER_BYTES = 1 << 20
LINGER_SECONDS = 2.0

# The request each connection is serving now, for close_connection; and the connections to
# close, lingering, after their answer.
_serving: MutableMapping[Any, Any] = weakref.WeakKeyDictionary()
_lingering: MutableMapping[Any, bool] = weakref.WeakKeyDictionary()


def close_connection(environ: MutableMapping[str, Any]) -> None:
    """Answer this request with ``Connection: close`` and close the connection after it.

    For an answer given without reading the request's body (a refused key, a body over the
    limit, one that is malformed or too slow): keeping the connection would make gunicorn read
    and discard the rest of that body first. Outside gunicorn's gevent worker, nothing happens.
    """
    sock = environ.get("gunicorn.socket")
    request = _serving.get(sock) if sock is not None else None
    if request is not None:
        request.must_close = True  # gunicorn's own per-request flag (Response.should_close)
        _lingering[sock] = True


def linger(sock: Any, most: int = LINGER_BYTES, seconds: float = LINGER_SECONDS) -> None:
    """Half-close, then read and drop what the client still sends, within bounds, yielding
    to the other greenlets between reads."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return
    buffer = bytearray(1 << 16)
    left = most
    with silent_timeout(seconds):
        while left > 0:
            try:
                got = sock.recv_into(buffer)
            except OSError:
                return
            if not got:
                return
            left -= got
            gevent.sleep(0)


def silent_timeout(seconds: float) -> gevent.Timeout:
    """A timeout that its own ``with`` block swallows: the block just ends."""
    # gevent documents False as this argument for exactly that; the stub allows exceptions only.
    return gevent.Timeout(seconds, False)  # type: ignore[arg-type]


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


class ClientSocket:
    """A client connection as gunicorn writes to it, through the gevent socket's public
    methods only.

    - ``sendall`` is a loop of gevent's ``send``: gevent's own ``sendall`` asks the kernel for
      SO_SNDBUF on every call, to size its pieces, and gunicorn calls it once per streamed
      event; profiled while relaying paced chunks, that ``getsockopt`` was 17% of the
      worker's CPU.
    - gunicorn writes a response's head and then each body piece, each with its own
      ``sendall``: two system calls (and two wake-ups of the client) for every JSON answer
      and for a stream's first event. While ``hold_head`` is set (the worker sets it for
      each request), the first write, if it is a final response head, is kept and goes out
      with the next one; the worker flushes whatever is still held when the request is done.

    Everything else goes to the socket as it is.
    """

    __slots__ = ("sock", "hold_head", "held", "__weakref__")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.hold_head = False
        self.held = b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def sendall(self, data: bytes) -> None:
        if self.hold_head:
            self.hold_head = False
            if data[:5] == b"HTTP/" and data[9:10] != b"1":  # a head, not 100 Continue
                self.held = data
                return
        if self.held:
            data, self.held = self.held + data, b""
        self._send(data)

    def flush(self) -> None:
        self.hold_head = False
        if self.held:
            data, self.held = self.held, b""
            self._send(data)

    def _send(self, data: bytes) -> None:
        send = self.sock.send
        sent = send(data)
        if sent < len(data):
            view = memoryview(data)
            while sent < len(view):
                sent += send(view[sent:])


class _IdleWait:
    """The wait for a connection's request: gunicorn's keep-alive timeout. The wait after a
    served request (an idle keep-alive connection) is registered with the worker, so that a
    stopping worker can end it now; a new connection's first request is always waited for."""

    __slots__ = ("worker", "timeout", "greenlet", "idle")

    def __init__(self, worker: GatewayWorker) -> None:
        self.worker = worker
        self.timeout = silent_timeout(worker.cfg.keepalive)
        self.greenlet = gevent.getcurrent()
        self.idle = self.greenlet in worker.served

    def __enter__(self) -> gevent.Timeout:
        if self.idle:
            if not self.worker.alive:
                raise StopIteration  # stopping: gunicorn closes the connection, no waiting
            self.worker.idle[self.greenlet] = self.timeout
        return self.timeout.__enter__()

    def __exit__(self, *exc_info: Any) -> bool | None:
        self.worker.idle.pop(self.greenlet, None)
        return self.timeout.__exit__(*exc_info)


class GatewayWorker(GeventWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.idle: dict[Any, gevent.Timeout] = {}  # connection greenlet -> its idle wait
        self.served: weakref.WeakSet[Any] = weakref.WeakSet()  # have answered a request

    def load_wsgi(self) -> None:
        super().load_wsgi()
        tune_gc()  # in the worker, after the fork and the app's import

    # gunicorn enters what this returns (its own returns a gevent.Timeout); the stub says None.
    def timeout_ctx(self) -> _IdleWait:  # type: ignore[override]
        return _IdleWait(self)

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        # TLS (gunicorn's own certfile) keeps gevent's socket: gunicorn asks it about TLS.
        wrapped = client if isinstance(client, ssl.SSLSocket) else ClientSocket(client)
        # gunicorn only writes to, reads from and closes the client; its stub asks for a socket.
        super().handle(listener, wrapped, addr)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        # End every wait for a next request: the connection closes as if its keep-alive time
        # were over (the Timeout is raised where the wait is, and swallowed by its own block).
        for greenlet, timeout in list(self.idle.items()):
            greenlet.kill(timeout, block=False)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        _serving[sock] = req
        holding = isinstance(sock, ClientSocket)
        if holding:
            sock.hold_head = True
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            if holding:
                with contextlib.suppress(OSError):
                    sock.flush()
            _serving.pop(sock, None)
            self.served.add(gevent.getcurrent())
            if _lingering.pop(sock, False):
                linger(sock)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        # gunicorn only writes its error page to the client; its stub asks for a socket.
        super().handle_error(req, _JSONErrors(client), addr, exc)  # type: ignore[arg-type]


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ([^\r\n]*)\r\n")
_MESSAGE = re.compile(rb"</h1>\s*(.*?)\s*</body>", re.DOTALL)
_ERROR_TYPES = {403: "permission_error", 404: "not_found_error", 413: "request_too_large"}


class _JSONErrors:
    """The client socket as gunicorn's error answer sees it: the HTML page gunicorn writes
    (``util.write_error``) is sent as an Anthropic error envelope with the same status
    instead. Everything else goes to the socket unchanged."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(_as_envelope(data))


def _as_envelope(page: bytes) -> bytes:
    status_line = _STATUS_LINE.match(page)
    if status_line is None or b"Content-Type: text/html" not in page[:512]:
        return page
    status = int(status_line.group(1))
    reason = status_line.group(2).decode("latin-1")
    found = _MESSAGE.search(page)
    message = html.unescape(found.group(1).decode("utf-8", "replace")) if found else ""
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    body = _json({"type": "error", "error": {"type": kind, "message": message or reason}})
    head = (
        f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _json(value: Any) -> bytes:
    import json  # the app's orjson stays out of the master, which loads this module

    return json.dumps(value, ensure_ascii=False).encode()
