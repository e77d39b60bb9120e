"""Reading a request body: bounded in size and in time, every failure a 4xx.

The body is read straight from the server's input stream (werkzeug's wrapper cost more, and
let a chunked body past the size limit through cut short, so that it failed as invalid JSON
instead of as too large). What can go wrong, and what the client gets:

- larger than ``max_body_bytes``: 413 ``request_too_large``, the rest left unread;
- shorter than its Content-Length, or chunked framing gunicorn cannot follow (a bare LF, a
  negative size, data longer than declared): 400 ``invalid_request_error``;
- not arrived within ``body_timeout`` (a stalled upload): 408.

In each case the body is left unread, and app.serving.web closes the connection after the
answer instead of letting gunicorn read and discard the rest.
"""

from __future__ import annotations

from typing import Any

from app import jsonc
from app.errors import GatewayError, InvalidRequest, RequestTooLarge
from app.serving.green import deadline

READ_STEP = 1 << 16


def read_within(environ: dict[str, Any], limit: int | None, timeout: float) -> bytes:
    """The whole request body, within ``limit`` bytes and ``timeout`` seconds."""
    slow = InvalidRequest(
        f"the request body did not arrive within {timeout:g} s", status=408, should_retry=False
    )
    with deadline(timeout, slow):
        return read_bytes(environ, limit)


def parse_json(data: bytes) -> Any:
    """The request body as JSON, whatever the Content-Type (some clients omit it)."""
    if not data.strip():
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        return jsonc.loads(data)
    except jsonc.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None


def read_bytes(environ: dict[str, Any], limit: int | None) -> bytes:
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH") or ""
    if length.isdigit() and not environ.get("HTTP_TRANSFER_ENCODING"):
        size = int(length)
        if limit is not None and size > limit:
            raise RequestTooLarge("request body is larger than the gateway's limit")
        data = _read(stream, size, size)
        if len(data) < size:
            raise InvalidRequest("the request body ended before its Content-Length")
        return data
    most = (limit + 1) if limit is not None else None  # one byte past the limit tells
    data = _read(stream, most, READ_STEP)
    if limit is not None and len(data) > limit:
        raise RequestTooLarge("request body is larger than the gateway's limit")
    return data


def _read(stream: Any, most: int | None, step: int) -> bytes:
    """Up to ``most`` bytes of ``stream`` (all of it for None), fewer at its end."""
    parts: list[bytes] = []
    total = 0
    while most is None or total < most:
        try:
            piece = stream.read(step if most is None else min(step, most - total))
        except GatewayError:
            raise
        except Exception as exc:  # gunicorn's chunked-framing errors, a reset connection
            raise InvalidRequest(f"the request body could not be read: {exc}") from None
        if not piece:
            break
        parts.append(piece)
        total += len(piece)
    return parts[0] if len(parts) == 1 else b"".join(parts)
