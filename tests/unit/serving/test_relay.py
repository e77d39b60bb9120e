"""app.serving.relay.StreamBody: the WSGI body of a relayed stream ends its bookkeeping
exactly once, however gunicorn ends the response."""

from __future__ import annotations

from collections.abc import Iterator

from app.serving.relay import StreamBody, StreamOutcome


def _body(pieces: list[bytes]) -> tuple[StreamBody, list[StreamOutcome], list[str]]:
    ended: list[StreamOutcome] = []
    seen: list[str] = []
    body = StreamBody(ended.append)

    def generate() -> Iterator[bytes]:
        seen.append("started")
        try:
            yield from pieces
            body.outcome.completed = True
        finally:
            seen.append("finally")
            body.end()

    body.pieces = generate()
    return body, ended, seen


def test_iterating_the_body_runs_the_relay_generator_itself() -> None:
    body, _, _ = _body([b"a", b"b"])
    assert iter(body) is body.pieces
    assert list(body) == [b"a", b"b"]


def test_a_stream_relayed_to_its_end_and_closed_ends_once_as_completed() -> None:
    body, ended, _ = _body([b"a", b"b"])
    assert list(body) == [b"a", b"b"]
    body.close()
    assert len(ended) == 1 and ended[0].completed


def test_a_client_gone_mid_stream_ends_it_once_as_not_completed() -> None:
    body, ended, seen = _body([b"a", b"b"])
    pieces = iter(body)
    assert next(pieces) == b"a"
    body.close()  # what gunicorn does when a write to the client fails
    assert seen == ["started", "finally"]
    assert len(ended) == 1 and not ended[0].completed


def test_a_body_closed_before_the_relay_ever_ran_still_ends_the_stream() -> None:
    body, ended, seen = _body([b"a"])
    body.close()
    assert seen == []  # a generator closed before its first step never runs its finally
    assert len(ended) == 1 and not ended[0].completed
    body.close()
    assert len(ended) == 1
