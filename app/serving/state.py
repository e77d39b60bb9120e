"""What the gateway keeps about one request, from its first hook to its access line and its
settlement, and the ledger it settles with (the store, and the worker's usage buffer).

It lives in the WSGI environ, which every layer reaches through Flask's public
``request.environ``: one lookup through the request proxy, then plain attributes. ``end`` runs
exactly once, wherever the request ends (after a JSON answer is written, at a stream's end, or
in the last hook when no answer left the app): the access line, and one store round trip that
gives back the key's slot and reservations and adds the request's usage. Settlement reads the
request's outcome (app.serving.outcome), never its access line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from flask import request

from app import jsonc
from app.batches.item import BatchItem
from app.ops import metrics
from app.ops.access_log import access_line, log_access
from app.policy.limits import KeyPolicy, Reservation, rate_headers, settlement
from app.serving.outcome import RequestOutcome
from app.state.buffer import UsageBuffer
from app.state.guard import GuardedStore
from app.state.store import Ask, Usage
from app.translate.tokens import estimate_request_tokens

if TYPE_CHECKING:
    from app.ops.spans import RequestTrace
    from app.serving.relay import StreamBody

log = logging.getLogger("gateway")
ENVIRON_KEY = "gateway.request"
MODEL_CHARS = 100  # a usage record keeps this much of the client's model name
ANONYMOUS = "-"  # the key of usage records when the gateway has no client keys
MESSAGES_PATH = "/v1/messages"  # the one path whose requests spend tokens and make usage records


class Phase(IntEnum):
    """Where a request is in its life. It only moves forward (``RequestState.advance``), and
    may skip phases: a request refused before its body was read is answered unread, one whose
    client left while the backend worked is settled unanswered."""

    RECEIVED = 1  # the first hook ran
    BODY_READ = 2  # the whole body is in (a body left unread closes the connection after)
    STREAMING = 3  # the answer is a relayed stream: its end ends the request, not the hooks
    ANSWERED = 4  # a response left the app (the after-request hook ran)
    SETTLED = 5  # the key's slot and reservations given back, the usage counted
    ENDED = 6  # the access line written and the metrics recorded


@dataclass(frozen=True)
class Ledger:
    """Where requests are held to their limits and their use is written: one per worker."""

    store: GuardedStore
    usage: UsageBuffer
    lease_ttl: float


def run_each(steps: tuple[Callable[[], object], ...], request_id: str) -> None:
    """Every step, whatever an earlier one raised: what ends a request must all happen (a step
    left out would hold a key's slot until its lease expires, or lose an access line). A
    failure is logged once, here, and goes no further (mid-stream, it would reach the client
    as a connection cut short); an exit (``GreenletExit``) is raised again once all have run."""
    pending: BaseException | None = None
    for step in steps:
        try:
            step()
        except Exception:
            log.exception("ending the request failed", extra={"request_id": request_id})
        except BaseException as exc:
            pending = pending or exc
    if pending is not None:
        raise pending


class RequestState:
    __slots__ = (
        "started",
        "request_id",
        "outcome",
        "key",
        "reservation",
        "rate_headers",
        "phase",
        "ledger",
        "admin",
        "batch",
        "trace",
        "stream",
    )

    def __init__(self, started: float, request_id: str, ledger: Ledger) -> None:
        self.started = started  # monotonic
        self.request_id = request_id
        self.ledger = ledger
        # What the request did; None for probes and scrapes, which get no access line.
        self.outcome: RequestOutcome | None = None
        self.key: KeyPolicy | None = None  # the client key, when keys are configured
        self.reservation: Reservation | None = None  # what the key's limits admitted
        self.rate_headers: list[tuple[str, str]] = []  # go on the answer, whatever it is
        self.phase = Phase.RECEIVED
        self.admin = False  # the admin token, on the routes that take it (batches)
        self.batch: BatchItem | None = None  # a batch item's request, run by the gateway
        self.trace: RequestTrace | None = None  # its spans, when tracing is on (app.ops.tracing)
        self.stream: StreamBody | None = None  # its answer, when that is a relayed stream

    @property
    def owner(self) -> str:
        """Whose threads, batches and usage this request's are: its key's name, or ``-``
        without keys (a batch item's: its batch's key, even if that key is gone)."""
        if self.batch is not None:
            return self.batch.owner
        return self.key.name if self.key is not None else ANONYMOUS

    def advance(self, phase: Phase) -> bool:
        """Move on to ``phase``; False, and no change, if the request is there or past it."""
        if phase <= self.phase:
            return False
        self.phase = phase
        return True

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
        self._admit(key, ask, wall, estimate, max_tokens)

    def admit_count(self) -> None:
        """Hold a token count to its key's request rate and requests in flight, not to its
        token limits or budgets: counting spends no tokens (Anthropic limits count_tokens by
        requests per minute too). A refusal is the same 429 as a message's."""
        key = self.key
        if key is None:
            return
        ask = key.count_ask(self.ledger.lease_ttl)
        if ask.takes or ask.max_concurrent:
            self._admit(key, ask, time.time(), 0, 0)

    def _admit(self, key: KeyPolicy, ask: Ask, wall: float, estimate: int, max_tokens: int) -> None:
        verdict = self.ledger.store.admit(ask)
        self.rate_headers = rate_headers(verdict.standing, wall)
        if not verdict.admitted:
            error = key.refused(verdict, max_tokens)
            if self.outcome is not None:
                self.outcome.rejected = error.reason
            raise error
        self.reservation = key.reservation(ask, verdict, estimate, max_tokens)

    def end(self) -> None:
        """The request is over: its settlement, if it has not had it, its access line and
        metrics, and its trace's spans, each whatever happened to the others."""
        outcome = self.outcome
        if outcome is None or self.phase is Phase.ENDED:
            return
        started, trace = self.started, self.trace
        steps: tuple[Callable[[], object], ...] = (
            self.settle,
            lambda: self.advance(Phase.ENDED),
            lambda: metrics.record(outcome, time.monotonic() - started),
            lambda: log_access(access_line(outcome), started),
        )
        if trace is not None:  # the request's span ends last: its last byte has gone
            steps += (lambda: trace.end(outcome, started),)
        run_each(steps, self.request_id)

    def settle(self) -> None:
        """Its settlement with the store, once: its slot back and its reservations corrected,
        in one round trip (none when it has neither), and its usage added to the buffer. A
        JSON answer settles before it is written, so a client that sends its next request on
        reading it finds its tokens given back; any other request settles at its ``end``."""
        outcome = self.outcome
        if outcome is None or not self.advance(Phase.SETTLED):
            return
        tokens = outcome.tokens
        cached = tokens.cached if tokens is not None else 0
        used_input = tokens.input if tokens is not None else 0
        used_output = tokens.output if tokens is not None else 0
        reservation = self.reservation
        if reservation is not None and used_input <= 0 and _backend_saw(outcome):
            # The backend had the prompt and did not say how long it was (the client left
            # before the usage came): the estimate stands.
            used_input = reservation.input_tokens
        run_each(
            (
                lambda: self._add_usage(outcome, used_input, used_output, cached),
                lambda: self._correct(used_input, used_output),
            ),
            self.request_id,
        )

    def _add_usage(
        self, outcome: RequestOutcome, used_input: int, used_output: int, cached: int
    ) -> None:
        usage = self._usage(outcome, used_input, used_output, cached)
        if usage is not None:
            self.ledger.usage.add(usage)  # the console's counts are summed from it too
            if not usage.errors:
                return
        path = outcome.path
        if path.startswith("/v1/"):
            failed = bool(outcome.error) or (outcome.status or 0) >= 400
            if usage is None and path == MESSAGES_PATH:
                self.ledger.usage.tally(failed)
            if failed:
                self.ledger.usage.fail(failure(outcome))

    def _correct(self, used_input: int, used_output: int) -> None:
        """The key's slot back, and what the reservation took corrected to what was used."""
        reservation, key = self.reservation, self.key
        if reservation is not None and key is not None:
            correction = settlement(reservation, key, used_input, used_output)
            if not correction.empty:
                self.ledger.store.settle(correction)

    def _usage(
        self, outcome: RequestOutcome, used_input: int, used_output: int, cached: int
    ) -> Usage | None:
        """The request's usage record: for every message request that got past the limits,
        errors included (their tokens are what the backend spent, usually none). A token
        count makes none: it spends no tokens, and the usage report counts what was spent."""
        model = (outcome.model or "")[:MODEL_CHARS]
        if outcome.path != MESSAGES_PATH or not model or outcome.rejected:
            return None
        failed = bool(outcome.error) or (outcome.status or 0) >= 400
        usage = Usage(
            time.strftime("%Y-%m-%d", time.gmtime()),
            self.owner,
            model,
            max(used_input, 0),
            used_output,
            cached,
            errors=int(failed),
        )
        if self.batch is not None:
            usage.batch_requests = 1
            usage.batch_input_tokens, usage.batch_output_tokens = usage.input_tokens, used_output
        return usage


def failure(outcome: RequestOutcome) -> str:
    """A failed request as the console's Errors page lists it: who, what, where and why;
    never a prompt, a key or an error message (which may quote either)."""
    return jsonc.dumps_str(
        {
            "time": time.time(),
            "status": outcome.status,
            "error": outcome.error or outcome.rejected,
            "key": outcome.key,
            "model": (outcome.model or "")[:MODEL_CHARS] or None,
            "backend": outcome.backend,
            "path": outcome.path,
            "request_id": outcome.request_id,
        }
    )


def _backend_saw(outcome: RequestOutcome) -> bool:
    return bool(outcome.backend) and not outcome.error


def current() -> RequestState | None:
    """This request's state; None only if the first hook never ran for it."""
    state: RequestState | None = request.environ.get(ENVIRON_KEY)
    return state
