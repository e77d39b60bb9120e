"""A scriptable fake OpenAI Chat Completions backend for integration tests.

The gateway under test talks to its backend over real TCP with a connection pool, so a mock at
the ``requests`` level would hide exactly the things that break in production: keep-alive,
chunked framing, close-delimited bodies, half-written streams, slow backends and clients that
hang up. This module runs a real HTTP/1.1 server on 127.0.0.1 (ephemeral port) whose answers the
test scripts in advance::

    with FakeBackend() as fb:
        fb.reply(StreamReply(chunks(["Hel", "lo"]), delay=0.01))
        ...  # point the gateway at fb.url and call it
        assert fb.requests[0].json["stream"] is True

Only the standard library is used, so the fake cannot share a bug with the code under test.
Wire formats follow docs/protocol.md Part B (B2 non-streaming, B3 streaming, B4 errors).
"""

from __future__ import annotations

import copy
import json
import select
import socket
import socketserver
import ssl
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "AutoReply",
    "EchoReply",
    "HoldReply",
    "HugeLineReply",
    "WireReply",
    "FakeBackend",
    "HangReply",
    "JSONReply",
    "RawReply",
    "Recorded",
    "Reply",
    "StreamReply",
    "chunk",
    "chunks",
    "completion",
    "error_body",
    "gzip_bomb",
    "tool_call_chunks",
]

CHAT_PATH = "/v1/chat/completions"
FAKE_ID = "chatcmpl-fake"
FAKE_CREATED = 1760000000
DEFAULT_USAGE: dict[str, Any] = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
DIALECTS = ("openai", "vllm", "llamacpp")


# --------------------------------------------------------------------------------------------
TOKENIZER_PATHS = ("/tokenize", "/apply-template", "/detokenize")

# Recorded requests
# --------------------------------------------------------------------------------------------


@dataclass
class Recorded:
    """One request as the backend saw it, so tests can assert on what the gateway sent."""

    method: str
    path: str  # including the query string
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    body: bytes
    json: Any | None  # the parsed body, or None when empty or not JSON


def _parse_json(body: bytes) -> Any | None:
    """Parse a request body leniently: a test asserting on JSON gets None rather than a crash."""
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# Replies: each one knows how to write itself through the handler
# --------------------------------------------------------------------------------------------


class Reply:
    """Base class of scripted answers; ``send`` writes the whole HTTP response."""

    def send(self, handler: _Handler, request: Recorded) -> None:
        raise NotImplementedError


