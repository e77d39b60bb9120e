"""The client for one backend: what the gateway asks of it, and every failure as a gateway error.

Backends speak OpenAI Chat Completions or, for ``protocol = "anthropic"``, the Messages API
itself (recent vLLM, SGLang, llama.cpp and Ollama can), in which case bodies pass through. The
HTTP goes straight to the backend's own adapter (app.backends.session's ``Transport``), not
through the session's ``request``; nothing above this module sees a requests or urllib3
exception, a status it cannot use, or a body without bounds:

- a status under 200 (``101 Switching Protocols``, ``103 Early Hints``) or a redirect is a 502
  naming the backend, and its connection is closed, never pooled;
- a whole body is read up to ``max_response_bytes`` after decompression, which urllib3 does
  incrementally, so a small gzip bomb stops at the cap instead of filling the worker's memory;
- a streamed body is read as it arrives (requests' ``iter_content``), a piece of at most
  ``READ_SIZE`` bytes at a time, and closed on every path by the relay.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3.exceptions
from requests.models import PreparedRequest
from requests.utils import check_header_validity

from app import jsonc
from app.backends.session import ClosedWhileIdle, Template, Transport
from app.config import Upstream
from app.errors import GatewayError, InvalidRequest, UpstreamError, UpstreamTimeout
from app.translate.redact import redact
from app.translate.upstream_errors import PromptCounter, error_from_status

log = logging.getLogger("gateway")

READ_SIZE = 65536
ERROR_BODY_LIMIT = 65536
READY_TIMEOUT = 2.0
# What vLLM's /tokenize takes beside the messages that changes how they are rendered.
VLLM_TEMPLATE_FIELDS = ("add_generation_prompt", "continue_final_message", "chat_template_kwargs")
# Client headers an Anthropic-speaking backend should see as the client sent them.
ANTHROPIC_HEADERS = ("anthropic-version", "anthropic-beta")
# Betas the gateway serves itself (app/policy/threads.py): a backend must not see them, or it
# would look for threads of its own.
SERVED_BETAS = ("message-threads-",)
# What iterating or reading a streamed body can raise, from requests (iter_content) or from
# urllib3 (read1).
BODY_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)


class BackendClient:
    """Calls one backend; returns parsed bodies, or open responses for the caller to close."""

    def __init__(self, config: Upstream, transport: Transport) -> None:
        self.config = config
        self.transport = transport
        self.name = display_name(config.url)
        self.stream_usage = config.dialect.stream_usage
        self.echoes_request_ids = False  # learnt from the answers: see _check_echo
        self.first_byte_timeout = config.timeouts.first_byte
        self.idle_timeout = config.timeouts.between_chunks
        # No compression asked for: on a stream a decompressor holds bytes back, and a JSON
        # answer is small and on loopback or a LAN. (One sent anyway is decoded, bounded.)
        base = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Accept-Encoding": "identity",
        }
        if config.protocol == "anthropic":
            endpoint = config.url + "/messages"
            base["anthropic-version"] = "2023-06-01"
            if config.api_key:
                base["x-api-key"] = config.api_key
        else:
            endpoint = config.url + "/chat/completions"
            if config.api_key:
                base["Authorization"] = f"Bearer {config.api_key}"
        self.headers = {**base, **config.headers}
        self.json_request = transport.prepare(endpoint, self.headers)
        self.stream_request = transport.prepare(
            endpoint, {**self.headers, "Accept": "text/event-stream"}
        )
        self.root = config.url.removesuffix("/v1")
        get_headers = {k: v for k, v in self.headers.items() if k != "Content-Type"}
        self.list_request = transport.prepare(config.url + "/models", get_headers, "GET")

    # --- OpenAI Chat Completions ---------------------------------------------------------------

    def complete(
        self, payload: dict[str, Any], request_id: str, *, trace: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """A non-streamed completion, parsed; raises GatewayError on any failure. ``trace``:
        the attempt's trace context headers (``traceparent``), when tracing is on."""
        response = self._post(self.json_request, payload, request_id, extra=trace)
        return self.read_json(response)

    def open_stream(
        self, payload: dict[str, Any], request_id: str, *, trace: Mapping[str, str] | None = None
    ) -> requests.Response:
        """Start a streamed completion and return once the backend has answered 2xx.

        Waiting for the status before the first byte goes to the client keeps a backend error
        a real HTTP error that SDKs can retry. Backends that refuse ``stream_options`` get the
        request again without it, and are not asked again by this worker.
        """
        payload["stream"] = True
        if self.stream_usage:
            payload["stream_options"] = {"include_usage": True}
        try:
            return self._post(self.stream_request, payload, request_id, extra=trace)
        except _StreamOptionsRejected:
            log.warning("backend %s rejects stream_options; retrying without it", self.name)
            self.stream_usage = False
            payload.pop("stream_options", None)
            return self._post(self.stream_request, payload, request_id, extra=trace)

    # --- Anthropic Messages, passed through ----------------------------------------------------

    def messages(
        self,
        body: dict[str, Any],
        request_id: str,
        client_headers: Mapping[str, str],
        *,
        trace: Mapping[str, str] | None = None,
    ) -> dict[str, Any] | requests.Response:
        """POST the client's body to an Anthropic-speaking backend: a message, or an open stream."""
        extra = {h: client_headers[h] for h in ANTHROPIC_HEADERS if h in client_headers}
        if "anthropic-beta" in extra:
            betas = _without_served_betas(extra["anthropic-beta"])
            if betas:
                extra["anthropic-beta"] = betas
            else:
                del extra["anthropic-beta"]
        for item in extra.items():
            try:
                check_header_validity(item)
            except requests.exceptions.InvalidHeader:
                raise InvalidRequest(f"{item[0]}: not a valid header value") from None
        if trace:
            extra.update(trace)
        stream = bool(body.get("stream"))
        template = self.stream_request if stream else self.json_request
        response = self._post(template, body, request_id, extra=extra)
        return response if stream else self.read_json(response)

    # --- tokenizer and model list --------------------------------------------------------------

    def count_tokens(self, payload: dict[str, Any], request_id: str) -> int | None:
        """The prompt's exact token count from the backend's tokenizer endpoint, if it has one.

        vLLM's ``/tokenize`` takes chat messages; llama.cpp needs ``/apply-template`` first;
        an Anthropic-speaking backend has ``/messages/count_tokens``. Any failure returns None:
        the caller falls back to an estimate.
        """
        tokenizer = self.config.dialect.tokenizer
        request: dict[str, Any] = {
            k: payload[k] for k in ("model", "messages", "tools") if k in payload
        }
        try:
            if self.config.protocol == "anthropic":
                counted = self._call(
                    self.config.url + "/messages/count_tokens", payload, request_id
                )
                return int(counted["input_tokens"])
            if tokenizer == "vllm":
                # Rendered as the request is: a prefill continued, not closed and followed by
                # a new assistant turn, and the template's switches (thinking) the same.
                request.update({k: payload[k] for k in VLLM_TEMPLATE_FIELDS if k in payload})
                return int(self._call(self.root + "/tokenize", request, request_id)["count"])
            if tokenizer == "llamacpp":
                applied = self._call(self.root + "/apply-template", request, request_id)
                content = {"content": applied["prompt"]}
                return len(self._call(self.root + "/tokenize", content, request_id)["tokens"])
        except (GatewayError, ValueError, KeyError, TypeError) as exc:
            log.warning("backend %s tokenizer failed (%s); estimating", self.name, _short(str(exc)))
        return None

    def models(self) -> list[dict[str, Any]]:
        """The backend's own ``GET /models`` list (OpenAI's shape: ``{"data": [{"id"…}]}``)."""
        response = self._send(self.list_request, None, None, read_timeout=READY_TIMEOUT)
        listed = self.read_json(response, limit=1 << 20)
        data = listed.get("data") if isinstance(listed, dict) else None
        return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []

    def ready(self) -> bool:
        """The backend answers HTTP through the configured TLS and proxy settings: any status
        below 500 (a 401 or 404 says the server is up; a 503 says it is still loading)."""
        try:
            response = self._transmit(self.list_request.request(None), READY_TIMEOUT)
        except BODY_ERRORS:
            return False
        response.close()
        return 200 <= response.status_code < 500

    def _call(self, url: str, body: dict[str, Any], request_id: str) -> Any:
        template = self.transport.prepare(url, self.headers)
        read_timeout = min(self.config.timeouts.read, 30.0)
        response = self._send(template, body, request_id, read_timeout=read_timeout)
        return self.read_json(response, limit=16 << 20)

    def close(self) -> None:
        self.transport.adapter.close()

    # --- reading ---------------------------------------------------------------------------------

    def read_body(self, response: requests.Response, limit: int | None = None) -> bytes:
        """A whole response body, decompressed, up to ``limit`` (``max_response_bytes``)."""
        limit = limit or self.config.max_response_bytes
        headers = response.headers
        length = headers.get("content-length", "")
        if length.isdigit():
            if int(length) > limit:
                response.close()
                raise self._too_large(limit)
            if "content-encoding" not in headers:  # the usual answer: its size is known
                return self._read_sized(response)
        parts: list[bytes] = []
        size = 0
        try:
            for piece in response.iter_content(READ_SIZE):
                size += len(piece)
                if size > limit:
                    raise self._too_large(limit)
                parts.append(piece)
        except BODY_ERRORS as exc:
            raise self.transport_error(exc) from None
        finally:
            response.close()  # pooled again if the body was read to its end, else closed
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _read_sized(self, response: requests.Response) -> bytes:
        """A body of a known length within the cap, read in one call."""
        try:
            return response.raw.read()
        except BODY_ERRORS as exc:
            raise self.transport_error(exc) from None
        finally:
            response.close()

    def read_json(self, response: requests.Response, limit: int | None = None) -> Any:
        body = self.read_body(response, limit)
        try:
            return jsonc.loads(body.strip())
        except jsonc.JSONDecodeError:
            excerpt = _short(body[:200].decode("utf-8", "replace"))
            message = f"backend {self.name} returned invalid JSON: {excerpt}"
            raise UpstreamError(message, backend_fault=True) from None

    def chunks(self, response: requests.Response) -> Iterator[bytes]:
        """A streamed body as it arrives: requests' ``iter_content`` yields each chunk of a
        chunked body as it comes; a body without chunked framing (close-delimited) is read
        with urllib3's ``read1``, because ``iter_content`` waits for whole pieces of its size
        there and would hold events back."""
        if response.raw.chunked:
            return response.iter_content(READ_SIZE)
        return iter(partial(response.raw.read1, READ_SIZE, decode_content=True), b"")

    def _too_large(self, limit: int) -> UpstreamError:
        message = f"backend {self.name} sent a body larger than {limit} bytes"
        return UpstreamError(message, backend_fault=True)

    # --- sending ---------------------------------------------------------------------------------

    def _post(
        self,
        template: Template,
        payload: dict[str, Any],
        request_id: str,
        *,
        extra: Mapping[str, str] | None = None,
    ) -> requests.Response:
        return self._send(
            template,
            payload,
            request_id,
            read_timeout=self.first_byte_timeout,
            extra=extra,
            count_prompt=self._prompt_counter(payload, request_id),
        )

    def _prompt_counter(self, payload: dict[str, Any], request_id: str) -> PromptCounter | None:
        """How an overflow's error learns the prompt's exact size when the backend gives only
        a floor (vLLM's "at least N"): its tokenizer, asked then. Not for an Anthropic-speaking
        backend: vLLM's own /v1/messages/count_tokens stops at the window as its answer does,
        and its /tokenize takes OpenAI's messages, which the passthrough never builds."""
        if self.config.protocol == "anthropic" or not self.config.dialect.tokenizer:
            return None
        return lambda: self.count_tokens(payload, request_id)

    def _send(
        self,
        template: Template,
        payload: dict[str, Any] | None,
        request_id: str | None,
        *,
        read_timeout: float,
        extra: Mapping[str, str] | None = None,
        count_prompt: PromptCounter | None = None,
    ) -> requests.Response:
        """One request, answered 2xx, its body still to read (the caller reads it whole, or
        streams it); any other answer raises its gateway error (``count_prompt``: see
        ``overflow_message``)."""
        headers = dict(extra or {})
        if request_id:  # ours, or checked against a strict pattern (app.ops.access_log)
            headers["X-Request-ID"] = request_id
        body = None if payload is None else jsonc.dumps(payload)
        try:
            response = self._transmit(template.request(body, headers), read_timeout)
        except BODY_ERRORS as exc:
            raise self.transport_error(exc) from None
        _check_framing(response, self.name)
        if request_id:
            self._check_echo(response, request_id)
        status = response.status_code
        if 200 <= status < 300:
            return response
        raise self._status_error(response, payload, count_prompt)

    def _transmit(self, request: PreparedRequest, read_timeout: float) -> requests.Response:
        """Send ``request``; once more when it met the keep-alive race, which the backend
        never read (app.backends.session.KeptAliveConnection). urllib3 leaves an empty place
        in the pool for the closed connection, so the second sending opens a new one."""
        try:
            return self.transport.send(request, stream=True, read_timeout=read_timeout)
        except requests.ConnectionError as exc:
            if not _has(exc, ClosedWhileIdle):
                raise
        log.info(
            "backend %s closed a kept-alive connection as a request went out on it; "
            "sent again on a new one",
            self.name,
        )
        return self.transport.send(request, stream=True, read_timeout=read_timeout)

    def _check_echo(self, response: requests.Response, request_id: str) -> None:
        """Refuse an answer that names another request. HTTP/1.1 cannot tell by itself: a
        second, unrequested response that a backend writes onto a kept-alive connection
        after the next request went out on it reads as that request's answer. A backend
        that has echoed our ``X-Request-ID`` once (vLLM with ``--enable-request-id-headers``,
        most proxies) has shown that an id it sends is ours; from then on an answer naming
        another id was written for someone else, and its connection is closed. An answer
        naming none is served: the echo is no promise (vLLM restarted without the flag, a
        load balancer over replicas set up apart), and its absence says nothing about whose
        answer this is. (Backends that set ids of their own, as OpenAI's API does, never
        echo ours, so they are never checked.)"""
        echoed = response.headers.get("x-request-id")
        if echoed == request_id:
            self.echoes_request_ids = True
            return
        if echoed is None or not self.echoes_request_ids:
            return
        response.close()
        log.warning("backend %s answered with another request's X-Request-ID", self.name)
        raise UpstreamError(
            f"backend {self.name} sent an answer to another request; its connection is closed",
            status=502,
            retryable=True,
            backend_fault=True,
        )

    def _status_error(
        self,
        response: requests.Response,
        payload: dict[str, Any] | None,
        count_prompt: PromptCounter | None = None,
    ) -> Exception:
        status = response.status_code
        if status < 200 or 300 <= status < 400:
            response.close()  # the connection speaks something else now, or nothing useful
            return self._not_an_answer(response)
        try:  # bounded: an error body has no business being large
            body = response.raw.read(ERROR_BODY_LIMIT, decode_content=True)
        except BODY_ERRORS:  # a broken error body still leaves the status to report
            body = b""
        response.close()
        if status in (400, 422) and payload and "stream_options" in payload:
            if b"stream_options" in body:
                return _StreamOptionsRejected()
        return error_from_status(
            status, body, response.headers, self.name, self.config.dialect.name, count_prompt
        )

    def _not_an_answer(self, response: requests.Response) -> GatewayError:
        """A 1xx the HTTP layer did not skip, or a redirect: the backend's URL is wrong (or it
        is not an HTTP API), which is the operator's to fix, so the client gets a 502."""
        status = response.status_code
        if status < 200:
            what = f"HTTP {status} {response.reason or ''}".strip() + ", not a final answer"
        else:
            location = urlsplit(response.headers.get("location", ""))
            where = (
                f" to {location.scheme}://{location.netloc}{location.path}"
                if location.netloc
                else ""
            )
            log.warning("backend %s redirects (HTTP %d%s); fix its url", self.name, status, where)
            what = f"a redirect (HTTP {status}); the gateway follows none"
        message = f"backend {self.name} answered with {what}"
        return UpstreamError(message, status=502, retryable=True, backend_fault=True)

    def transport_error(self, exc: BaseException) -> GatewayError:
        """The gateway error for a failure below HTTP. A connection never made is retryable
        and never reached the backend; a timeout after the request went out is not retried,
        because the backend may still be working on it."""
        cause = _cause(exc)
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            message = f"timed out connecting to backend {self.name}"
            return UpstreamTimeout(message, retryable=True, reached=False, backend_fault=True)
        if _has(exc, requests.exceptions.ProxyError, urllib3.exceptions.ProxyError):
            message = f"the proxy to backend {self.name} failed: {_short(str(cause))}"
            return UpstreamError(
                message, status=502, retryable=True, reached=False, backend_fault=True
            )
        if _has(exc, ssl.SSLError, urllib3.exceptions.SSLError):
            message = f"TLS with backend {self.name} failed: {_short(str(cause))}"
            return UpstreamError(
                message, status=502, retryable=True, reached=False, backend_fault=True
            )
        # (urllib3's NewConnectionError is a kind of its TimeoutError: asked before it.)
        if _has(exc, urllib3.exceptions.NewConnectionError, ConnectionRefusedError):
            refused = _has(exc, ConnectionRefusedError)
            reason = "connection refused" if refused else _short(str(cause))
            message = f"cannot connect to backend {self.name}: {reason}"
            return UpstreamError(
                message, status=502, retryable=True, reached=False, backend_fault=True
            )
        if _has(exc, TimeoutError, urllib3.exceptions.TimeoutError):
            message = f"backend {self.name} did not answer in time"
            return UpstreamTimeout(message, backend_fault=True)
        message = f"connection to backend {self.name} failed: {_short(str(cause))}"
        return UpstreamError(message, status=502, retryable=True, backend_fault=True)


