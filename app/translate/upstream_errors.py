"""Backend failures -> gateway errors with Anthropic types and statuses (pure).

Backends word their errors in several shapes (OpenAI ``{"error": {...}}``, older vLLM's flat
``{"object": "error"}``, FastAPI ``{"detail": ...}``, HTML from a proxy); the client always gets
one Anthropic envelope, with the backend's own message kept so the cause stays visible.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app import jsonc
from app.errors import (
    AuthenticationFailed,
    BillingError,
    GatewayError,
    InvalidRequest,
    NotFound,
    Overloaded,
    PermissionDenied,
    RateLimited,
    RequestTooLarge,
    UpstreamError,
    UpstreamTimeout,
)
from app.translate.redact import redact

CONTEXT_OVERFLOW_MARKERS = (
    "context_length_exceeded",
    "maximum context length",
    "exceed_context_size",
    "exceeds the available context size",
    "context window",
    "too many tokens",
    "prompt is too long",
)
RETRY_HEADERS = ("retry-after", "retry-after-ms")
EXCERPT_CHARS = 300

# Server errors (5xx) whose text says the request itself is at fault: the backend can serve,
# just not this. llama.cpp answers many of these with a 500 (it throws from parameter
# parsing: "tools param requires --jinja flag", "image input is not supported", "Cannot use
# tools with stream", "Unsupported param: tool_choice", "Failed to parse messages"); vLLM and
# SGLang answer a feature they lack with a 500 from NotImplementedError.
CLIENT_FAULT_MARKERS = (
    "not supported",
    "unsupported",
    "is not allowed",
    "requires --jinja",
    "cannot use tools",
    "failed to parse",
    "must be provided",
    "only one completion choice",
)
DIALECT_CLIENT_FAULT_MARKERS: dict[str, tuple[str, ...]] = {
    "llamacpp": ("is required", "invalid type", "expected a", "content part type"),
    "vllm": ("notimplementederror", "not implemented", "is not a valid"),
    "sglang": ("notimplementederror", "not implemented", "is not a valid"),
}


def error_from_status(
    status: int, body: bytes, headers: Mapping[str, str], backend: str, dialect: str = ""
) -> GatewayError:
    """The gateway error for a non-2xx backend answer, marked with what the dispatcher
    needs: whether another backend may cure it (``retryable``: 429, 503, server errors) and
    whether it says this backend cannot serve (``backend_fault``: server errors and timeouts,
    never a 429, a 503 or a 4xx)."""
    detail, code = _message(body)
    if status >= 500 and status not in (503, 504, 529) and _client_fault(detail, code, dialect):
        status = 400  # llama.cpp's 500 for "image input is not supported", and the like
    error = _classify(status, detail, code, headers, backend)
    error.retryable = status in (429, 503, 529) or status >= 500
    error.backend_fault = status >= 500 and status not in (503, 529)
    return error


def _client_fault(detail: str, code: str, dialect: str) -> bool:
    text = f"{detail} {code}".lower()
    markers = CLIENT_FAULT_MARKERS + DIALECT_CLIENT_FAULT_MARKERS.get(dialect, ())
    overflow = any(m in text for m in CONTEXT_OVERFLOW_MARKERS)
    return overflow or any(m in text for m in markers)


def _classify(
    status: int, detail: str, code: str, headers: Mapping[str, str], backend: str
) -> GatewayError:
    kept = {h: headers[h] for h in RETRY_HEADERS if h in headers}
    prefix = f"backend {backend} returned HTTP {status}"
    if status in (400, 422):
        if any(m in f"{detail} {code}".lower() for m in CONTEXT_OVERFLOW_MARKERS):
            return InvalidRequest(f"prompt is too long: {detail}")
        return InvalidRequest(detail or prefix)
    if status == 401:
        return AuthenticationFailed(f"{prefix}: the backend rejected the gateway's credentials")
    if status == 403:
        return PermissionDenied(f"{prefix}: {detail or 'forbidden'}")
    if status == 402:
        return BillingError(f"{prefix}: {detail or 'payment required'}")
    if status == 404:
        return NotFound(f"{prefix}: {detail or 'not found'}")
    if status == 413:
        return RequestTooLarge(f"{prefix}: {detail or 'request too large'}")
    if status == 429:
        return RateLimited(f"{prefix}: {detail or 'rate limited'}", headers=kept)
    if status in (408, 504):
        return UpstreamTimeout(f"{prefix}: {detail or 'timed out'}")
    if status in (503, 529):
        return Overloaded(f"{prefix}: {detail or 'overloaded'}", headers=kept)
    if status >= 500:
        return UpstreamError(f"{prefix}: {detail or 'server error'}")
    return InvalidRequest(f"{prefix}: {detail}" if detail else prefix)


def error_from_body(obj: Mapping[str, Any]) -> GatewayError:
    """The gateway error for an error object inside a 200 answer or a stream; only a
    server-side failure counts against the backend."""
    error = obj.get("error")
    message = _from_object(obj) or "backend reported an error"
    code = error.get("code") if isinstance(error, dict) else obj.get("code")
    kind = error.get("type") if isinstance(error, dict) else obj.get("type")
    text = f"{message} {code} {kind}".lower()
    if str(code) in ("503", "529") or "overload" in text:
        return Overloaded(message)
    if str(code) == "429" or "rate limit" in text:
        return RateLimited(message)
    if str(code) in ("408", "504") or "timeout" in text or "timed out" in text:
        return UpstreamTimeout(message, backend_fault=True)
    return UpstreamError(message, backend_fault=True)


def _message(body: bytes) -> tuple[str, str]:
    """The backend's error message, and its error code and type (for classification)."""
    try:
        obj = jsonc.loads(body.strip() or b"null")
    except jsonc.JSONDecodeError:
        return _excerpt(body.decode("utf-8", "replace")), ""
    if isinstance(obj, dict):
        error = obj.get("error")
        labels = [error.get("code"), error.get("type")] if isinstance(error, dict) else []
        return _from_object(obj), " ".join(str(x) for x in labels if x)
    return (_excerpt(str(obj)) if obj is not None else ""), ""


def _from_object(obj: Mapping[str, Any]) -> str:
    error = obj.get("error")
    if isinstance(error, dict) and error.get("message"):
        return _excerpt(str(error["message"]))
    if isinstance(error, str) and error:
        return _excerpt(error)
    for key in ("message", "detail"):
        if obj.get(key):
            value = obj[key]
            return _excerpt(value if isinstance(value, str) else jsonc.dumps_str(value))
    return ""


def _excerpt(text: str) -> str:
    """Backend text as a message may quote it: one line, bounded, without secrets."""
    text = redact(" ".join(text.split()))
    return text if len(text) <= EXCERPT_CHARS else text[:EXCERPT_CHARS] + "…"