def _merge_headers(defaults: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """Defaults overridden case-insensitively by the reply's own headers."""
    wanted = {name.lower() for name in extra}
    merged = {name: value for name, value in defaults.items() if name.lower() not in wanted}
    merged.update(extra)
    return merged


@dataclass
class JSONReply(Reply):
    """A complete (non-streaming) answer with Content-Length, so the connection stays alive.

    A ``str`` body is sent as-is with ``text/html``, to imitate proxies' HTML error pages.
    ``leading_blank_lines`` imitates DeepSeek, which writes newlines while a request is queued.
    """

    body: dict | list | str
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    leading_blank_lines: int = 0

    def _encoded(self) -> tuple[bytes, str]:
        if isinstance(self.body, str):
            return self.body.encode(), "text/html; charset=utf-8"
        return json.dumps(self.body).encode(), "application/json"

    def send(self, handler: _Handler, request: Recorded) -> None:
        if not handler.pause(self.delay):
            handler.close_connection = True
            return
        body, content_type = self._encoded()
        prefix = b"\n" * self.leading_blank_lines
        defaults = {"Content-Type": content_type, "Content-Length": str(len(prefix) + len(body))}
        try:
            handler.start_response(self.status, _merge_headers(defaults, self.headers))
            if prefix:
                handler.write(prefix)
            handler.write(body)
        except OSError:  # the client went away; nothing left to do on this connection
            handler.close_connection = True


@dataclass
class StreamReply(Reply):
    """A ``text/event-stream`` answer written event by event, as a real backend produces it.

    Dict events are sent as ``data: <json>``, str events verbatim as ``data: <str>`` (to send
    malformed JSON). ``comments`` holds ``(i, text)`` pairs: ``: text`` is written (as its own
    block, like DeepSeek's ``: keep-alive``) before event ``i``; ``i == len(events)`` puts it
    before ``[DONE]``. ``chunked=False`` gives a close-delimited body. ``cut_after=k`` drops the
    connection after k events, with neither ``[DONE]`` nor the final zero-length chunk.
    A failed write means the client hung up: the stream stops and ``closed_by_client`` counts it.
    ``sent_at`` gets the ``time.monotonic()`` of each event just before it is written (after it,
    the client may already have read it and taken its own time), so a test can say
    "the client had this before the backend had even sent that" whatever the machine's speed.
    """

    events: list[dict | str]
    status: int = 200
    line_ending: str = "\n"
    done: bool = True
    comments: list[tuple[int, str]] = field(default_factory=list)
    delay: float = 0.0
    first_delay: float = 0.0
    chunked: bool = True
    cut_after: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    sent_at: list[float] = field(default_factory=list)

    def _response_headers(self) -> dict[str, str]:
        defaults = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        if self.chunked:
            defaults["Transfer-Encoding"] = "chunked"
        else:
            defaults["Connection"] = "close"
        return _merge_headers(defaults, self.headers)

    def _event_bytes(self, event: dict | str) -> bytes:
        payload = event if isinstance(event, str) else json.dumps(event)
        return f"data: {payload}{self.line_ending}{self.line_ending}".encode()

    def _comment_bytes(self, index: int) -> bytes:
        end = self.line_ending
        return "".join(f": {text}{end}{end}" for i, text in self.comments if i == index).encode()

    def _emit(self, handler: _Handler, data: bytes) -> None:
        """One write (and one HTTP chunk) per piece, so the client sees it immediately."""
        if not data:
            return  # an empty chunk would terminate a chunked body
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        handler.write(data)

    def _is_cut(self, written: int) -> bool:
        return self.cut_after is not None and written >= self.cut_after

    def _write_events(self, handler: _Handler) -> bool:
        """Write every event; False when the stream ended early (cut, or backend stopping)."""
        for index, event in enumerate(self.events):
            if self._is_cut(index):
                return False
            if not handler.pause(self.first_delay if index == 0 else self.delay):
                return False
            self._emit(handler, self._comment_bytes(index))
            self.sent_at.append(time.monotonic())  # before the write: the client may be quicker
            self._emit(handler, self._event_bytes(event))
        if self._is_cut(len(self.events)):
            return False
        self._emit(handler, self._comment_bytes(len(self.events)))
        if self.done:
            self._emit(handler, self._event_bytes("[DONE]"))
        return True

    def send(self, handler: _Handler, request: Recorded) -> None:
        try:
            handler.start_response(self.status, self._response_headers())
            complete = self._write_events(handler)
            if complete and self.chunked:
                handler.write(b"0\r\n\r\n")
        except OSError:
            handler.close_connection = True
            handler.backend.note_closed_by_client()
            return
        if not complete or not self.chunked:
            handler.close_connection = True


@dataclass
class RawReply(Reply):
    """Arbitrary body bytes, for answers no other reply can express (broken JSON, odd bytes).

    Content-Length is added unless ``headers`` set Content-Length or Transfer-Encoding
    themselves; then ``data`` is written as given and the connection is closed afterwards,
    since the framing cannot be trusted for keep-alive. Content-Type defaults to JSON.
    """

    data: bytes
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)

    def _has_own_framing(self) -> bool:
        return any(name.lower() in ("content-length", "transfer-encoding") for name in self.headers)

    def send(self, handler: _Handler, request: Recorded) -> None:
        defaults = {"Content-Type": "application/json"}
        if not self._has_own_framing():
            defaults["Content-Length"] = str(len(self.data))
        try:
            handler.start_response(self.status, _merge_headers(defaults, self.headers))
            handler.write(self.data)
        except OSError:
            handler.close_connection = True
        if self._has_own_framing():
            handler.close_connection = True


@dataclass
class HangReply(Reply):
    """Accept the request and send nothing for ``seconds``, then close: tests read timeouts."""

    seconds: float

    def send(self, handler: _Handler, request: Recorded) -> None:
        handler.pause(self.seconds)
        handler.close_connection = True


@dataclass
class AutoReply(Reply):
    """The default answer: a short completion, streamed when the request asked for a stream.

    Like OpenAI, the stream carries a usage chunk only when the request set
    ``stream_options.include_usage``.
    """

    content: str = "Hello"

    def send(self, handler: _Handler, request: Recorded) -> None:
        body = request.json if isinstance(request.json, dict) else {}
        if not body.get("stream"):
            JSONReply(completion(self.content)).send(handler, request)
            return
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        events = chunks([self.content], usage=DEFAULT_USAGE if include_usage else None)
        StreamReply(events).send(handler, request)


