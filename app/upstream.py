"""The HTTP client for one backend: a urllib3 connection pool per backend per worker.

It owns transport policy (pool size, timeouts, proxies from the environment when asked) and
turns every transport failure into a gateway error that names the backend, so nothing above it
sees a urllib3 exception. Built per worker process, after gevent has patched the socket module.

urllib3 is used directly, not through ``requests`` (which is built on it): measured on this
gateway, ``Session.request`` (settings merging, request preparation, hooks, cookies, the
``Response`` wrapper) was half of the worker's CPU per request, and none of it is needed to
POST JSON to one known host.
Backends speak either OpenAI Chat Completions or, for ``protocol = "anthropic"``, the Messages
API itself (recent vLLM, SGLang, llama.cpp and Ollama can), in which case bodies pass through.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import urllib3
from urllib3 import HTTPResponse
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ReadTimeoutError,
)

from app import jsonc
from app.config import Upstream
from app.errors import GatewayError, UpstreamError, UpstreamTimeout
from app.http_body import ChunkedDecoder, FramingError
from app.translate.upstream_errors import error_from_status

log = logging.getLogger("gateway")

READ_SIZE = 65536
ERROR_BODY_LIMIT = 65536
# Client headers an Anthropic-speaking backend should see as the client sent them.
ANTHROPIC_HEADERS = ("anthropic-version", "anthropic-beta")


class UpstreamClient:
    """Calls one backend; returns parsed bodies, or open responses for the caller to close."""

    def __init__(self, config: Upstream, pool_size: int) -> None:
        self.config = config
        self.name = _display_name(config.url)
        self.stream_usage = config.dialect.stream_usage
        self.manager = _pool_manager(config, pool_size)
        # The backend's connection pool, looked up once: PoolManager.urlopen would parse the
        # URL and find the pool again on every request.
        self.pool = self.manager.connection_from_url(config.url)
        self.proxied = isinstance(self.manager, urllib3.ProxyManager)
        self.timeout = urllib3.Timeout(
            connect=config.connect_timeout, read=_first_byte_timeout(config)
        )
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
        self.headers = {**base, **config.headers}
        # No compression on streams: a decompressor would hold back bytes.
        self.stream_headers = {
            **self.headers,
            "Accept": "text/event-stream",
            "Accept-Encoding": "identity",
        }

    # --- OpenAI Chat Completions ---------------------------------------------------------------

    def complete(self, payload: dict[str, Any], request_id: str) -> dict[str, Any]:
        """A non-streamed completion, parsed; raises GatewayError on any failure."""
        return self._read_json(self._post(payload, request_id, stream=False))

    def open_stream(self, payload: dict[str, Any], request_id: str) -> HTTPResponse:
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
    ) -> dict[str, Any] | HTTPResponse:
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
        except (HTTPError, OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("backend %s tokenizer failed (%s); estimating", self.name, _short(str(exc)))
        return None

    def _call(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
        timeout = urllib3.Timeout(
            connect=self.config.connect_timeout, read=min(self.config.read_timeout, 30.0)
        )
        response = self.manager.request(
            "POST", url, body=jsonc.dumps(body), headers=headers, timeout=timeout, retries=False
        )
        if response.status >= 300:
            raise ValueError(f"HTTP {response.status}")
        return jsonc.loads(response.data)

    def close(self) -> None:
        self.manager.clear()

    # --- reading ---------------------------------------------------------------------------------

    def _read_json(self, response: HTTPResponse) -> dict[str, Any]:
        body = response.data  # read in full by urlopen, connection already back in the pool
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
    ) -> HTTPResponse:
        headers = self.stream_headers if stream else self.headers
        # Through a proxy, only the manager knows to send the absolute URL.
        opener, target = (self.manager, self.url) if self.proxied else (self.pool, self.path)
        try:
            response = opener.urlopen(
                "POST",
                target,
                body=jsonc.dumps(payload),
                headers={**headers, **(extra or {}), "X-Request-ID": request_id},
                timeout=self.timeout,
                retries=False,
                redirect=False,
                preload_content=not stream,
                decode_content=not stream,
            )
        except (HTTPError, OSError) as exc:
            raise self._transport_error(exc) from None
        if response.status < 300:
            return response
        raise self._status_error(response, payload, stream)

    def _status_error(
        self, response: HTTPResponse, payload: dict[str, Any], stream: bool
    ) -> Exception:
        try:
            if stream:  # bounded: an error body has no business being large
                body = response.read(ERROR_BODY_LIMIT, decode_content=True) or b""
            else:
                body = response.data or b""
        except Exception:  # a broken error body still leaves the status to report
            body = b""
        finally:
            if stream:
                response.close()
        if (
            response.status in (400, 422)
            and "stream_options" in payload
            and b"stream_options" in body
        ):
            return _StreamOptionsRejected()
        return error_from_status(response.status, body, response.headers, self.name)

    def _transport_error(self, exc: Exception) -> GatewayError:
        """Connection failures are retryable (nothing was answered); timeouts are not: the
        backend may still be working on the request."""
        text = str(exc)
        # NewConnectionError subclasses ConnectTimeoutError in urllib3 2: test it first.
        if isinstance(exc, NewConnectionError | ConnectionRefusedError):
            if "refused" in text.lower():
                message = f"cannot connect to backend {self.name}: connection refused"
                return UpstreamError(message, status=502, retryable=True)
        elif isinstance(exc, ConnectTimeoutError):
            message = f"timed out connecting to backend {self.name}"
            return UpstreamTimeout(message, retryable=True)
        if isinstance(exc, ReadTimeoutError | TimeoutError) or "timed out" in text.lower():
            return UpstreamTimeout(f"backend {self.name} did not answer in time")
        message = f"connection to backend {self.name} failed: {_short(text)}"
        return UpstreamError(message, status=502, retryable=True)


class _StreamOptionsRejected(Exception):
    """The backend refused ``stream_options``: retry once without it."""


def _first_byte_timeout(config: Upstream) -> float:
    if config.total_timeout:
        return min(config.read_timeout, config.total_timeout)
    return config.read_timeout


def _pool_manager(config: Upstream, pool_size: int) -> urllib3.PoolManager:
    """Pooled connections (kept up to ``pool_size``; more may open under load and are then
    closed); no retries at this level: the dispatcher retries and fails over by policy.

    With ``trust_env`` the environment's proxy settings apply, as they would with curl.
    """
    options: dict[str, Any] = {"num_pools": 4, "maxsize": max(pool_size, 10), "block": False}
    host = urlsplit(config.url).hostname or ""
    proxy = (
        urllib.request.getproxies().get(urlsplit(config.url).scheme) if config.trust_env else None
    )
    if proxy and not urllib.request.proxy_bypass(host):
        return urllib3.ProxyManager(proxy, **options)
    return urllib3.PoolManager(**options)


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

    http.client's file object refuses every read after one socket timeout, so a stream read
    through it cannot wake up for pings, deadlines or shutdown without a helper thread; read
    here, a timeout is just a moment of silence. Whatever http.client had already buffered
    with the headers is taken over first. A body read to its end gives the connection back to
    the pool; any other end closes it, which tells the backend to stop generating.
    """

    def __init__(self, client: UpstreamClient, response: HTTPResponse, wake: float) -> None:
        self.client = client
        self.response = response
        self.sock = _body_socket(response)
        self.chunked = ChunkedDecoder() if response.chunked else None
        self.remaining = response.length_remaining  # Content-Length, or None
        self.complete = False
        self.sock.settimeout(wake)
        self.pending = self._take_buffered()

    def _take_buffered(self) -> bytes:
        """Body bytes http.client read along with the headers (without blocking for more)."""
        buffered = self.response._fp.fp  # type: ignore[union-attr]  # http.client's reader
        timeout = self.sock.gettimeout()
        self.sock.settimeout(0.0)
        try:
            data = buffered.peek(READ_SIZE)
        except OSError:  # nothing there yet (plain EAGAIN is None, TLS raises WantRead)
            data = b""
        finally:
            self.sock.settimeout(timeout)
        return buffered.read(len(data)) if data else b""

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
            return self.sock.recv(READ_SIZE)
        except TimeoutError:
            return None
        except OSError as exc:
            raise UpstreamError(f"connection to backend {self.client.name} broke: {exc}") from None

    def _decode(self, data: bytes) -> bytes:
        if self.chunked is not None:
            try:
                body = self.chunked.feed(data)
            except FramingError as exc:
                raise UpstreamError(f"backend {self.client.name} sent a bad body: {exc}") from None
            self.complete = self.chunked.done
            return body
        if self.remaining is not None:
            data = data[: self.remaining]
            self.remaining -= len(data)
            self.complete = self.remaining == 0
        return data

    def _at_eof(self) -> bytes:
        if self.chunked is not None or self.remaining:
            message = f"backend {self.client.name} closed the stream before the answer was complete"
            raise UpstreamError(message)
        self.complete = True  # a close-delimited body ends with the connection
        return b""

    def drain(self, seconds: float) -> None:
        """After [DONE]: read to the body's end (normally already here) so it can be reused."""
        self.sock.settimeout(seconds)
        try:
            while self.read():
                pass
        except GatewayError:
            pass

    def close(self) -> None:
        reusable = self.complete and (self.chunked is not None or self.remaining == 0)
        if reusable:
            self.response._fp.close()  # type: ignore[union-attr]  # done; the socket stays open
            self.response.release_conn()
        else:
            self.response.close()


def _body_socket(response: HTTPResponse) -> Any:
    """The socket the body arrives on. For a response that closes the connection http.client
    has already let go of the connection object, and only its file object holds the socket."""
    connection = response.connection
    if connection is not None and connection.sock is not None:
        return connection.sock
    return response._fp.fp.raw._sock  # type: ignore[union-attr]
