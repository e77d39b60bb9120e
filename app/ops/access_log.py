"""Logging: one JSON line per request (the access log) and JSON-formatted gateway messages.

The access line is written when the response is really over (after the last streamed byte, or
when the client went away), so its timings are the ones an operator cares about: time to first
token and total time, not the time it took to return a generator.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any

from app import ids, jsonc
from app.ops import metrics

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


class GatewayHandler(logging.StreamHandler):
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


def log_access(entry: dict[str, Any], started: float) -> None:
    """The request is over: one access line, and the metrics that come from it."""
    duration = time.monotonic() - started
    entry["duration_ms"] = round(duration * 1000, 1)
    metrics.record(entry, duration)
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


def _write_line(handler: logging.StreamHandler, line: bytes) -> None:
    """One whole line, straight to the handler's file descriptor (stderr's buffer is empty
    between records: every record is flushed as it is written)."""
    try:
        fd = handler.stream.fileno()
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
    except (OSError, ValueError):  # stderr closed or gone: as logging would, drop the line
        pass
