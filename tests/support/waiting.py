"""Waiting for what a test started to be ready, and for what a request set off to happen.

On a busy machine (a laptop building something, a CI runner with neighbours) a server takes
seconds rather than milliseconds to boot, and a probe meanwhile is refused, reset, timed out or
given half an answer. Each of those means "not yet", never "failed": only the deadline, or the
process having exited, does. The deadlines are generous because they cost nothing when the
machine is fast; a failure says what was awaited, what the last probe saw and, for a process,
the end of its log.
"""

from __future__ import annotations

import http.client
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import requests

T = TypeVar("T")

READY_SECONDS = 60.0  # a server's boot: gunicorn with its workers, nginx, Redis, llama-server
EVENTUALLY_SECONDS = 30.0  # what a request set off: an access line, a settled counter
POLL_SECONDS = 0.05

# What a probe may meet while its server starts or is busy: refused, reset or timed out
# (OSError covers sockets, TLS and timeouts), an HTTP answer cut short, a truncated JSON body
# or log line (ValueError).
TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    requests.RequestException,
    http.client.HTTPException,
    ValueError,
)


def wait_until_ready(
    probe: Callable[[], object],
    what: str,
    *,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    deadline: float = READY_SECONDS,
) -> None:
    """Call ``probe`` until it returns something true. A transient error is a "not yet"; the
    deadline passing, or ``process`` exiting, is a RuntimeError with ``log``'s last lines."""
    end = time.monotonic() + deadline
    last = "no answer"
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"{what} exited with status {process.returncode} before it was ready"
                + log_tail(log)
            )
        try:
            if probe():
                return
            last = "answered, not ready"
        except TRANSIENT as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= end:
            raise RuntimeError(
                f"{what} was not ready within {deadline:.0f} s (last probe: {last})" + log_tail(log)
            )
        time.sleep(POLL_SECONDS)


def eventually(check: Callable[[], T], what: str, timeout: float = EVENTUALLY_SECONDS) -> T:
    """``check()``'s first true value, for what happens a moment after a request's answer (its
    access line, its settlement). A transient error is retried; after ``timeout`` an
    AssertionError names ``what`` and the last value seen."""
    end = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
            last: object = value
        except TRANSIENT as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= end:
            raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {last!r})")
        time.sleep(POLL_SECONDS)


def log_tail(log: Path | None, chars: int = 3000) -> str:
    """The end of a process's log, for a failure message."""
    if log is None:
        return ""
    try:
        text = log.read_text(errors="replace")
    except OSError as exc:
        return f"\n(no log: {exc})"
    return f"\n--- last of {log} ---\n{text[-chars:]}"
