"""A small HTTP/1.1 client for the backends: keep-alive pools, TLS, an HTTP proxy, no more.

Every client request costs one backend request, so this code is on the hot path. urllib3 (and
requests above it) were measured at a third of the worker's CPU per request: http.client
parses each response head with the email package, urllib3 polls a pooled socket before reuse
and wraps every answer in two response objects. A gateway POSTs JSON to a few known hosts and
needs none of that generality, so here a request is one ``sendall`` of a pre-built head and
the body, and a response head is one ``find`` and a split.

What it does do, because backends and networks need it: connection reuse (LIFO, so a few warm
connections serve a light load), a retry on a fresh connection when a pooled one turns out to
have been closed by the server before it answered (keep-alive timeouts race with reuse), TLS
with verification, an HTTP proxy (absolute-form for ``http://``, CONNECT for ``https://``),
``Transfer-Encoding: chunked``, Content-Length and close-delimited bodies, 1xx heads skipped,
and gzip/deflate decoding of whole (non-streamed) bodies.

Everything here is gevent-cooperative through the patched ``socket`` and ``ssl`` modules; the
pool has no lock because a gevent worker runs one thread.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import re
import socket
import ssl
import time
import zlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from gevent.hub import Waiter

from app.http_body import ChunkedDecoder, FramingError

READ_SIZE = 65536
HEAD_LIMIT = 65536  # a response head longer than this is not from an HTTP server we can use
IDLE_LIMIT = 60.0  # a pooled connection idle longer than this is closed rather than reused
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_BAD_VALUE = re.compile(r"[\r\n\x00]")


class BackendHTTPError(OSError):
    """The exchange failed below HTTP semantics; nothing usable was answered."""


class ConnectFailed(BackendHTTPError):
    """No connection was made, so the backend never saw the request: safe to retry."""

    def __init__(self, message: str, *, refused: bool = False, timed_out: bool = False) -> None:
        super().__init__(message)
        self.refused = refused
        self.timed_out = timed_out


class ReadTimedOut(BackendHTTPError):
    """The backend took the request and said nothing in time: it may still be working on it."""


class ProtocolFailure(BackendHTTPError):
    """The connection broke, or what came back was not HTTP/1.x."""


class Connection:
    """One socket, the bytes read past the end of the last thing parsed from it, and the read
    timeout in force.

    On a plain gevent socket, reads and writes go to the non-blocking socket underneath, and
    a read the caller expects to find nothing waits for readability first (``ReadWait``):
    gevent's own ``recv`` would try, fail with EAGAIN (an exception with a formatted message)
    and wait under a new ``Timeout`` object, and its ``sendall`` asks the kernel for SO_SNDBUF
    on every call. Other sockets (TLS, or the standard library's outside a gevent worker) use
    their own blocking calls with a timeout.
    """

    __slots__ = ("sock", "raw", "buffer", "idle_since", "timeout", "readable")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        plain = not hasattr(sock, "pending") and hasattr(sock, "_read_event")
        self.raw = getattr(sock, "_sock", None) if plain else None
        self.readable = ReadWait(sock) if self.raw is not None else None
        self.buffer = b""
        self.idle_since = 0.0
        self.timeout = 0.0

    def take_buffer(self) -> bytes:
        data, self.buffer = self.buffer, b""
        return data

    def recv(self, *, wait_first: bool = False) -> bytes:
        """Up to READ_SIZE bytes, b"" at the end; TimeoutError after ``timeout`` of silence."""
        if self.readable is None:
            self.sock.settimeout(self.timeout)
            return self.sock.recv(READ_SIZE)
        while True:
            if wait_first and not self.readable(self.timeout):
                raise TimeoutError("no data in time")
            try:
                return self.raw.recv(READ_SIZE)
            except BlockingIOError:
                wait_first = True

    def sendall(self, data: bytes) -> None:
        if self.raw is not None:
            try:
                sent = self.raw.send(data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        self.sock.settimeout(self.timeout)
        self.sock.sendall(data)

    def close(self) -> None:
        if self.readable is not None:
            self.readable.close()
        try:
            self.sock.close()
        except OSError:
            pass


class ReadWait:
    """Wait until a gevent socket is readable, for at most ``seconds``: True if it is.

    Uses the socket's own read watcher and one repeating timer per timeout value, restarted
    with ``again`` (a one-shot libev timer restarted with ``start`` after it has fired once
    fires at once from then on).
    """

    __slots__ = ("hub", "watcher", "timers")

    def __init__(self, sock: Any) -> None:
        self.hub = sock.hub
        self.watcher = sock._read_event
        self.timers: dict[float, Any] = {}

    def __call__(self, seconds: float) -> bool:
        timer = self.timers.get(seconds)
        if timer is None:
            if len(self.timers) >= 4:
                self.close()
            timer = self.timers[seconds] = self.hub.loop.timer(seconds, seconds)
        waiter = Waiter(self.hub)
        self.watcher.start(waiter.switch, True)
        timer.again(waiter.switch, False)
        try:
            return waiter.get()
        finally:
            self.watcher.stop()
            timer.stop()

    def close(self) -> None:
        timers, self.timers = self.timers, {}
        for timer in timers.values():
            timer.close()


class Response:
    """A response head, and the open connection its body is still arriving on.

    ``headers`` has lower-case names; repeated headers are joined with ", ". Call ``read`` for
    the whole body, or take ``connection`` to read it incrementally (BodyReader),
    and end with ``release`` (the body was read to its end: the connection may be reused) or
    ``close``.
    """

    __slots__ = ("status", "reason", "headers", "connection", "pool", "chunked", "length", "reuse")

    def __init__(
        self,
        status: int,
        reason: str,
        headers: dict[str, str],
        connection: Connection,
        pool: Pool,
        *,
        bodiless: bool,
        keep_alive: bool,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.connection: Connection | None = connection
        self.pool = pool
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = None if self.chunked else _content_length(headers)
        self.length = 0 if bodiless else length  # None: the body ends when the connection does
        self.reuse = keep_alive and (self.chunked or self.length is not None)

    def read(self, limit: int | None = None) -> bytes:
        """The whole body (decompressed), or its first ``limit`` bytes; then the connection is
        released or closed. Raises ReadTimedOut or ProtocolFailure."""
        connection = self.connection
        if connection is None:
            return b""
        framing = BodyFraming(self)
        parts: list[bytes] = []
        size = 0
        data = connection.take_buffer()
        try:
            while not framing.complete and (limit is None or size < limit):
                if data:
                    piece = framing.feed(data)
                    parts.append(piece)
                    size += len(piece)
                else:
                    data = _recv(connection)
                    if not data:
                        framing.end()
                    continue
                data = b""
        except BackendHTTPError:
            self.close()
            raise
        if framing.complete:
            self.release()
            return _decoded(b"".join(parts), self.headers)
        self.close()
        return b"".join(parts)[:limit]

    def release(self) -> None:
        """The body has been read to its end: the connection goes back to the pool if it can."""
        connection, self.connection = self.connection, None
        if connection is not None:
            if self.reuse:
                self.pool.put(connection)
            else:
                connection.close()

    def close(self) -> None:
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.close()


class BodyFraming:
    """Where a response body ends: at its last chunk, after Content-Length bytes, or (with
    neither) when the connection closes. Fed raw bytes, gives back body bytes."""

    __slots__ = ("chunks", "remaining", "complete")

    def __init__(self, response: Response) -> None:
        self.chunks = ChunkedDecoder() if response.chunked else None
        self.remaining = response.length  # None: until the connection closes
        self.complete = response.length == 0

    def feed(self, data: bytes) -> bytes:
        if self.chunks is not None:
            try:
                body = self.chunks.feed(data)
            except FramingError as exc:
                raise ProtocolFailure(f"bad chunked body: {exc}") from None
            self.complete = self.chunks.done
            return body
        if self.remaining is not None:
            data = data[: self.remaining]
            self.remaining -= len(data)
            self.complete = self.remaining == 0
        return data

    def end(self) -> None:
        """The connection closed: complete if the body was close-delimited, else an error."""
        if self.chunks is not None or self.remaining:
            raise ProtocolFailure("the connection closed in the middle of the body")
        self.complete = True


def open_socket(host: str, port: int, timeout: float) -> socket.socket:
    """A connected TCP socket.

    An IP literal is connected as it is. ``socket.create_connection`` would pass it through
    getaddrinfo, which under gevent runs on a pool of ten threads: measured, about 85 µs more
    of the worker's CPU per new connection, and a queue when a burst of streams opens hundreds
    at once. A host name still takes that path (resolved afresh for each connection).
    """
    family = _literal_family(host)
    if family is None:
        return socket.create_connection((host, port), timeout=timeout)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


@functools.lru_cache(maxsize=64)
def _literal_family(host: str) -> socket.AddressFamily | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


class Pool:
    """Keep-alive connections to one origin (through a proxy, if one is given)."""

    def __init__(
        self,
        url: str,
        *,
        maxsize: int,
        connect_timeout: float,
        proxy: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.scheme == "https" else 80)
        default_port = self.port == (443 if self.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = host if default_port else f"{host}:{self.port}"
        self.origin = f"{self.scheme}://{self.authority}"
        self.maxsize = maxsize
        self.connect_timeout = connect_timeout
        self.ssl_context = ssl_context
        if self.scheme == "https" and ssl_context is None:
            self.ssl_context = default_ssl_context()
        self.proxy = urlsplit(proxy) if proxy else None
        self.proxy_headers = _proxy_headers(self.proxy) if self.proxy else b""
        # Plain HTTP through a proxy: absolute-form targets on a connection to the proxy.
        self.absolute = self.proxy is not None and self.scheme == "http"
        self.idle: list[Connection] = []

    def request(
        self,
        method: str,
        path: str,
        headers: bytes,
        body: bytes,
        *,
        timeout: float,
    ) -> Response:
        """Send one request and return once the response head is in.

        ``headers`` is the pre-built header block (``Name: value\\r\\n`` lines, see
        ``header_block``) without Host and Content-Length; ``timeout`` bounds the wait for the
        head (and each later read on the socket until someone changes it).
        """
        target = self.origin + path if self.absolute else path
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: {self.authority}\r\n"
            f"Content-Length: {len(body)}\r\n"
        ).encode("latin-1")
        message = [head, self.proxy_headers if self.absolute else b"", headers, b"\r\n"]
        if len(body) <= READ_SIZE:
            message.append(body)
            body = b""
        data = b"".join(message)
        connection = self._pooled()
        if connection is not None:
            try:
                return self._exchange(connection, data, body, timeout, method)
            except _Stale:
                connection.close()  # the server had closed it; nothing was answered
        connection = self._connect()
        try:
            return self._exchange(connection, data, body, timeout, method)
        except _Stale as exc:
            raise ProtocolFailure(str(exc)) from None

    def put(self, connection: Connection) -> None:
        if len(self.idle) < self.maxsize:
            connection.idle_since = time.monotonic()
            self.idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        idle, self.idle = self.idle, []
        for connection in idle:
            connection.close()

    # --- internals -----------------------------------------------------------------------------

    def _pooled(self) -> Connection | None:
        now = time.monotonic()
        while self.idle:
            connection = self.idle.pop()
            if now - connection.idle_since < IDLE_LIMIT:
                return connection
            connection.close()
        return None

    def _connect(self) -> Connection:
        host, port = (
            (self.proxy.hostname or "", self.proxy.port or 80)
            if self.proxy
            else (
                self.host,
                self.port,
            )
        )
        try:
            sock = open_socket(host, port, self.connect_timeout)
        except TimeoutError:
            raise ConnectFailed(f"timed out connecting to {host}:{port}", timed_out=True) from None
        except ConnectionRefusedError:
            raise ConnectFailed(f"connection to {host}:{port} refused", refused=True) from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {host}:{port}: {exc}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.proxy is not None and self.scheme == "https":
                self._tunnel(sock)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
        except TimeoutError:
            sock.close()
            raise ConnectFailed(f"timed out setting up {self.origin}", timed_out=True) from None
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise ConnectFailed(f"cannot set up a connection to {self.origin}: {exc}") from None
        return Connection(sock)

    def _tunnel(self, sock: Any) -> None:
        """CONNECT through the proxy; the TLS handshake then runs inside the tunnel."""
        request = (
            f"CONNECT {self.host}:{self.port} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        ).encode("latin-1")
        sock.sendall(request + self.proxy_headers + b"\r\n")
        connection = Connection(sock)
        connection.timeout = self.connect_timeout
        status, _, _, _ = _read_head(connection, stale_if_empty=False)
        if connection.readable is not None:
            connection.readable.close()  # the socket lives on, wrapped in TLS
        if status != 200:
            raise OSError(f"the proxy answered CONNECT with HTTP {status}")

    def _exchange(
        self, connection: Connection, data: bytes, body: bytes, timeout: float, method: str
    ) -> Response:
        connection.timeout = timeout
        try:
            connection.sendall(data)
            if body:
                connection.sendall(body)
        except TimeoutError:
            connection.close()
            raise ReadTimedOut("timed out sending the request") from None
        except OSError as exc:
            connection.close()
            raise _Stale(f"the connection broke while sending: {exc}") from None
        try:
            status, reason, headers, keep_alive = _read_head(connection, stale_if_empty=True)
            bodiless = method == "HEAD" or status in (204, 304)
            return Response(
                status, reason, headers, connection, self, bodiless=bodiless, keep_alive=keep_alive
            )
        except BaseException:
            connection.close()
            raise


class _Stale(BackendHTTPError):
    """The connection was closed before any byte of a response came back."""


def header_block(headers: Mapping[str, str]) -> bytes:
    """``Name: value`` lines for ``Pool.request``; refuses values that would split the head."""
    lines = []
    for name, value in headers.items():
        if _BAD_VALUE.search(name) or _BAD_VALUE.search(value) or ":" in name:
            raise ValueError(f"header {name!r} has a character not allowed in an HTTP header")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1")


def default_ssl_context() -> ssl.SSLContext:
    """Verified TLS (the system's CAs, or SSL_CERT_FILE / SSL_CERT_DIR), HTTP/1.1 by ALPN."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


def _read_head(
    connection: Connection, *, stale_if_empty: bool
) -> tuple[int, str, dict[str, str], bool]:
    """Read and parse a response head, skipping interim (1xx) heads."""
    buffer = connection.take_buffer()
    while True:
        match = _HEAD_END.search(buffer)
        while match is None:
            if len(buffer) > HEAD_LIMIT:
                raise ProtocolFailure("the response head is too long")
            try:  # the answer cannot be there before the request was read: wait first
                data = connection.recv(wait_first=not buffer)
            except TimeoutError:
                raise ReadTimedOut("no response in time") from None
            except OSError as exc:
                if stale_if_empty and not buffer:
                    raise _Stale(f"the connection broke before the response: {exc}") from None
                raise ProtocolFailure(f"the connection broke in the response head: {exc}") from None
            if not data:
                if stale_if_empty and not buffer:
                    raise _Stale("the server closed the connection without answering")
                raise ProtocolFailure("the connection closed in the response head")
            buffer += data
            match = _HEAD_END.search(buffer)
        head, buffer = buffer[: match.start()], buffer[match.end() :]
        status, reason, headers, keep_alive = _parse_head(head)
        if 100 <= status < 200 and status != 101:
            stale_if_empty = False
            continue
        connection.buffer = buffer
        return status, reason, headers, keep_alive


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str], bool]:
    lines = head.decode("latin-1").splitlines()
    status_line = lines[0] if lines else ""
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not code.isdigit() or len(code) != 3:
        raise ProtocolFailure(f"not an HTTP/1.x response: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            continue
        name = name.strip().lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.1":
        keep_alive = "close" not in connection
    else:
        keep_alive = "keep-alive" in connection
    return int(code), reason, headers, keep_alive


def _content_length(headers: Mapping[str, str]) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    try:
        lengths = {int(v) for v in value.split(",")}  # repeated identical headers are allowed
    except ValueError:
        raise ProtocolFailure(f"bad Content-Length {value[:40]!r}") from None
    if len(lengths) != 1 or min(lengths) < 0:
        raise ProtocolFailure(f"bad Content-Length {value[:40]!r}")
    return lengths.pop()


def _recv(connection: Connection) -> bytes:
    try:
        return connection.recv()
    except TimeoutError:
        raise ReadTimedOut("timed out reading the response body") from None
    except OSError as exc:
        raise ProtocolFailure(f"the connection broke in the body: {exc}") from None


def _decoded(body: bytes, headers: Mapping[str, str]) -> bytes:
    encoding = headers.get("content-encoding", "").lower().strip()
    if not body or encoding in ("", "identity"):
        return body
    try:
        if encoding in ("gzip", "x-gzip"):
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        if encoding == "deflate":
            try:
                return zlib.decompress(body)
            except zlib.error:
                return zlib.decompress(body, -zlib.MAX_WBITS)  # raw deflate, as some servers send
    except zlib.error as exc:
        raise ProtocolFailure(f"cannot decode a {encoding} body: {exc}") from None
    raise ProtocolFailure(f"unsupported Content-Encoding {encoding!r}")


def _proxy_headers(proxy: Any) -> bytes:
    if not proxy.username:
        return b""
    credentials = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}"
    token = base64.b64encode(credentials.encode()).decode("ascii")
    return f"Proxy-Authorization: Basic {token}\r\n".encode("latin-1")
