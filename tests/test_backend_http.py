"""The backend HTTP client against real sockets on 127.0.0.1: framing, reuse, the stale
keep-alive race, timeouts, TLS and a CONNECT proxy.

The servers here write raw bytes, so each test states exactly what went over the wire.
"""

from __future__ import annotations

import gzip
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from servers import make_certificate

from app.backend_http import (
    ConnectFailed,
    Pool,
    ProtocolFailure,
    ReadTimedOut,
    header_block,
)

Handler = Callable[[socket.socket, int], None]  # (connection, index of the request on it)


def read_request(conn: socket.socket) -> bytes:
    """One request (head and Content-Length body) from ``conn``; b"" if it closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(65536)
        if not piece:
            return b""
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


class RawServer:
    """A TCP server on 127.0.0.1 that gives each connection to ``handler``; counts them."""

    def __init__(
        self, handler: Callable[[socket.socket], None], wrap: ssl.SSLContext | None = None
    ):
        self.handler = handler
        self.wrap = wrap
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            if self.wrap is not None:
                conn = self.wrap.wrap_socket(conn, server_side=True)
            self.handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.listener.close()


def serving(answer: Callable[[int], bytes], *, keep: bool = True) -> Callable:
    """A handler answering each request on a connection with ``answer(n)`` (n counts
    requests per server); ``keep=False`` closes the connection after each answer."""

    def handler(conn: socket.socket, server: RawServer) -> None:
        while True:
            request = read_request(conn)
            if not request:
                return
            server.requests.append(request)
            conn.sendall(answer(len(server.requests) - 1))
            if not keep:
                return

    return handler


@pytest.fixture
def server():
    started: list[RawServer] = []

    def start(handler: Callable, wrap: ssl.SSLContext | None = None) -> RawServer:
        box: list[RawServer] = []
        srv = RawServer(lambda conn: handler(conn, box[0]), wrap)
        box.append(srv)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.close()


OPEN_POOLS: list[Pool] = []


@pytest.fixture(autouse=True)
def _close_pools():
    yield
    while OPEN_POOLS:
        OPEN_POOLS.pop().close()


def make_pool(url: str, maxsize: int = 4, **kw) -> Pool:
    """A pool closed after the test (its idle sockets would otherwise leak as warnings)."""
    pool = Pool(url, maxsize=maxsize, connect_timeout=2.0, **kw)
    OPEN_POOLS.append(pool)
    return pool


def pool_for(srv: RawServer, **kw) -> Pool:
    return make_pool(f"http://127.0.0.1:{srv.port}", **kw)


def post(pool: Pool, body: bytes = b"{}", timeout: float = 5.0, extra: dict | None = None):
    head = header_block({"Content-Type": "application/json", **(extra or {})})
    return pool.request("POST", "/v1/chat/completions", head, body, timeout=timeout)


OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


def test_keep_alive_connection_is_reused(server):
    srv = server(serving(lambda n: OK))
    pool = pool_for(srv)
    for _ in range(3):
        assert post(pool).read() == b'{"ok":true}'
    assert srv.connections == 1
    assert len(srv.requests) == 3


def test_request_head_carries_host_length_and_headers(server):
    srv = server(serving(lambda n: OK))
    post(pool_for(srv), b'{"a":1}', extra={"X-Request-ID": "req_1"}).read()
    head = srv.requests[0].split(b"\r\n\r\n")[0].decode()
    assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{srv.port}" in head
    assert "Content-Length: 7" in head
    assert "X-Request-ID: req_1" in head
    assert srv.requests[0].endswith(b'{"a":1}')


def test_large_body_is_sent_whole(server):
    srv = server(serving(lambda n: OK))
    body = b"x" * 300_000
    post(pool_for(srv), body).read()
    assert srv.requests[0].endswith(body)


def test_connection_closed_by_server_between_requests_is_replaced_silently(server):
    """The keep-alive race: the server closed an idle connection; the request is sent again on
    a fresh connection instead of failing."""
    srv = server(serving(lambda n: OK, keep=False))  # answers, then closes without saying so
    pool = pool_for(srv)
    assert post(pool).read() == b'{"ok":true}'
    time.sleep(0.05)
    assert post(pool).read() == b'{"ok":true}'
    assert srv.connections == 2


def test_connection_close_header_prevents_reuse(server):
    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    srv = server(serving(lambda n: answer))
    pool = pool_for(srv)
    post(pool).read()
    post(pool).read()
    assert srv.connections == 2
    assert pool.idle == []


def test_http10_response_is_not_reused(server):
    srv = server(serving(lambda n: b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    pool = pool_for(srv)
    assert post(pool).read() == b"ok"
    assert pool.idle == []


def test_chunked_body_is_decoded_and_connection_reused(server):
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = head + b"4\r\nabcd\r\n3;x=1\r\nefg\r\n0\r\n\r\n"
    srv = server(serving(lambda n: answer))
    pool = pool_for(srv)
    assert post(pool).read() == b"abcdefg"
    assert post(pool).read() == b"abcdefg"
    assert srv.connections == 1


def test_close_delimited_body_is_read_to_the_end(server):
    def handler(conn, srv):
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\npart one ")
        time.sleep(0.05)
        conn.sendall(b"part two")

    srv = server(handler)
    pool = pool_for(srv)
    assert post(pool).read() == b"part one part two"
    assert pool.idle == []


def test_interim_responses_are_skipped(server):
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK
    srv = server(serving(lambda n: answer))
    response = post(pool_for(srv))
    assert (response.status, response.read()) == (200, b'{"ok":true}')


def test_headers_are_lower_case_and_repeats_joined(server):
    answer = (
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nX-Thing: a\r\nx-thing: b\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    srv = server(serving(lambda n: answer))
    response = post(pool_for(srv))
    assert response.status == 429
    assert response.reason == "Too Many Requests"
    assert response.headers["retry-after"] == "3"
    assert response.headers["x-thing"] == "a, b"
    assert response.read() == b""


def test_gzip_body_is_decompressed(server):
    packed = gzip.compress(b'{"big":"answer"}')
    answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(
        packed
    )
    srv = server(serving(lambda n: answer + packed))
    assert post(pool_for(srv)).read() == b'{"big":"answer"}'


def test_read_limit_returns_the_start_and_drops_the_connection(server):
    answer = b"HTTP/1.1 500 Oops\r\nContent-Length: 100000\r\n\r\n" + b"e" * 100000
    srv = server(serving(lambda n: answer))
    pool = pool_for(srv)
    assert post(pool).read(limit=1000) == b"e" * 1000
    assert pool.idle == []


def test_silent_backend_times_out_as_read_timeout(server):
    def handler(conn, srv):
        read_request(conn)
        time.sleep(2)

    srv = server(handler)
    started = time.monotonic()
    with pytest.raises(ReadTimedOut):
        post(pool_for(srv), timeout=0.3)
    assert time.monotonic() - started < 1.5


def test_refused_connection_is_a_connect_failure():
    with socket.create_server(("127.0.0.1", 0)) as unused:
        port = unused.getsockname()[1]  # closed again: nobody listens there
    pool = make_pool(f"http://127.0.0.1:{port}")
    with pytest.raises(ConnectFailed) as caught:
        post(pool)
    assert caught.value.refused


def test_an_ip_literal_is_connected_without_asking_the_resolver(server, monkeypatch):
    def no_resolver(*args, **kwargs):
        raise OSError("the resolver was asked")

    srv = server(serving(lambda n: OK))
    monkeypatch.setattr(socket, "getaddrinfo", no_resolver)
    assert post(pool_for(srv)).read() == b'{"ok":true}'
    with pytest.raises(ConnectFailed, match="the resolver was asked"):
        post(make_pool(f"http://localhost:{srv.port}"))  # a host name is still resolved


def test_an_ipv6_literal_is_connected_as_ipv6():
    try:
        listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with listener:
        port = listener.getsockname()[1]
        pool = make_pool(f"http://[::1]:{port}")
        connection = pool._connect()
        try:
            assert connection.sock.family == socket.AF_INET6
            assert connection.sock.getpeername()[:2] == ("::1", port)
        finally:
            connection.close()


def test_fresh_connection_closed_without_answer_is_a_protocol_failure(server):
    def handler(conn, srv):
        read_request(conn)

    srv = server(handler)
    with pytest.raises(ProtocolFailure):
        post(pool_for(srv))


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 abc Bad\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    ],
)
def test_garbage_answers_are_protocol_failures(server, answer):
    srv = server(serving(lambda n: answer))
    with pytest.raises(ProtocolFailure):
        post(pool_for(srv)).read()


def test_header_values_that_would_split_the_head_are_refused():
    with pytest.raises(ValueError):
        header_block({"anthropic-beta": "x\r\nEvil: 1"})
    with pytest.raises(ValueError):
        header_block({"Bad:Name": "x"})


def test_idle_pool_is_capped(server):
    srv = server(serving(lambda n: OK))
    pool = make_pool(f"http://127.0.0.1:{srv.port}", maxsize=1)
    first, second = post(pool), post(pool)  # two in flight: two connections
    first.read()
    second.read()
    assert len(pool.idle) == 1


def test_plain_http_through_a_proxy_uses_the_absolute_target(server):
    srv = server(serving(lambda n: OK))  # plays the proxy
    pool = make_pool(
        "http://backend.internal:8000",
        proxy=f"http://user:p%40ss@127.0.0.1:{srv.port}",
    )
    assert post(pool).read() == b'{"ok":true}'
    head = srv.requests[0].split(b"\r\n\r\n")[0].decode()
    assert head.startswith("POST http://backend.internal:8000/v1/chat/completions HTTP/1.1")
    assert "Host: backend.internal:8000" in head
    assert "Proxy-Authorization: Basic dXNlcjpwQHNz" in head  # user:p@ss


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed for the test certificate (apt-get install openssl)")
    return make_certificate(tmp_path_factory.mktemp("tls"))


def tls_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def test_https_is_verified_and_works_with_the_right_ca(server, tls_files):
    cert, key = tls_files
    srv = server(serving(lambda n: OK), wrap=tls_server_context(cert, key))
    trusted = ssl.create_default_context(cafile=str(cert))
    pool = make_pool(f"https://localhost:{srv.port}", ssl_context=trusted)
    assert post(pool).read() == b'{"ok":true}'
    assert post(pool).read() == b'{"ok":true}'
    assert srv.connections == 1


def test_https_with_an_unknown_ca_fails_to_connect(server, tls_files):
    cert, key = tls_files
    srv = server(serving(lambda n: OK), wrap=tls_server_context(cert, key))
    pool = make_pool(f"https://localhost:{srv.port}")
    with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED|certificate"):
        post(pool)


def test_https_through_a_proxy_tunnels_with_connect(server, tls_files):
    cert, key = tls_files
    backend = server(serving(lambda n: OK), wrap=tls_server_context(cert, key))
    seen: list[bytes] = []

    def proxy(conn, srv):
        request = read_request(conn)
        seen.append(request)
        upstream = socket.create_connection(("127.0.0.1", backend.port))
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        pipe = threading.Thread(target=_copy, args=(upstream, conn), daemon=True)
        pipe.start()
        _copy(conn, upstream)

    proxy_server = server(proxy)
    trusted = ssl.create_default_context(cafile=str(cert))
    pool = make_pool(
        f"https://localhost:{backend.port}",
        proxy=f"http://127.0.0.1:{proxy_server.port}",
        ssl_context=trusted,
    )
    assert post(pool).read() == b'{"ok":true}'
    assert seen[0].startswith(f"CONNECT localhost:{backend.port} HTTP/1.1".encode())
    assert b"POST /v1/chat/completions" in backend.requests[0]


def _copy(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        sink.close()
