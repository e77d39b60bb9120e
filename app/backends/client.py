"""The HTTP client for one backend: a connection pool per backend per worker.

It owns transport policy (pool size, timeouts, proxies from the environment when asked) and
turns every transport failure into a gateway error that names the backend, so nothing above it
sees a transport exception. Built per worker process, after gevent has patched the socket module.

The transport is app.backend_http, a small HTTP/1.1 client: measured on this gateway,
``requests``' ``Session.request`` was half of the worker's CPU per request, and urllib3 with
http.client under it still a third; posting JSON to one known host needs none of their
generality.
Backends speak either OpenAI Chat Completions or, for ``protocol = "anthropic"``, the Messages
API itself (recent vLLM, SGLang, llama.cpp and Ollama can), in which case bodies pass through.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from app import jsonc
from app.backend_http import (
    READ_SIZE,
    BackendHTTPError,
    BodyFraming,
    ConnectFailed,
    Pool,
    ProtocolFailure,
    ReadTimedOut,
    Response,
    header_block,
)
from app.config import Upstream
from app.errors import GatewayError, InvalidRequest, UpstreamError, UpstreamTimeout
from app.translate.upstream_errors import error_from_status

log = logging.getLogger("gateway")

ERROR_BODY_LIMIT = 65536
# Client headers an Anthropic-speaking backend should see as the client sent them.
ANTHROPIC_HEADERS = ("anthropic-version", "anthropic-beta")


class UpstreamClient:
    """Calls one backend; returns parsed bodies, or open responses for the caller to close."""

    def __init__(self, config: Upstream, pool_size: int) -> None:
        self.config = config
        self.name = _display_name(config.url)
        self.stream_usage = config.dialect.stream_usage
        self.pool = Pool(
            config.url,
            maxsize=max(pool_size, 10),
            connect_timeout=config.connect_timeout,
            proxy=_proxy_for(config),
        )
        self.first_byte_timeout = _first_byte_timeout(config)
        self.idle_timeout = config.idle_timeout or config.read_timeout
        base = {"Content-Type": "application/json", "Accept": "application/json"}
        if config.protocol == "anthropic":
            self.url = config.url + "/messages"
            base["anthropic-version"] = "2023-06-01"
            if config.api_key:
                base["x-api-key"] = config.api_key
        else:
            self.url = config.url + "/chat/completions"
            if config.api_key:
                base["Authorization"] = f"Bearer {config.api_key}"
        self.path = urlsplit(self.url).path
        # No compression: on a stream a decompressor would hold back bytes, and a JSON answer
        # is small and on loopback or a LAN.
        self.headers = {**base, "Accept-Encoding": "identity", **config.headers}
        stream_headers = {**self.headers, "Accept": "text/event-stream"}
        # The header lines every request carries, encoded once.
        self.json_head = header_block(self.headers)
        self.stream_head = header_block(stream_headers)

    # --- OpenAI Chat Completions ---------------------------------------------------------------

    def complete(self, payload: dict[str, Any], request_id: str) -> dict[str, Any]:
        """A non-streamed completion, parsed; raises GatewayError on any failure."""
        return self._read_json(self._post(payload, request_id, stream=False))

    def open_stream(self, payload: dict[str, Any], request_id: str) -> Response:
        """Start a streamed completion and return once the backend has answered 2xx.

        Waiting for the status before the first byte goes to the client keeps a backend error
        a real HTTP error that SDKs can retry. Backends that refuse ``stream_options`` get the
        request again without it, and are not asked again by this worker.
        """
        payload["stream"] = True
        if self.stream_usage:
            payload["stream_options"] = {"include_usage": True}
        try:
            return self._post(payload, request_id, stream=True)
        except _StreamOptionsRejected:
            log.warning("backend %s rejects stream_options; retrying without it", self.name)
            self.stream_usage = False
            payload.pop("stream_options", None)
            return self._post(payload, request_id, stream=True)

    # --- Anthropic Messages, passed through ----------------------------------------------------

    def messages(
        self, body: dict[str, Any], request_id: str, client_headers: Mapping[str, str]
    ) -> dict[str, Any] | Response:
        """POST the client's body to an Anthropic-speaking backend: a message, or an open stream."""
        extra = {h: client_headers[h] for h in ANTHROPIC_HEADERS if h in client_headers}
        stream = bool(body.get("stream"))
        response = self._post(body, request_id, stream=stream, extra=extra)
        return response if stream else self._read_json(response)

    # --- tokenizer -----------------------------------------------------------------------------

    def count_tokens(self, payload: dict[str, Any], request_id: str) -> int | None:
        """The prompt's exact token count from the backend's tokenizer endpoint, if it has one.

        vLLM's ``/tokenize`` takes chat messages; llama.cpp needs ``/apply-template`` first;
        an Anthropic-speaking backend has ``/messages/count_tokens``. Any failure returns None:
        the caller falls back to an estimate.
        """
        tokenizer = self.config.dialect.tokenizer
        root = self.config.url.removesuffix("/v1")
        headers = {**self.headers, "X-Request-ID": request_id}
        request = {k: payload[k] for k in ("model", "messages", "tools") if k in payload}
        try:
            if self.config.protocol == "anthropic":
                counted = self._call(self.url + "/count_tokens", payload, headers)
                return int(counted["input_tokens"])
            if tokenizer == "vllm":
                return int(self._call(root + "/tokenize", request, headers)["count"])
            if tokenizer == "llamacpp":
                prompt = self._call(root + "/apply-template", request, headers)["prompt"]
                tokens = self._call(root + "/tokenize", {"content": prompt}, headers)["tokens"]
                return len(tokens)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("backend %s tokenizer failed (%s); estimating", self.name, _short(str(exc)))
        return None

    def _call(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
        response = self.pool.request(
            "POST",
            urlsplit(url).path,
            header_block(headers),
            jsonc.dumps(body),
            timeout=min(self.config.read_timeout, 30.0),
        )
        if response.status >= 300:
            response.close()
            raise ValueError(f"HTTP {response.status}")
        return jsonc.loads(response.read())

    def close(self) -> None:
        self.pool.close()

    # --- reading ---------------------------------------------------------------------------------

    def read_body(self, response: Response) -> bytes:
        """A whole response body; transport failures as gateway errors."""
        try:
            return response.read()
        except BackendHTTPError as exc:
            raise self._transport_error(exc) from None

    def _read_json(self, response: Response) -> dict[str, Any]:
        body = self.read_body(response)
        try:
            return jsonc.loads(body.strip())
        except jsonc.JSONDecodeError:
            excerpt = body[:200].decode("utf-8", "replace")
            raise UpstreamError(f"backend {self.name} returned invalid JSON: {excerpt}") from None

    def _post(
        self,
        payload: dict[str, Any],
        request_id: str,
        *,
        stream: bool,
        extra: Mapping[str, str] | None = None,
    ) -> Response:
        head = self.stream_head if stream else self.json_head
        if extra:
            try:
                head += header_block(extra)
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
        # Request ids are ours or checked against a strict pattern (app.ops.access_log).
        head += b"X-Request-ID: " + request_id.encode("ascii") + b"\r\n"
        try:
            response = self.pool.request(
                "POST", self.path, head, jsonc.dumps(payload), timeout=self.first_byte_timeout
            )
        except BackendHTTPError as exc:
            raise self._transport_error(exc) from None
        if response.status < 300:
            return response
        raise self._status_error(response, payload)

    def _status_error(self, response: Response, payload: dict[str, Any]) -> Exception:
        try:  # bounded: an error body has no business being large
            body = response.read(ERROR_BODY_LIMIT)
        except BackendHTTPError:  # a broken error body still leaves the status to report
            body = b""
        if (
            response.status in (400, 422)
            and "stream_options" in payload
            and b"stream_options" in body
        ):
            return _StreamOptionsRejected()
        return error_from_status(response.status, body, response.headers, self.name)

    def _transport_error(self, exc: BackendHTTPError) -> GatewayError:
        """Connection failures are retryable (nothing was answered); timeouts are not: the
        backend may still be working on the request."""
        if isinstance(exc, ConnectFailed):
            if exc.refused:
                message = f"cannot connect to backend {self.name}: connection refused"
                return UpstreamError(message, status=502, retryable=True)
            if exc.timed_out:
                return UpstreamTimeout(
                    f"timed out connecting to backend {self.name}", retryable=True
                )
        elif isinstance(exc, ReadTimedOut):
            return UpstreamTimeout(f"backend {self.name} did not answer in time")
        message = f"connection to backend {self.name} failed: {_short(str(exc))}"
        return UpstreamError(message, status=502, retryable=True)


class _StreamOptionsRejected(Exception):
    """The backend refused ``stream_options``: retry once without it."""


def _first_byte_timeout(config: Upstream) -> float:
    if config.total_timeout:
        return min(config.read_timeout, config.total_timeout)
    return config.read_timeout


def _proxy_for(config: Upstream) -> str | None:
    """With ``trust_env`` the environment's proxy settings apply, as they would with curl."""
    if not config.trust_env:
        return None
    parts = urlsplit(config.url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        return proxy
    return None


def _display_name(url: str) -> str:
    """host:port of the backend for messages, without any credentials in the URL."""
    parts = urlsplit(url)
    host = parts.hostname or url
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{parts.port}" if parts.port else host


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


class BodyReader:
    """A streamed response body, read straight off the backend's socket.

    The relay must wake up while the backend is silent (for pings, deadlines and shutdown), so
    reads time out after ``wake`` seconds and a timeout here is just a moment of silence, not
    an error. A backend stream's chunks come one by one and are usually read whole, so after
    a read that emptied the socket the next one waits for data first (app.backend_http
    Connection.recv). A body read to its end gives the connection back to the pool; any other
    end closes it, which tells the backend to stop generating.
    """

    def __init__(self, client: UpstreamClient, response: Response, wake: float) -> None:
        connection = response.connection
        assert connection is not None, "the body of this response was already consumed"
        self.client = client
        self.response = response
        self.connection = connection
        self.framing = BodyFraming(response)
        self.complete = self.framing.complete
        connection.timeout = wake
        self.pending = connection.take_buffer()  # body bytes that came with the head
        self.drained = False  # the last read emptied the socket's buffer

    def read(self) -> bytes | None:
        """The next body bytes; b"" at the end of the body; None after ``wake`` of silence."""
        while not self.complete:
            data, self.pending = (self.pending, b"") if self.pending else (self._recv(), b"")
            if data is None:
                return None
            if not data:
                return self._at_eof()
            body = self._decode(data)
            if body:
                return body
        return b""

    def _recv(self) -> bytes | None:
        try:
            data = self.connection.recv(wait_first=self.drained)
        except TimeoutError:
            return None
        except OSError as exc:
            raise UpstreamError(f"connection to backend {self.client.name} broke: {exc}") from None
        self.drained = len(data) < READ_SIZE
        return data

    def _decode(self, data: bytes) -> bytes:
        try:
            body = self.framing.feed(data)
        except ProtocolFailure as exc:
            raise UpstreamError(f"backend {self.client.name} sent a bad body: {exc}") from None
        self.complete = self.framing.complete
        return body

    def _at_eof(self) -> bytes:
        try:
            self.framing.end()
        except ProtocolFailure:
            message = f"backend {self.client.name} closed the stream before the answer was complete"
            raise UpstreamError(message) from None
        self.complete = True
        return b""

    def drain(self, seconds: float) -> None:
        """After [DONE]: read to the body's end (normally already here) so it can be reused."""
        self.connection.timeout = seconds
        try:
            while self.read():
                pass
        except GatewayError:
            pass

    def close(self) -> None:
        if self.complete:
            self.response.release()  # pooled again unless the body was close-delimited
        else:
            self.response.close()