@dataclass
class EchoReply(Reply):
    """Answers with the text of the request's last message, streamed or not: each client can
    check that the answer it got is its own."""

    def send(self, handler: _Handler, request: Recorded) -> None:
        AutoReply(content=last_text(request)).send(handler, request)


def last_text(request: Recorded) -> str:
    body = request.json if isinstance(request.json, dict) else {}
    messages = body.get("messages") or [{}]
    content = messages[-1].get("content", "")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


@dataclass
class WireReply(Reply):
    """Exactly these bytes on the wire, status line included: answers no HTTP server should
    give (a 101 to a POST, a second response nobody asked for). ``then`` is written
    ``then_after`` seconds later, on the same connection; ``close`` ends it afterwards.
    ``then_written`` is set once ``then`` is on the wire (on loopback: in the client's buffer)."""

    data: bytes
    then: bytes = b""
    then_after: float = 0.0
    close: bool = False
    then_written: threading.Event = field(default_factory=threading.Event)

    def send(self, handler: _Handler, request: Recorded) -> None:
        data = self.data
        request_id = request.headers.get("x-request-id")
        if handler.backend.echo_request_id and request_id and data.startswith(b"HTTP/"):
            line, _, rest = data.partition(b"\r\n")  # the answer echoes it; ``then`` never
            data = line + b"\r\nX-Request-ID: " + request_id.encode() + b"\r\n" + rest
        try:
            handler.write(data)
            if self.then:
                if self.then_after and not handler.pause(self.then_after):
                    return
                handler.write(self.then)
                self.then_written.set()
        except OSError:
            handler.close_connection = True
            return
        handler.close_connection = self.close


@dataclass
class HoldReply(Reply):
    """Take the request and answer nothing, for up to ``seconds``: a model that thinks. When
    the gateway hangs up meanwhile, that is counted in ``closed_by_client`` at once."""

    seconds: float

    def send(self, handler: _Handler, request: Recorded) -> None:
        conn = handler.connection
        readable, _, _ = select.select([conn], [], [], self.seconds)
        try:
            gone = bool(readable) and not conn.recv(1, socket.MSG_PEEK)
        except OSError:
            gone = True
        if gone:
            handler.backend.note_closed_by_client()
        handler.close_connection = True


