"""Logging: one JSON line per request (the access log) and JSON-formatted gateway messages.

The access line is written when the response is really over (after the last streamed byte, or
when the client went away), so its timings are the ones an operator cares about: time to first
token and total time, not the time it took to return a generator.

The line is rendered from the request's outcome (app.serving.outcome); its field names and
values are an operator's contract (dashboards, alerts and log queries read them), and nothing
in the gateway reads them back.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any, TextIO

from app import ids, jsonc
from app.serving.outcome import Delivery, RequestOutcome

access_log = logging.getLogger("gateway.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{8,128}")


class JSONFormatter(logging.Formatter):
    """Gateway messages as JSON lines, so one log pipeline reads both kinds of line."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "gateway.access" and isinstance(record.msg, dict):
            return jsonc.dumps_str(record.msg)
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return jsonc.dumps_str(entry)


class GatewayHandler(logging.StreamHandler[TextIO]):
    """The gateway's own stderr handler, told apart from any other by its class."""


def configure_logging(level: str) -> None:
    """Route the ``gateway`` loggers to stderr (the journal under systemd), once per process."""
    logger = logging.getLogger("gateway")
    logger.setLevel(level.upper())
    if not any(isinstance(h, GatewayHandler) for h in logger.handlers):
        handler = GatewayHandler(sys.stderr)
        handler.setFormatter(JSONFormatter())
        logger.addHandler(handler)
    logger.propagate = False
    # Nothing here logs thread or multiprocessing names; not looking them up for every record
    # (the access line is one per request) saves a few microseconds each.
    logging.logThreads = False
    logging.logMultiprocessing = False


def request_id_from(header: str | None) -> str:
    """Keep a sane incoming X-Request-ID (nginx's, say) so both logs share it; else mint one."""
    if header and _REQUEST_ID.fullmatch(header):
        return header
    return ids.request_id()


def access_line(outcome: RequestOutcome) -> dict[str, Any]:
    """The access line of a request that is over (``log_access`` adds its duration).

    A field is left out when the request never came to it (no ``model`` for a request refused
    before its body was read, no ``bytes_out`` when no response left); a few are written as
    null when the answer did not say: the stop reason of an answer, the error of a stream."""
    line: dict[str, Any] = {
        "request_id": outcome.request_id,
        "method": outcome.method,
        "path": outcome.path,
        "stream": outcome.stream,
        "worker": outcome.worker,
        "client": outcome.client,
        "key": outcome.key,
        "forwarded_for": outcome.forwarded_for,
    }
    line.update(_those_set(outcome, "rejected", "thread", "batch", "custom_id"))
    if outcome.model is not None:
        line.update(model=outcome.model, route=outcome.route)
    line.update(_those_set(outcome, "backend", "backend_model", "attempts", "routed", "status"))
    line.update(_what_was_answered(outcome))
    return line


def _those_set(outcome: RequestOutcome, *names: str) -> dict[str, Any]:
    """The named fields the request came to (None: it never did), in the order named."""
    return {name: value for name in names if (value := getattr(outcome, name)) is not None}


def _what_was_answered(outcome: RequestOutcome) -> dict[str, Any]:
    """How the answer ended, what went wrong and what it cost. A stream always has ``error``
    (null when it ended well): it may fail after its 200 was sent."""
    found: dict[str, Any] = {}
    if outcome.answer is not None:
        found["stop_reason"] = outcome.answer.stop_reason
    streamed = outcome.delivery is Delivery.STREAM
    if outcome.error is not None or streamed:
        found["error"] = outcome.error
    found.update(_those_set(outcome, "error_message", "client_disconnected"))
    if outcome.delivery is Delivery.BODY or streamed:
        found["bytes_out"] = outcome.bytes_out
    tokens = outcome.tokens
    if tokens is not None:
        found.update(
            input_tokens=tokens.prompt, output_tokens=tokens.output, cached_tokens=tokens.cached
        )
    if outcome.ttft is not None:
        found["ttft_ms"] = round(outcome.ttft * 1000, 1)
    return found


def log_access(entry: dict[str, Any], started: float) -> None:
    """One access line (``access_line``'s), with the request's duration since ``started``
    (monotonic)."""
    entry["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
    route = _access_route()
    if route is _LOGGING:
        access_log.info(entry)
    elif route is not None:
        _write_line(route, jsonc.dumps(entry) + b"\n")


_LOGGING = object()


def _access_route() -> Any:
    """Where the access line goes: our stderr handler, when it is the only place access lines
    go; ``_LOGGING`` for any other arrangement (another handler or a filter anywhere on the
    way, as a test's log capture adds); None when access lines are switched off.

    Written straight to the handler's stream, a line skips the log record (its construction,
    the handler's lock, the formatter), which cost more than the rest of the access line.
    """
    if not access_log.isEnabledFor(logging.INFO):
        return None
    parent = access_log.parent
    if (
        access_log.handlers
        or access_log.filters
        or not access_log.propagate
        or parent is None
        or parent.propagate
        or parent.filters
        or len(parent.handlers) != 1
    ):
        return _LOGGING
    handler = parent.handlers[0]
    if not isinstance(handler, GatewayHandler) or handler.filters:
        return _LOGGING
    return handler if handler.level <= logging.INFO else None


def _write_line(handler: logging.StreamHandler[TextIO], line: bytes) -> None:
    """One whole line, straight to the handler's file descriptor (stderr's buffer is empty
    between records: every record is flushed as it is written)."""
    try:
        fd = handler.stream.fileno()
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
    except (OSError, ValueError):  # stderr closed or gone: as logging would, drop the line
        pass
