"""What the gateway keeps about one request, from its first hook to its access line and its
settlement, and the ledger it settles with (the store, and the worker's usage buffer).

It lives in the WSGI environ, which every layer reaches through Flask's public
``request.environ``: one lookup through the request proxy, then plain attributes. ``end`` runs
exactly once, wherever the request ends (after a JSON answer is written, at a stream's end, or
in the last hook when no answer left the app): the access line, and one store round trip that
gives back the key's slot and reservations and adds the request's usage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from flask import request

from app.ops.access_log import log_access
from app.policy.limits import KeyPolicy, Reservation, rate_headers, settlement
from app.state.buffer import UsageBuffer
from app.state.guard import GuardedStore
from app.state.store import Usage
from app.translate.tokens import estimate_request_tokens

ENVIRON_KEY = "gateway.request"
MODEL_CHARS = 100  # a usage record keeps this much of the client's model name
ANONYMOUS = "-"  # the key of usage records when the gateway has no client keys
SETTLED_PATH = "/v1/messages"


@dataclass(frozen=True)
class Ledger:
    """Where requests are held to their limits and their use is written: one per worker."""

    store: GuardedStore
    usage: UsageBuffer
    lease_ttl: float


class RequestState:
    __slots__ = (
        "started",
        "request_id",
        "access",
        "key",
        "reservation",
        "rate_headers",
        "access_deferred",
        "body_read",
        "answered",
        "ended",
        "settled",
        "ledger",
    )

    def __init__(self, started: float, request_id: str, ledger: Ledger) -> None:
        self.started = started  # monotonic
        self.request_id = request_id
        self.ledger = ledger
        # The access-log entry; None for probes and scrapes, which get no access line.
        self.access: dict[str, Any] | None = None
        self.key: KeyPolicy | None = None  # the client key, when keys are configured
        self.reservation: Reservation | None = None  # what the key's limits admitted
        self.rate_headers: list[tuple[str, str]] = []  # go on the answer, whatever it is
        self.access_deferred = False  # a stream ends itself, when it is over
        self.body_read = False  # the whole request body was read
        self.answered = False  # a response left the app (after_request ran)
        self.ended = False
        self.settled = False

    @property
    def owner(self) -> str:
        """Whose threads and usage this request's are: its key's name, or ``-`` without keys."""
        return self.key.name if self.key is not None else ANONYMOUS

    def admit(self, body: dict[str, Any]) -> None:
        """Hold the request to its key's limits, in one store round trip: what it reserves,
        or a 429 ``rate_limit_error`` that says which limit. Either way the answer gets the
        key's rate headers (app.serving.web adds them)."""
        key = self.key
        if key is None or not key.limited:
            return
        # Reserved by the input and budget limits, and the usage record's count when the
        # backend never says (a client that hangs up before the usage comes).
        estimate = estimate_request_tokens(body)
        max_tokens = int(body["max_tokens"])
        wall = time.time()
        ask = key.ask(estimate, max_tokens, wall, self.ledger.lease_ttl)
        verdict = self.ledger.store.admit(ask)
        self.rate_headers = rate_headers(verdict.standing, wall)
        if not verdict.admitted:
            error = key.refused(verdict, max_tokens)
            if self.access is not None:
                self.access["rejected"] = error.reason
            raise error
        self.reservation = key.reservation(ask, verdict, estimate, max_tokens)

    def end(self) -> None:
        """The request is over: its settlement, if it has not had it, and its access line."""
        if self.ended or self.access is None:
            return
        self.ended = True
        self.settle()
        log_access(self.access, self.started)

    def settle(self) -> None:
        """Its settlement with the store, once: its slot back and its reservations corrected,
        in one round trip (none when it has neither), and its usage added to the buffer. A
        JSON answer settles before it is written, so a client that sends its next request on
        reading it finds its tokens given back."""
        access = self.access
        if self.settled or access is None or access.get("path") != SETTLED_PATH:
            return
        self.settled = True
        cached = int(access.get("cached_tokens") or 0)
        used_input = int(access.get("input_tokens") or 0) - cached
        used_output = int(access.get("output_tokens") or 0)
        reservation = self.reservation
        if reservation is not None and used_input <= 0 and _backend_saw(access):
            # The backend had the prompt and did not say how long it was (the client left
            # before the usage came): the estimate stands.
            used_input = reservation.input_tokens
        usage = self._usage(access, max(used_input, 0), used_output, cached)
        if usage is not None:
            self.ledger.usage.add(usage)
        key = self.key
        if reservation is not None and key is not None:
            correction = settlement(reservation, key, used_input, used_output)
            if not correction.empty:
                self.ledger.store.settle(correction)

    def _usage(
        self, access: dict[str, Any], used_input: int, used_output: int, cached: int
    ) -> Usage | None:
        """The request's usage record: for every request that got past the limits, errors
        included (their tokens are what the backend spent, usually none)."""
        model = str(access.get("model") or "")[:MODEL_CHARS]
        if not model or access.get("rejected"):
            return None
        failed = bool(access.get("error")) or int(access.get("status") or 0) >= 400
        return Usage(
            time.strftime("%Y-%m-%d", time.gmtime()),
            self.owner,
            model,
            used_input,
            used_output,
            cached,
            errors=int(failed),
        )


def _backend_saw(access: dict[str, Any]) -> bool:
    return bool(access.get("backend")) and not access.get("error")


def current() -> RequestState | None:
    """This request's state; None only if the first hook never ran for it."""
    return request.environ.get(ENVIRON_KEY)
