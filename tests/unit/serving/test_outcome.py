"""A request's outcome (app/serving/outcome.py) and the two things made of it: the access line
(app/ops/access_log.py) and the settlement with the store (app/serving/state.py), which reads
the outcome and never the line. Pure, but for a real SQLite store in a temporary directory."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.config import ClientKey, Limits
from app.ops.access_log import access_line
from app.policy.limits import KeyPolicy
from app.serving.outcome import Answer, Delivery, RequestOutcome, Tokens
from app.serving.state import Ledger, Phase, RequestState, run_each
from app.state.buffer import UsageBuffer
from app.state.guard import GuardedStore
from app.state.sqlite_store import SQLiteStore

BODY = {
    "model": "claude-haiku-4-5",
    "max_tokens": 100,
    "messages": [{"role": "user", "content": "hi"}],
}


def outcome(**fields: object) -> RequestOutcome:
    base = RequestOutcome("req_1", "POST", "/v1/messages", 7, "key_abc", "k", None)
    for name, value in fields.items():
        setattr(base, name, value)
    return base


def test_tokens_read_anthropic_usage_and_count_what_is_no_number_as_nothing() -> None:
    usage = {"input_tokens": 3, "output_tokens": 5, "cache_read_input_tokens": 4}
    tokens = Tokens.of(usage)
    assert tokens == Tokens(input=3, output=5, cached=4) and tokens.prompt == 7
    assert Tokens.of(
        {"input_tokens": "3", "output_tokens": [5], "cache_read_input_tokens": True}
    ) == (Tokens())
    assert Tokens.of(None) is None and Tokens.of([1]) is None


def test_a_streamed_answer_is_logged_with_its_error_and_stop_reason_even_when_null() -> None:
    line = access_line(
        outcome(
            stream=True,
            model="m",
            route="default",
            backend="b",
            backend_model="bm",
            attempts=1,
            status=200,
            delivery=Delivery.STREAM,
            answer=Answer(None, Tokens(3, 5, 4)),
            client_disconnected=True,
            bytes_out=120,
            ttft=0.01234,
        )
    )
    assert line == {
        "request_id": "req_1",
        "method": "POST",
        "path": "/v1/messages",
        "stream": True,
        "worker": 7,
        "client": "key_abc",
        "key": "k",
        "forwarded_for": None,
        "model": "m",
        "route": "default",
        "backend": "b",
        "backend_model": "bm",
        "attempts": 1,
        "status": 200,
        "stop_reason": None,
        "error": None,
        "client_disconnected": True,
        "bytes_out": 120,
        "input_tokens": 7,  # the whole prompt, cached part included
        "output_tokens": 5,
        "cached_tokens": 4,
        "ttft_ms": 12.3,
    }


def test_a_request_that_never_reached_a_backend_is_logged_with_what_it_got_that_far() -> None:
    refused = access_line(
        outcome(
            status=401,
            delivery=Delivery.BODY,
            bytes_out=90,
            error="authentication_error",
            rejected="unauthenticated",
        )
    )
    assert {k: refused[k] for k in ("status", "error", "rejected", "bytes_out")} == {
        "status": 401,
        "error": "authentication_error",
        "rejected": "unauthenticated",
        "bytes_out": 90,
    }
    assert not {"model", "backend", "stop_reason", "input_tokens", "ttft_ms"} & set(refused)
    gone = access_line(outcome(status=499, client_disconnected=True, delivery=Delivery.NONE))
    assert gone["status"] == 499 and gone["client_disconnected"] is True
    assert "bytes_out" not in gone and "error" not in gone
    assert "routed" not in refused


def test_the_access_line_says_why_a_placed_request_went_to_its_backend() -> None:
    line = access_line(outcome(model="m", route="fleet", backend="r1", routed="spilled"))
    assert line["routed"] == "spilled"
    assert "routed" not in access_line(outcome(model="m", route="one", backend="b"))


def test_a_request_only_moves_forward_through_its_phases(ledger: Ledger) -> None:
    state = RequestState(time.monotonic(), "req_1", ledger)
    moves = [
        (state.advance(phase), state.phase)
        for phase in (Phase.STREAMING, Phase.BODY_READ, Phase.STREAMING, Phase.ENDED, Phase.SETTLED)
    ]
    assert moves == [
        (True, Phase.STREAMING),  # a phase may be skipped
        (False, Phase.STREAMING),
        (False, Phase.STREAMING),
        (True, Phase.ENDED),
        (False, Phase.ENDED),
    ]


def test_every_step_of_an_ending_runs_and_a_failure_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ran: list[str] = []

    def fails() -> None:
        ran.append("fails")
        raise ValueError("backend usage is not a number")

    def exits() -> None:
        ran.append("exits")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), caplog.at_level(logging.ERROR, logger="gateway"):
        run_each((fails, lambda: ran.append("a"), exits, lambda: ran.append("b")), "req_1")
    assert ran == ["fails", "a", "exits", "b"]  # the exit is raised again, after the rest
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "not a number" in (errors[0].exc_text or "")


# --- settlement reads the outcome --------------------------------------------------------------


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    store = GuardedStore(lambda: SQLiteStore(str(tmp_path)))
    usage = UsageBuffer(store, every=3600)
    yield Ledger(store, usage, 900.0)
    usage.close()
    store.close()


def limited(ledger: Ledger, **limits: Any) -> RequestState:
    state = RequestState(time.monotonic(), "req_1", ledger)
    state.key = KeyPolicy(ClientKey("k", b"\0" * 32, Limits(**limits)))
    return state


def test_settlement_takes_the_tokens_from_the_outcome(ledger: Ledger) -> None:
    state = limited(ledger, output_tokens_per_minute=1000, max_concurrent=1)
    state.outcome = outcome(model="m", backend="b", status=200)
    state.admit(BODY)
    assert ledger.store.in_flight(["k"]) == {"k": 1}
    state.outcome.answer = Answer("end_turn", Tokens(input=3, output=5, cached=4))
    state.settle()
    assert state.phase is Phase.SETTLED
    assert ledger.store.in_flight(["k"]) == {"k": 0}  # the key's slot is back
    (usage,) = ledger.usage.pending.values()
    assert (usage.key, usage.model, usage.input_tokens, usage.output_tokens) == ("k", "m", 3, 5)
    assert (usage.cached_tokens, usage.errors) == (4, 0)
    state.settle()  # once only
    assert ledger.usage.pending[(usage.day, "k", "m")].requests == 1


def test_a_token_count_gives_its_slot_back_and_makes_no_usage_record(ledger: Ledger) -> None:
    state = limited(ledger, requests_per_minute=60, max_concurrent=1, tokens_per_day=1)
    state.outcome = outcome(path="/v1/messages/count_tokens", model="m", backend="b", status=200)
    state.admit_count()  # a budget of one token does not stop a count
    assert ledger.store.in_flight(["k"]) == {"k": 1}
    state.settle()
    assert ledger.store.in_flight(["k"]) == {"k": 0}
    assert ledger.usage.pending == {}


def test_a_refused_request_makes_no_usage_record(ledger: Ledger) -> None:
    state = limited(ledger)
    state.outcome = outcome(model="m", rejected="rate_limited", status=429, error="x")
    state.end()
    assert state.phase is Phase.ENDED and ledger.usage.pending == {}
