"""Running one batch item: the same request, through the same app, as a client's
``POST /v1/messages``, so its answer is byte for byte what the client would have got (but for
the message id), with the same routing, translation, limits, usage and access line.

The runner calls the gateway's own WSGI app with an environ it builds; the item's key, batch
and backend ride in it under a key no HTTP header can set (app/batches/item.py). What came back
decides what the item becomes:

- 200: ``succeeded``, the message as it is;
- an error a later attempt could cure (the backend busy or failing: 429, 500-504, 529; a
  key's per-minute limit or its requests in flight): tried again later, after a backoff;
- any other error (the request itself, a spent budget, a revoked key): ``errored``, with the
  envelope the client would have got.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from app import ids, jsonc
from app.batches.item import ENVIRON_KEY, BatchItem
from app.serving.state import ENVIRON_KEY as STATE_KEY
from app.serving.state import RequestState

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

AGAIN_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 529})
# Key limits that refuse for a while, not for good (a budget is spent until its period ends).
PASSING_LIMITS = frozenset({"rate_limited", "input_tokens", "output_tokens", "concurrency"})


@dataclass
class Ran:
    status: int
    body: Any  # the parsed JSON answer
    retry_after: float | None  # what the answer's retry-after said
    again: bool  # a later attempt may do better
    limited: bool  # the item's key's limits refused it (the backends were not asked)


def run_item(app: WSGIApp, item: BatchItem, params: bytes) -> Ran:
    environ = _environ(item, params)
    status: list[str] = []
    headers: dict[str, str] = {}

    def start_response(line: str, pairs: list[tuple[str, str]], exc_info: Any = None) -> None:
        status.append(line)
        headers.update((name.lower(), value) for name, value in pairs)

    answer = app(environ, start_response)
    try:
        body = b"".join(answer)
    finally:
        close = getattr(answer, "close", None)
        if close is not None:
            close()
    code = int(status[-1].split(" ", 1)[0])
    parsed = jsonc.loads(body) if body else None
    retry_after = _seconds(headers.get("retry-after"))
    state: RequestState | None = environ.get(STATE_KEY)
    rejected = state.outcome.rejected if state is not None and state.outcome else None
    again = _again(code, rejected, retry_after)
    return Ran(code, parsed, retry_after, again, limited=rejected is not None)


def _environ(item: BatchItem, params: bytes) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/v1/messages",
        "QUERY_STRING": "",
        "SERVER_NAME": "batch",
        "SERVER_PORT": "0",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(params)),
        "HTTP_ANTHROPIC_VERSION": "2023-06-01",
        "HTTP_X_REQUEST_ID": ids.request_id(),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(params),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        ENVIRON_KEY: item,
    }


def _again(status: int, rejected: str | None, retry_after: float | None) -> bool:
    if status not in AGAIN_STATUSES:
        return False
    if rejected is None:
        return True  # the backends, not the key
    # A key's limit refused it: worth waiting for only if it passes (a budget is spent
    # until its period ends; a request larger than a per-minute limit never fits).
    return rejected in PASSING_LIMITS and retry_after is not None


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None