@dataclass
class HugeLineReply(Reply):
    """A stream whose first event is one ``data:`` line of ``size`` bytes, written in pieces
    of ``piece`` bytes, as a backend gone wrong might; it stops when the client hangs up."""

    size: int
    piece: int = 1 << 16

    def send(self, handler: _Handler, request: Recorded) -> None:
        headers = {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"}
        block = b"x" * self.piece
        try:
            handler.start_response(200, headers)
            handler.write(b"%x\r\n%s\r\n" % (6, b"data: "))
            for _ in range(self.size // self.piece):
                handler.write(b"%x\r\n%s\r\n" % (len(block), block))
            handler.write(b"2\r\n\n\n\r\n0\r\n\r\n")
        except OSError:
            handler.backend.note_closed_by_client()
        handler.close_connection = True


# --------------------------------------------------------------------------------------------
# HTTP server and handler
# --------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    """One thread per connection; handler threads are joined on close (block_on_close)."""

    daemon_threads = True
    backend: FakeBackend
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        """With TLS, the handshake happens in the connection's own thread."""
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        try:
            wrapped = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return  # a client that does not trust us, or is not speaking TLS
        try:
            super().finish_request(wrapped, client_address)
        finally:
            wrapped.close()

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse-DNS lookup, which can stall in sandboxes."""
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = port

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up is part of the tests, not an error worth a traceback."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Records every request, then lets the chosen Reply write the response."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the gateway's connection pool expects
    disable_nagle_algorithm = True  # small SSE writes must not wait for ACKs
    server: _Server

    @property
    def backend(self) -> FakeBackend:
        return self.server.backend

    def setup(self) -> None:
        super().setup()
        self.backend.track_connection(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.backend.untrack_connection(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence per-request logging; pytest output should show test failures only."""

    # --- helpers used by replies ---

    def start_response(self, status: int, headers: dict[str, str]) -> None:
        """Write the status line and headers in one go."""
        self.send_response(status)
        request_id = self.headers.get("X-Request-ID")
        if self.backend.echo_request_id and request_id:
            self.send_header("X-Request-ID", request_id)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def write(self, data: bytes) -> None:
        """Unbuffered write (wbufsize is 0): raises OSError when the client has gone."""
        self.wfile.write(data)

    def pause(self, seconds: float) -> bool:
        """Sleep, waking early if the backend stops; False means: stop answering now."""
        if seconds <= 0:
            return not self.backend.stopping
        return not self.backend.wait_stopping(seconds)

    # --- request handling ---

    def _read_chunked_body(self) -> bytes:
        """Request bodies are normally sized, but accept chunked uploads too."""
        body = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # skip trailers
                return body
            body += self.rfile.read(size)
            self.rfile.readline()  # CRLF after the chunk data

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked_body()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _lowercase_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return headers

    def _serve(self) -> None:
        body = self._read_body()
        request = Recorded(
            self.command, self.path, self._lowercase_headers(), body, _parse_json(body)
        )
        self.backend.record(request)
        self.backend.choose_reply(request).send(self, request)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _serve


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


class FakeBackend:
    """A real HTTP server on 127.0.0.1 answering /v1/chat/completions with scripted replies.

    Replies queued with ``reply()`` are used first-in first-out; when the queue is empty
    ``default`` answers (an AutoReply "Hello" unless set to something else or None).
    """

    def __init__(
        self,
        reject_stream_options: bool = False,
        tls: ssl.SSLContext | None = None,
        echo_request_id: bool = False,
        port: int = 0,
    ) -> None:
        self.reject_stream_options = reject_stream_options
        self.listen_port = port  # 0: any free one; a port: a backend restarted where it was
        # Answers carry the request's X-Request-ID back, as vLLM can and most proxies do;
        # a test may turn it off or on between requests, as a restarted backend would.
        self.echo_request_id = echo_request_id
        self.tls = tls  # a server context: the backend speaks HTTPS
        self.requests: list[Recorded] = []
        self.tokenizer_requests: list[Recorded] = []
        self.default: Reply | None = AutoReply()
        # (method, path) -> function of the request returning a Reply: tokenizer endpoints etc.
        self.routes: dict[tuple[str, str], Callable[[Recorded], Reply]] = {}
        self.closed_by_client = 0
        self._queue: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._closed = threading.Condition()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    # --- lifecycle ---

    def start(self) -> FakeBackend:
        """Listen on the port given (any free one by default) and serve from a daemon thread."""
        if self._server is not None or self._stopping.is_set():
            raise RuntimeError("FakeBackend can only be started once")
        server = _Server(("127.0.0.1", self.listen_port), _Handler)
        server.backend = self
        server.tls = self.tls
        self._server = server
        self._port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},  # shutdown() waits up to one poll interval
            name=f"fakebackend-{self._port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and end every open connection, so no thread or socket outlives a test.

        Idempotent. ``url`` stays valid afterwards (useful for connection-refused tests).
        """
        server = self._server
        if server is None or self._stopping.is_set():
            return
        self._stopping.set()  # wakes replies sleeping in pause()
        server.shutdown()
        self._shutdown_connections()
        server.server_close()  # joins the handler threads
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> FakeBackend:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeBackend is not started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL as a gateway backend setting: ``http://127.0.0.1:PORT/v1``."""
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}/v1"

    # --- scripting ---

    def reply(self, *replies: Reply) -> None:
        """Queue replies for the next chat-completion requests, in order."""
        with self._lock:
            self._queue.extend(replies)

    def wait_closed(self, n: int = 1, timeout: float = 5.0) -> bool:
        """Wait until n streamed replies were ended by the client hanging up."""
        with self._closed:
            return self._closed.wait_for(lambda: self.closed_by_client >= n, timeout)

    # --- called from handler threads ---

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wait_stopping(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if the backend started stopping meanwhile."""
        return self._stopping.wait(seconds)

    def record(self, request: Recorded) -> None:
        """Tokenizer calls (the gateway counts a stream's prompt beside the request itself,
        in any order with it) are kept apart, so ``requests[-1]`` is the request proper."""
        tokenizer = urlsplit(request.path).path in TOKENIZER_PATHS
        with self._lock:
            (self.tokenizer_requests if tokenizer else self.requests).append(request)

    def note_closed_by_client(self) -> None:
        """Count a stream ended by the client; writes failing because we stop do not count."""
        if self.stopping:
            return
        with self._closed:
            self.closed_by_client += 1
            self._closed.notify_all()

    def choose_reply(self, request: Recorded) -> Reply:
        """Routing and queue: extra routes, 404 off the chat path, stream_options rejection."""
        route = self.routes.get((request.method, urlsplit(request.path).path))
        if route is not None:
            return route(request)
        if request.method != "POST" or urlsplit(request.path).path != CHAT_PATH:
            return JSONReply(error_body("not found"), status=404)
        if self._rejects(request):
            message = "Unrecognized request argument supplied: stream_options"
            return JSONReply(error_body(message), status=400)
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        if self.default is not None:
            return self.default
        message = "fake backend: no reply queued and no default"
        return JSONReply(error_body(message, error_type="server_error"), status=500)

    def _rejects(self, request: Recorded) -> bool:
        body = request.json
        return self.reject_stream_options and isinstance(body, dict) and "stream_options" in body

    def track_connection(self, conn: socket.socket) -> None:
        """Remember an open connection; one accepted while stopping is ended at once."""
        with self._lock:
            self._connections.add(conn)
            stopping = self.stopping
        if stopping:
            _shutdown_socket(conn)

    def untrack_connection(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)

    def _shutdown_connections(self) -> None:
        """Unblock handlers waiting on idle keep-alive connections so they can be joined."""
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            _shutdown_socket(conn)


def _shutdown_socket(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by its handler


# --------------------------------------------------------------------------------------------
# Builders for response bodies (pure functions)
# --------------------------------------------------------------------------------------------


def error_body(
    message: str,
    *,
    error_type: str = "invalid_request_error",
    code: str | int | None = None,
    param: str | None = None,
) -> dict:
    """An OpenAI-shaped error envelope (B4)."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _usage(usage: dict | None, cached_tokens: int | None) -> dict | None:
    """A private copy of ``usage`` with ``prompt_tokens_details.cached_tokens`` if given."""
    if usage is None:
        return None
    result = copy.deepcopy(usage)
    if cached_tokens is not None:
        result["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return result


def completion(
    content: str | None = "Hello",
    *,
    finish_reason: str | None = "stop",
    model: str = "backend-model",
    usage: dict | None = DEFAULT_USAGE,
    cached_tokens: int | None = None,
    extra_message: dict | None = None,
    extra_choice: dict | None = None,
) -> dict:
    """A non-streaming ``chat.completion`` (B2).

    ``extra_message`` is merged into ``choices[0].message`` (reasoning_content, tool_calls…),
    ``extra_choice`` into ``choices[0]`` (e.g. vLLM's ``stop_reason``).
    """
    message: dict[str, Any] = {"role": "assistant", "content": content}
    message.update(copy.deepcopy(extra_message or {}))
    choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish_reason}
    choice.update(copy.deepcopy(extra_choice or {}))
    body: dict[str, Any] = {
        "id": FAKE_ID,
        "object": "chat.completion",
        "created": FAKE_CREATED,
        "model": model,
        "choices": [choice],
    }
    usage_body = _usage(usage, cached_tokens)
    if usage_body is not None:
        body["usage"] = usage_body
    return body


def chunk(
    delta: dict,
    finish_reason: str | None = None,
    *,
    model: str = "backend-model",
    extra_choice: dict | None = None,
) -> dict:
    """One ``chat.completion.chunk`` with a single choice, for hand-built streams (tool calls)."""
    choice: dict[str, Any] = {
        "index": 0,
        "delta": copy.deepcopy(delta),
        "finish_reason": finish_reason,
    }
    choice.update(copy.deepcopy(extra_choice or {}))
    return {
        "id": FAKE_ID,
        "object": "chat.completion.chunk",
        "created": FAKE_CREATED,
        "model": model,
        "choices": [choice],
    }


def tool_call_chunks(calls: list[tuple[str | None, str, list[str]]], text: str = "") -> list[dict]:
    """OpenAI-style fragments: id and name first, then argument pieces, one call after another."""
    events = [chunk({"role": "assistant", "content": ""})]
    if text:
        events.append(chunk({"content": text}))
    for index, (call_id, name, pieces) in enumerate(calls):
        first = {"index": index, "type": "function", "function": {"name": name, "arguments": ""}}
        if call_id:
            first["id"] = call_id
        events.append(chunk({"tool_calls": [first]}))
        for piece in pieces:
            fragment = {"index": index, "function": {"arguments": piece}}
            events.append(chunk({"tool_calls": [fragment]}))
    events.append(chunk({}, "tool_calls"))
    return events


def _usage_chunk(usage: dict, model: str) -> dict:
    """The include_usage chunk: no choices, only usage (B3)."""
    return {
        "id": FAKE_ID,
        "object": "chat.completion.chunk",
        "created": FAKE_CREATED,
        "model": model,
        "choices": [],
        "usage": usage,
    }


def _timings(usage: dict | None) -> dict:
    """llama.cpp's per-request timing object, sized from the usage numbers."""
    usage = usage or {}
    return {
        "prompt_n": usage.get("prompt_tokens", 0),
        "prompt_ms": 12.5,
        "predicted_n": usage.get("completion_tokens", 0),
        "predicted_ms": 40.0,
    }


def chunks(
    pieces: list[str],
    *,
    finish_reason: str = "stop",
    dialect: str = "openai",
    usage: dict | None = DEFAULT_USAGE,
    cached_tokens: int | None = None,
    model: str = "backend-model",
    extra_choice: dict | None = None,
) -> list[dict]:
    """A streamed text answer in the chunk layout of one backend family (B3).

    Every dialect starts with ``{"role": "assistant", "content": ""}`` then one chunk per piece.
    openai: separate finish chunk (empty delta), then a ``choices: []`` usage chunk; all other
        chunks carry ``"usage": null``.
    vllm: the last piece and finish_reason share a chunk (with ``stop_reason``, null unless
        ``extra_choice`` sets it), then the usage chunk; no ``usage`` key elsewhere.
    llamacpp: the finish chunk itself carries ``usage`` and ``timings``.
    ``usage=None``: no usage anywhere (a backend that ignored stream_options).
    ``extra_choice`` is merged into the choice that carries finish_reason.
    """
    if dialect not in DIALECTS:
        raise ValueError(f"unknown dialect {dialect!r}; expected one of {DIALECTS}")
    usage_body = _usage(usage, cached_tokens)
    if dialect == "openai":
        return _openai_chunks(pieces, finish_reason, usage_body, model, extra_choice)
    if dialect == "vllm":
        return _vllm_chunks(pieces, finish_reason, usage_body, model, extra_choice)
    return _llamacpp_chunks(pieces, finish_reason, usage_body, model, extra_choice)


def _content_chunks(pieces: list[str], model: str) -> list[dict]:
    first = chunk({"role": "assistant", "content": ""}, model=model)
    return [first] + [chunk({"content": piece}, model=model) for piece in pieces]


def _openai_chunks(
    pieces: list[str], finish_reason: str, usage: dict | None, model: str, extra: dict | None
) -> list[dict]:
    events = _content_chunks(pieces, model)
    events.append(chunk({}, finish_reason, model=model, extra_choice=extra))
    if usage is not None:
        for event in events:
            event["usage"] = None
        events.append(_usage_chunk(usage, model))
    return events


def _vllm_chunks(
    pieces: list[str], finish_reason: str, usage: dict | None, model: str, extra: dict | None
) -> list[dict]:
    events = _content_chunks(pieces[:-1], model)
    last_delta = {"content": pieces[-1]} if pieces else {}
    finish_choice = {"stop_reason": None, **(extra or {})}
    events.append(chunk(last_delta, finish_reason, model=model, extra_choice=finish_choice))
    if usage is not None:
        events.append(_usage_chunk(usage, model))
    return events


def _llamacpp_chunks(
    pieces: list[str], finish_reason: str, usage: dict | None, model: str, extra: dict | None
) -> list[dict]:
    events = _content_chunks(pieces, model)
    finish = chunk({}, finish_reason, model=model, extra_choice=extra)
    if usage is not None:
        finish["usage"] = usage
    finish["timings"] = _timings(usage)
    events.append(finish)
    return events


def gzip_bomb(size: int) -> bytes:
    """``size`` zero bytes, gzipped: about a thousandth of that on the wire."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [packer.compress(block) for _ in range(size >> 20)]
    return b"".join(parts) + packer.flush()
