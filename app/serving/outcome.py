"""What a request did: who asked for what, which backend served it after how many attempts,
how its answer ended and what it used.

The views and the relay fill it in as they learn it. Two readers use it once the request is
over, each for its own purpose: settlement (app.serving.state: the key's reservations and its
usage records, i.e. billing) and the access line and metrics (app.ops). Neither reads the
other's output, so the access line's field names can change without touching what a key is
charged, and the other way round.

Pure: no Flask, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True, slots=True)
class Tokens:
    """Tokens an answer used, as Anthropic's ``usage`` counts them: ``input`` not read from
    the prompt cache, ``cached`` read from it, ``output`` generated."""

    input: int = 0
    output: int = 0
    cached: int = 0

    @property
    def prompt(self) -> int:
        """The whole prompt, cached part included (what the access line calls input)."""
        return self.input + self.cached

    @classmethod
    def of(cls, usage: object) -> Tokens | None:
        """From an Anthropic ``usage`` object; None when there is none. A count that is not a
        number counts as 0: a backend's odd usage must not cost the request its settlement
        or its access line."""
        if not isinstance(usage, dict):
            return None
        return cls(
            input=_count(usage.get("input_tokens")),
            output=_count(usage.get("output_tokens")),
            cached=_count(usage.get("cache_read_input_tokens")),
        )


def _count(value: object) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float) and math.isfinite(value):
        return max(int(value), 0)
    return 0


@dataclass(slots=True)
class Answer:
    """What the backend's answer said once it was over: why it stopped (None: it did not
    say, or the stream broke off) and what it used (None: no usage came)."""

    stop_reason: str | None = None
    tokens: Tokens | None = None


class Delivery(Enum):
    """How the response left the gateway."""

    BODY = "body"  # one response body, written after the last hook: an answer or an error
    STREAM = "stream"  # a stream relayed as it came; its end is the request's end
    NONE = "none"  # nothing: the client hung up while the backend worked (logged as 499)


@dataclass(slots=True)
class RequestOutcome:
    """One request's record, from its first hook to its end."""

    # Who asked (the first hook).
    request_id: str
    method: str
    path: str
    worker: int
    client: str | None  # a stable id of the presented key, never the key
    key: str | None  # the key's configured name
    forwarded_for: str | None
    # What was asked, and whether the gateway let it in.
    stream: bool = False
    rejected: str | None = None  # why the key or its limits refused it
    thread: str | None = None  # "create" or "continue", also when the thread was refused
    batch: str | None = None  # a batch item's batch id
    custom_id: str | None = None  # and its custom_id
    model: str | None = None  # the client's name for it
    route: str | None = None
    # Who served it.
    backend: str | None = None
    backend_model: str | None = None
    attempts: int | None = None
    routed: str | None = None  # why the backend was chosen (routes that place by load)
    # How it ended.
    answer: Answer | None = None  # None: no answer was made (an error, a refusal, a count)
    status: int | None = None
    delivery: Delivery | None = None
    bytes_out: int | None = None
    error: str | None = None  # the Anthropic error type the client got, in the body or stream
    error_message: str | None = None  # for errors of the gateway's or the backend's (5xx)
    client_disconnected: bool | None = None  # None: not a stream, the question does not arise
    ttft: float | None = None  # seconds from the request's start to the first streamed event

    @property
    def tokens(self) -> Tokens | None:
        return self.answer.tokens if self.answer is not None else None
