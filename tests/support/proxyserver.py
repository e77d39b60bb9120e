"""A forward HTTP proxy on 127.0.0.1 for tests: absolute-form requests for plain HTTP, CONNECT
tunnels for HTTPS, as squid or tinyproxy would serve them. It records the request line of
everything it carries, so a test can tell that traffic went through it.

Only the standard library; one thread per connection, one exchange per connection (it answers
absolute-form requests with ``Connection: close``), which is all a test needs.
"""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlsplit


class ForwardProxy:
    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.seen: list[str] = []  # request lines, e.g. "CONNECT 127.0.0.1:443 HTTP/1.1"
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def __enter__(self) -> ForwardProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            head, rest = _read_head(conn)
            if not head:
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            self.seen.append(line)
            method, target, _ = line.split(" ", 2)
            if method == "CONNECT":
                self._tunnel(conn, target, rest)
            else:
                self._forward(conn, head, rest, target)

    def _tunnel(self, conn: socket.socket, target: str, rest: bytes) -> None:
        host, _, port = target.rpartition(":")
        try:
            upstream = socket.create_connection((host, int(port)), timeout=5)
        except OSError:
            conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        with upstream:
            if rest:
                upstream.sendall(rest)
            _pipe_both(conn, upstream)

    def _forward(self, conn: socket.socket, head: bytes, rest: bytes, target: str) -> None:
        parts = urlsplit(target)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        lines = head.split(b"\r\n")
        method, _, version = lines[0].decode("latin-1").split(" ", 2)
        kept = [h for h in lines[1:] if not h.lower().startswith((b"proxy-", b"connection:"))]
        request = b"\r\n".join([f"{method} {path} {version}".encode(), *kept, b"Connection: close"])
        try:
            upstream = socket.create_connection((parts.hostname, parts.port or 80), timeout=5)
        except OSError:
            conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        with upstream:
            upstream.sendall(request + b"\r\n\r\n" + rest)
            _pipe_both(conn, upstream)


def _read_head(conn: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(65536)
        if not piece:
            return b"", b""
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _pipe_both(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until either side closes."""
    other = threading.Thread(target=_copy, args=(b, a), daemon=True)
    other.start()
    _copy(a, b)
    other.join(5)


def _copy(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
