"""The backend client (requests through the worker's session) against real sockets on
127.0.0.1: framing, reuse, the stale keep-alive race, bytes a backend should not have sent,
answers that are not answers, bounds on bodies, timeouts, TLS (a throwaway CA, mutual TLS) and
proxies.

The servers here write raw bytes, so each test states exactly what went over the wire.
"""

from __future__ import annotations

import gzip
import shutil
import socket
import ssl
import threading
import time
import tracemalloc
from collections.abc import Callable

import pytest
from fakebackend import gzip_bomb
from proxyserver import ForwardProxy
from servers import ThrowawayCA

from app.backends.client import BackendClient
from app.backends.session import Transport, new_session
from app.config import build_settings
from app.errors import (
    GatewayError,
    InvalidRequest,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
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


OPEN: list[BackendClient] = []


@pytest.fixture(autouse=True)
def _close_clients():
    yield
    while OPEN:
        OPEN.pop().close()


def make_client(url: str, **upstream) -> BackendClient:
    """A backend client as a worker builds it, closed after the test."""
    settings = build_settings({"upstream": {"url": url, "connect_timeout": 2, **upstream}}, {})
    config = settings.upstream
    client = BackendClient(config, Transport(new_session(), config, 4))
    OPEN.append(client)
    return client


def client_for(srv: RawServer, **upstream) -> BackendClient:
    return make_client(f"http://127.0.0.1:{srv.port}/v1", **upstream)


def complete(client: BackendClient, body: dict | None = None, request_id: str = "req_test0001"):
    return client.complete(body or {"model": "m"}, request_id)


def answer_with(body: bytes, status: str = "200 OK", headers: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{headers}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


OK = answer_with(b'{"ok":true}')


def numbered(n: int) -> bytes:
    """The n-th answer of a server, so a test can tell whose answer a client got."""
    return answer_with(b'{"n":%d}' % n)


# --- connections and framing --------------------------------------------------------------


def test_keep_alive_connection_is_reused(server):
    srv = server(serving(lambda n: OK))
    client = client_for(srv)
    for _ in range(3):
        assert complete(client) == {"ok": True}
    assert srv.connections == 1
    assert len(srv.requests) == 3


def test_request_head_carries_host_length_headers_and_the_request_id(server):
    srv = server(serving(lambda n: OK))
    complete(client_for(srv, api_key="sk-backend"), {"a": 1}, "req_abcdefgh")
    head = srv.requests[0].split(b"\r\n\r\n")[0].decode().lower()
    assert head.startswith("post /v1/chat/completions http/1.1\r\n")
    assert f"host: 127.0.0.1:{srv.port}" in head
    assert "content-length: 7" in head
    assert "x-request-id: req_abcdefgh" in head
    assert "authorization: bearer sk-backend" in head
    assert "accept-encoding: identity" in head
    assert srv.requests[0].endswith(b'{"a":1}')


def test_large_body_is_sent_whole(server):
    srv = server(serving(lambda n: OK))
    complete(client_for(srv), {"x": "y" * 300_000})
    assert srv.requests[0].endswith(b'"}') and len(srv.requests[0]) > 300_000


def test_connection_closed_by_server_between_requests_is_replaced_silently(server):
    """The keep-alive race: the server closed an idle connection; the next request goes out
    on a fresh connection instead of failing."""
    srv = server(serving(lambda n: OK, keep=False))  # answers, then closes without saying so
    client = client_for(srv)
    assert complete(client) == {"ok": True}
    time.sleep(0.05)
    assert complete(client) == {"ok": True}
    assert srv.connections == 2


def closing_kept_alive(*, fresh_answer: bool) -> Callable:
    """A handler that answers the first request on its first connection, then reads the next
    request on it and closes without a word: the server's keep-alive timeout running out as
    that request crossed it on the wire. Later connections are answered when ``fresh_answer``,
    else closed the same way."""

    def handler(conn: socket.socket, srv: RawServer) -> None:
        first_connection = srv.connections == 1
        request = read_request(conn)
        srv.requests.append(request)
        if first_connection:
            conn.sendall(OK)
            srv.requests.append(read_request(conn))
        elif fresh_answer:
            conn.sendall(OK)

    return handler


def test_a_request_crossing_a_keep_alive_close_is_sent_again_on_a_new_connection(server):
    srv = server(closing_kept_alive(fresh_answer=True))
    client = client_for(srv)
    assert complete(client) == {"ok": True}
    assert complete(client, {"model": "m", "n": 2}) == {"ok": True}
    assert srv.connections == 2
    assert [r.endswith(b'"n":2}') for r in srv.requests] == [False, True, True]


def test_a_request_crossing_a_keep_alive_close_is_sent_again_once(server):
    srv = server(closing_kept_alive(fresh_answer=False))
    client = client_for(srv)
    complete(client)
    with pytest.raises(UpstreamError) as caught:
        complete(client)
    assert caught.value.status == 502
    assert caught.value.reached  # the new connection was closed unanswered: a backend fault
    assert (srv.connections, len(srv.requests)) == (2, 3)


def test_connection_close_header_prevents_reuse(server):
    srv = server(serving(lambda n: answer_with(b"{}", headers="Connection: close\r\n")))
    client = client_for(srv)
    complete(client)
    complete(client)
    assert srv.connections == 2


def test_http10_response_is_not_reused(server):
    srv = server(serving(lambda n: b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}"))
    client = client_for(srv)
    assert complete(client) == {}
    assert complete(client) == {}
    assert srv.connections == 2


def test_chunked_body_is_decoded_and_connection_reused(server):
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = head + b'4\r\n{"a"\r\n3;x=1\r\n:1}\r\n0\r\n\r\n'
    srv = server(serving(lambda n: answer))
    client = client_for(srv)
    assert complete(client) == {"a": 1}
    assert complete(client) == {"a": 1}
    assert srv.connections == 1


def test_close_delimited_body_is_read_to_the_end(server):
    def handler(conn, srv):
        read_request(conn)
        conn.sendall(b'HTTP/1.1 200 OK\r\n\r\n{"part": "one ')
        time.sleep(0.05)
        conn.sendall(b'two"}')

    srv = server(handler)
    assert complete(client_for(srv)) == {"part": "one two"}


def test_100_continue_is_skipped(server):
    srv = server(serving(lambda n: b"HTTP/1.1 100 Continue\r\n\r\n" + OK))
    assert complete(client_for(srv)) == {"ok": True}


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
    ],
)
def test_a_status_under_200_is_a_502_and_its_connection_is_never_reused(server, interim):
    """After a 101 the connection speaks another protocol; after a 103 the real answer is
    still to come on it. Either way the next request must not read what follows."""

    stray_sent = threading.Event()

    def handler(conn, srv):
        while request := read_request(conn):
            srv.requests.append(request)
            if len(srv.requests) == 1:
                conn.sendall(interim)
                time.sleep(0.1)
                conn.sendall(numbered(0))  # what a reused connection would hand the next one
                stray_sent.set()
            else:
                conn.sendall(numbered(len(srv.requests) - 1))

    srv = server(handler)
    client = client_for(srv)
    with pytest.raises(UpstreamError) as caught:
        complete(client)
    assert caught.value.status == 502
    assert f"backend 127.0.0.1:{srv.port}" in caught.value.message
    assert "not a final answer" in caught.value.message
    assert stray_sent.wait(30)
    assert complete(client) == {"n": 1}
    assert srv.connections == 2


def test_a_redirect_is_a_502_naming_the_backend_and_is_not_followed(server):
    srv = server(
        serving(lambda n: answer_with(b"", "302 Found", "Location: http://elsewhere/v1\r\n"))
    )
    with pytest.raises(UpstreamError) as caught:
        complete(client_for(srv))
    error = caught.value
    assert (error.status, error.error_type) == (502, "api_error")
    assert f"backend 127.0.0.1:{srv.port} answered with a redirect (HTTP 302)" in error.message
    assert len(srv.requests) == 1


def test_bytes_sent_after_an_answer_never_reach_the_next_request(server):
    """A backend that writes an unrequested second response right after the first: the
    next request, from whoever, gets its own answer, never that one."""

    def handler(conn, srv):
        while request := read_request(conn):
            srv.requests.append(request)
            n = len(srv.requests) - 1
            conn.sendall(numbered(n) + answer_with(b'{"leaked":%d}' % n))

    srv = server(handler)
    client = client_for(srv)
    assert [complete(client) for _ in range(4)] == [{"n": 0}, {"n": 1}, {"n": 2}, {"n": 3}]


def test_bytes_arriving_after_an_answer_retire_the_connection(server):
    strays = threading.Semaphore(0)

    def handler(conn, srv):
        while request := read_request(conn):
            srv.requests.append(request)
            n = len(srv.requests) - 1
            conn.sendall(numbered(n))
            time.sleep(0.05)
            conn.sendall(answer_with(b'{"leaked":%d}' % n))
            strays.release()

    srv = server(handler)
    client = client_for(srv)
    answers = []
    for _ in range(3):
        answers.append(complete(client))
        assert strays.acquire(timeout=30)  # the stray bytes are on the pooled connection now
    assert answers == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert srv.connections == 3


def test_error_statuses_keep_their_meaning_and_retry_after(server):
    answer = answer_with(b'{"error": {"message": "slow down"}}', "429 Too Many Requests",
                         "Retry-After: 3\r\n")  # fmt: skip
    srv = server(serving(lambda n: answer))
    with pytest.raises(RateLimited) as caught:
        complete(client_for(srv))
    assert caught.value.headers["retry-after"] == "3"
    assert "slow down" in caught.value.message


def test_an_error_body_is_read_only_to_its_bound_and_the_connection_dropped(server):
    answer = b"HTTP/1.1 500 Oops\r\nContent-Length: 1000000\r\n\r\n" + b"e" * 1_000_000
    srv = server(serving(lambda n: answer))
    client = client_for(srv)
    with pytest.raises(UpstreamError, match="returned HTTP 500"):
        complete(client)
    srv2 = server(serving(lambda n: OK))
    assert complete(client_for(srv2)) == {"ok": True}


# --- bounded bodies -------------------------------------------------------------------------


def test_gzip_body_is_decompressed(server):
    packed = gzip.compress(b'{"big": "answer"}')
    answer = answer_with(packed, headers="Content-Encoding: gzip\r\n")
    srv = server(serving(lambda n: answer))
    assert complete(client_for(srv)) == {"big": "answer"}


def test_a_gzip_bomb_stops_at_the_body_cap_without_inflating_in_memory(server):
    bomb = gzip_bomb(256 << 20)  # 256 MiB inflated, about 250 KB sent
    answer = answer_with(bomb, headers="Content-Encoding: gzip\r\n")
    srv = server(serving(lambda n: answer))
    client = client_for(srv, max_response_bytes=1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(UpstreamError, match="larger than 1048576 bytes"):
            complete(client)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # the cap and a few read buffers, not the inflated body


def test_a_declared_length_over_the_cap_is_refused_before_reading(server):
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n{"
    srv = server(serving(lambda n: answer))
    with pytest.raises(UpstreamError, match="larger than"):
        complete(client_for(srv, max_response_bytes=4096))


# --- failures below HTTP --------------------------------------------------------------------


def test_silent_backend_times_out_as_a_read_timeout_and_is_not_retryable(server):
    released = threading.Event()

    def handler(conn, srv):
        read_request(conn)
        released.wait(30)  # silent until the test is over

    srv = server(handler)
    started = time.monotonic()
    try:
        with pytest.raises(UpstreamTimeout) as caught:
            complete(client_for(srv, read_timeout=0.3))
        assert time.monotonic() - started < 15  # the read timeout, not the backend, ended it
    finally:
        released.set()
    assert not caught.value.retryable


def test_refused_connection_never_reached_the_backend():
    with socket.create_server(("127.0.0.1", 0)) as unused:
        port = unused.getsockname()[1]  # closed again: nobody listens there
    with pytest.raises(UpstreamError) as caught:
        complete(make_client(f"http://127.0.0.1:{port}/v1"))
    error = caught.value
    assert error.status == 502
    assert error.message == f"cannot connect to backend 127.0.0.1:{port}: connection refused"
    assert error.retryable and not error.reached


def test_an_ipv6_literal_backend_is_reached():
    try:
        listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            read_request(conn)
            conn.sendall(OK)

    threading.Thread(target=serve, daemon=True).start()
    with listener:
        assert complete(make_client(f"http://[::1]:{port}/v1")) == {"ok": True}


def test_fresh_connection_closed_without_answer_is_a_502(server):
    def handler(conn, srv):
        read_request(conn)

    srv = server(handler)
    with pytest.raises(UpstreamError) as caught:
        complete(client_for(srv))
    assert caught.value.status == 502
    assert f"connection to backend 127.0.0.1:{srv.port} failed" in caught.value.message


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 abc Bad\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_garbage_answers_are_502s(server, answer):
    srv = server(serving(lambda n: answer))
    with pytest.raises(UpstreamError) as caught:
        complete(client_for(srv))
    assert caught.value.status in (500, 502)
    assert f"backend 127.0.0.1:{srv.port}" in caught.value.message


def test_passthrough_header_values_that_would_split_the_head_are_refused(server):
    srv = server(serving(lambda n: OK))
    client = client_for(srv, protocol="anthropic")
    with pytest.raises(InvalidRequest, match="anthropic-beta"):
        client.messages({"model": "m"}, "req_test0001", {"anthropic-beta": "x\r\nEvil: 1"})
    assert srv.requests == []


@pytest.mark.parametrize(
    ("head", "first", "second"),
    [
        (b"Transfer-Encoding: chunked\r\n", b"5\r\nfirst\r\n", b"6\r\nsecond\r\n0\r\n\r\n"),
        (b"", b"first", b"second"),  # no framing: the body ends when the connection does
    ],
    ids=["chunked", "close_delimited"],
)
def test_a_streamed_body_is_handed_over_as_it_arrives(server, head, first, second):
    got_first = threading.Event()
    second_sent: list[float] = []

    def handler(conn, srv):
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + head + b"\r\n")
        conn.sendall(first)
        got_first.wait(10)  # the rest only once the client has the first (or has waited 10 s)
        second_sent.append(time.monotonic())
        conn.sendall(second)

    srv = server(handler)
    client = client_for(srv)
    response = client.open_stream({"model": "m"}, "req_test0001")
    seen = []
    for piece in client.chunks(response):
        seen.append((piece, time.monotonic()))
        got_first.set()
    response.close()
    assert [piece for piece, _ in seen] == [b"first", b"second"]
    assert seen[0][1] < second_sent[0]  # handed over before the backend sent any more


# --- proxies --------------------------------------------------------------------------------


def test_plain_http_through_a_proxy_uses_the_absolute_target(server):
    srv = server(serving(lambda n: OK))  # plays the proxy
    client = make_client(
        "http://backend.internal:8000/v1", proxy=f"http://user:p%40ss@127.0.0.1:{srv.port}"
    )
    assert complete(client) == {"ok": True}
    head = srv.requests[0].split(b"\r\n\r\n")[0].decode()
    assert head.startswith("POST http://backend.internal:8000/v1/chat/completions HTTP/1.1")
    assert "Host: backend.internal:8000" in head
    assert "Proxy-Authorization: Basic dXNlcjpwQHNz" in head  # user:p@ss


def test_proxy_from_the_environment_only_with_trust_env(server, monkeypatch):
    srv = server(serving(lambda n: OK))  # plays the proxy
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{srv.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert complete(make_client("http://backend.internal:8000/v1", trust_env=True)) == {"ok": True}
    assert srv.requests[0].startswith(b"POST http://backend.internal:8000/")
    with pytest.raises(UpstreamError, match="cannot connect to backend backend.internal:8000"):
        complete(make_client("http://backend.internal:8000/v1"))  # trust_env off: no proxy


def test_a_proxy_that_refuses_is_a_502_naming_the_proxy(server):
    with socket.create_server(("127.0.0.1", 0)) as unused:
        port = unused.getsockname()[1]
    client = make_client("http://backend.internal:8000/v1", proxy=f"http://127.0.0.1:{port}")
    with pytest.raises(UpstreamError, match="the proxy to backend backend.internal:8000 failed"):
        complete(client)


# --- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> ThrowawayCA:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed for the test certificates (apt-get install openssl)")
    return ThrowawayCA(tmp_path_factory.mktemp("tls"))


def tls_server_context(ca: ThrowawayCA, *, require_client: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(ca.server_cert, ca.server_key)
    if require_client:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(ca.cert)
    return context


def test_https_is_verified_against_the_configured_ca_bundle(server, ca):
    srv = server(serving(lambda n: OK), wrap=tls_server_context(ca))
    client = make_client(f"https://localhost:{srv.port}/v1", ca_bundle=str(ca.cert))
    assert complete(client) == {"ok": True}
    assert complete(client) == {"ok": True}
    assert srv.connections == 1


def test_https_with_an_unknown_ca_fails_as_tls(server, ca):
    srv = server(serving(lambda n: OK), wrap=tls_server_context(ca))
    with pytest.raises(UpstreamError) as caught:
        complete(make_client(f"https://localhost:{srv.port}/v1"))
    assert caught.value.status == 502
    assert f"TLS with backend localhost:{srv.port} failed" in caught.value.message
    assert "CERTIFICATE_VERIFY_FAILED" in caught.value.message


def test_mutual_tls_with_the_configured_client_certificate(server, ca):
    srv = server(serving(lambda n: OK), wrap=tls_server_context(ca, require_client=True))
    url = f"https://127.0.0.1:{srv.port}/v1"
    mutual = make_client(
        url,
        ca_bundle=str(ca.cert),
        client_cert=str(ca.client_cert),
        client_key=str(ca.client_key),
    )
    assert complete(mutual) == {"ok": True}
    with pytest.raises(GatewayError):
        complete(make_client(url, ca_bundle=str(ca.cert)))  # no client certificate


def test_https_through_a_proxy_tunnels_with_connect(server, ca):
    backend = server(serving(lambda n: OK), wrap=tls_server_context(ca))
    with ForwardProxy() as proxy:
        client = make_client(
            f"https://localhost:{backend.port}/v1", proxy=proxy.url, ca_bundle=str(ca.cert)
        )
        assert complete(client) == {"ok": True}
    assert proxy.seen[0].startswith(f"CONNECT localhost:{backend.port} HTTP/1.")
    assert b"POST /v1/chat/completions" in backend.requests[0]