def _check_framing(response: requests.Response, name: str) -> None:
    """A body whose end cannot be told is refused, and its connection closed: a
    Content-Length that is not a number (urllib3 would read to the connection's end, which a
    keep-alive backend never closes) or one beside chunked framing (RFC 9112 section 6.3:
    "ought to be handled as an error")."""
    length = response.headers.get("content-length")
    if length is None:
        return
    values = {v.strip() for v in length.split(",")}
    if len(values) == 1 and values.pop().isdigit() and not response.raw.chunked:
        return
    response.close()
    message = f"backend {name} sent a body with invalid framing"
    raise UpstreamError(message, status=502, retryable=True, backend_fault=True)


class _StreamOptionsRejected(Exception):
    """The backend refused ``stream_options``: retry once without it."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what caused it, through requests' and urllib3's wrappers (which keep the
    cause as an argument, or as ``reason``), innermost last."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        inner = [a for a in current.args if isinstance(a, BaseException)]
        reason = getattr(current, "reason", None)
        if inner:
            current = inner[0]
        elif isinstance(reason, BaseException):
            current = reason
        else:
            current = current.__cause__ or current.__context__


def _cause(exc: BaseException) -> BaseException:
    """The innermost error: what a message should name."""
    return list(_chain(exc))[-1]


def _has(exc: BaseException, *kinds: type[BaseException]) -> bool:
    return any(isinstance(e, kinds) for e in _chain(exc))


def display_name(url: str) -> str:
    """host:port of the backend for messages, without any credentials in the URL."""
    parts = urlsplit(url)
    host = parts.hostname or url
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{parts.port}" if parts.port else host


def _short(text: str, limit: int = 200) -> str:
    """Text from below HTTP (urllib3, the TLS library, a proxy) as a message may quote it."""
    text = redact(text)
    return text if len(text) <= limit else text[:limit] + "…"


def _without_served_betas(value: str) -> str:
    kept = (beta.strip() for beta in value.split(","))
    return ",".join(beta for beta in kept if beta and not beta.startswith(SERVED_BETAS))
