"""Gateway errors, each carrying the Anthropic error type and HTTP status it is sent as.

Every failure a client can see is one of these, so that the web layer has one way of turning a
failure into the Anthropic envelope, whether as an HTTP response or, once a stream has started,
as an in-band SSE ``error`` event. This module is pure (no Flask, no network).

    GatewayError                 500 api_error
    ├── InvalidRequest           400 invalid_request_error
    ├── AuthenticationFailed     401 authentication_error
    ├── BillingError             402 billing_error
    ├── PermissionDenied         403 permission_error
    ├── NotFound                 404 not_found_error
    ├── MethodNotAllowed         405 invalid_request_error
    ├── RequestTooLarge          413 request_too_large
    ├── RateLimited              429 rate_limit_error
    ├── UpstreamError            500 api_error (502 when the backend cannot be reached)
    ├── UpstreamTimeout          504 timeout_error
    └── Overloaded               529 overloaded_error
"""

from __future__ import annotations

from typing import Any

from app.translate.anthropic_types import ErrorEvent, ErrorType


class GatewayError(Exception):
    """Base: an error that has an Anthropic ``error.type`` and an HTTP status."""

    status = 500
    error_type: ErrorType = "api_error"
    # A backend failure another attempt may cure (connection errors, 429, 5xx); the
    # dispatcher retries or fails over only these, and only before any byte was relayed.
    retryable = False
    # Whether the backend may have received the request: False only when it provably did
    # not (no connection was made), which is when trying the same backend again is safe.
    reached = True
    # The failure says the backend cannot serve (no connection, no answer in time, a server
    # error not about the request): only these count against its circuit breaker.
    backend_fault = False
    # Set by the dispatcher on the error it gives up with: the last backend asked, and how
    # many attempts were made (for the access log).
    backend: str | None = None
    attempts = 0

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        should_retry: bool | None = None,
        retryable: bool | None = None,
        reached: bool | None = None,
        backend_fault: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if retryable is not None:
            self.retryable = retryable
        if reached is not None:
            self.reached = reached
        if backend_fault is not None:
            self.backend_fault = backend_fault
        self.headers = dict(headers or {})
        if should_retry is not None:
            # The SDKs obey x-should-retry before their own status rules.
            self.headers["x-should-retry"] = "true" if should_retry else "false"

    def payload(self, request_id: str | None = None) -> ErrorEvent:
        """The Anthropic error envelope, as an HTTP body or an SSE ``error`` event."""
        body: ErrorEvent = {
            "type": "error",
            "error": {"type": self.error_type, "message": self.message},
        }
        if request_id:
            body["request_id"] = request_id
        return body


class InvalidRequest(GatewayError):
    status = 400
    error_type = "invalid_request_error"


class AuthenticationFailed(GatewayError):
    status = 401
    error_type = "authentication_error"


class BillingError(GatewayError):
    status = 402
    error_type = "billing_error"


class PermissionDenied(GatewayError):
    status = 403
    error_type = "permission_error"


class NotFound(GatewayError):
    status = 404
    error_type = "not_found_error"


class MethodNotAllowed(GatewayError):
    status = 405
    error_type = "invalid_request_error"


class RequestTooLarge(GatewayError):
    status = 413
    error_type = "request_too_large"


class RateLimited(GatewayError):
    status = 429
    error_type = "rate_limit_error"


class UpstreamError(GatewayError):
    status = 500
    error_type: ErrorType = "api_error"


class UpstreamTimeout(GatewayError):
    status = 504
    error_type = "timeout_error"


class Overloaded(GatewayError):
    status = 529
    error_type = "overloaded_error"


def field_error(path: str, problem: str) -> InvalidRequest:
    """An invalid_request_error that names the offending field, as the real API does."""
    return InvalidRequest(f"{path}: {problem}")


def shown(value: Any, limit: int = 60) -> str:
    """A client's value as an error message may quote it: short, and never walked into (a
    value can be any JSON, nested a hundred levels deep or a megabyte long)."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
