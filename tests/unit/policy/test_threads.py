"""Message threads (app/policy/threads.py): the protocol against a real SQLite store, and the
reply a stream adds up to (the SDK's ``tool_runner`` through real gunicorn:
tests/system/test_threads_gunicorn.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.config import ThreadSettings
from app.errors import GatewayError
from app.policy.threads import ThreadRejected, begin_turn
from app.state.guard import GuardedStore
from app.state.sqlite_store import SQLiteStore
from app.translate.accumulate import MessageAccumulator

SYSTEM = "You are terse."
TOOLS = [{"name": "get_weather", "input_schema": {"type": "object"}}]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[GuardedStore]:
    guarded = GuardedStore(lambda: SQLiteStore(str(tmp_path)))
    yield guarded
    guarded.close()


def reply(message_id: str, text: str) -> dict[str, Any]:
    return {
        "id": message_id,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
    }


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def rejection(call: Callable[[], object]) -> ThreadRejected:
    with pytest.raises(ThreadRejected) as caught:
        call()
    return caught.value


# --- the protocol ----------------------------------------------------------------------------


def test_a_create_is_sent_as_it_is_and_its_conversation_kept(store) -> None:
    body = {"model": "m", "system": SYSTEM, "tools": TOOLS, "messages": [user("hi")]}
    assert begin_turn(dict(body), "alice", store, ThreadSettings()) is None  # not threaded
    body["thread"] = {"type": "create"}
    turn = begin_turn(body, "alice", store, ThreadSettings())
    assert turn is not None and turn.kind == "create"
    assert "thread" not in body and body["messages"] == [user("hi")]
    turn.succeeded(reply("msg_1", "hello"))
    continued = {"model": "m", "messages": [user("again")], "thread": continue_from("msg_1")}
    begin_turn(continued, "alice", store, ThreadSettings())
    assert continued["system"] == SYSTEM and continued["tools"] == TOOLS
    assert continued["messages"] == [
        user("hi"),
        {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
        user("again"),
    ]


def continue_from(message_id: str) -> dict[str, str]:
    return {"type": "continue", "previous_message_id": message_id}


def created(store: GuardedStore, owner: str = "alice", reply_id: str = "msg_1") -> None:
    body = {"model": "m", "system": SYSTEM, "messages": [user("hi")], "thread": {"type": "create"}}
    turn = begin_turn(body, owner, store, ThreadSettings())
    assert turn is not None
    turn.succeeded(reply(reply_id, "hello"))


def continuing(store: GuardedStore, previous: str = "msg_1", owner: str = "alice", **extra: Any):
    body = {"model": "m", "messages": [user("more")], "thread": continue_from(previous), **extra}
    return begin_turn(body, owner, store, ThreadSettings())


def test_a_thread_is_continued_once_then_its_continuation(store) -> None:
    created(store)
    turn = continuing(store)
    turn.succeeded(reply("msg_2", "sure"))
    error = rejection(lambda: continuing(store))
    assert (error.status, error.details) == (409, {"error_code": "thread_already_continued"})
    assert error.headers["x-should-retry"] == "false"  # the SDK replays rather than retries
    assert continuing(store, previous="msg_2") is not None


def test_a_continue_in_progress_keeps_a_second_one_out_until_it_fails(store) -> None:
    created(store)
    first = continuing(store)
    error = rejection(lambda: continuing(store))
    assert (error.status, error.details["error_code"]) == (409, "thread_continue_in_flight")
    first.failed()  # the backend failed: the thread may be continued again
    assert continuing(store) is not None


def test_another_keys_or_an_unknown_thread_is_not_found(store) -> None:
    created(store, owner="alice")
    for owner, previous in (("bob", "msg_1"), ("alice", "msg_nope")):
        error = rejection(lambda o=owner, p=previous: continuing(store, previous=p, owner=o))
        assert (error.status, error.error_type) == (404, "not_found_error")
        payload = error.payload("req_1")
        assert payload["error"]["details"] == {"error_code": "thread_not_found"}
        assert "send the full history" in payload["error"]["message"]


@pytest.mark.parametrize("field", ["system", "tools"])
def test_a_continue_may_not_send_what_the_thread_keeps(store, field) -> None:
    created(store)
    with pytest.raises(GatewayError) as caught:
        continuing(store, **{field: SYSTEM if field == "system" else TOOLS})
    assert caught.value.status == 400 and caught.value.message.startswith(f"{field}: cannot")
    assert continuing(store) is not None  # and it claimed nothing


@pytest.mark.parametrize(
    ("thread", "message"),
    [
        ("create", "thread: must be an object"),
        ({"type": "fork"}, "thread.type: must be create or continue"),
        ({"type": "continue"}, "thread.previous_message_id: must be the id"),
        ({"type": "continue", "previous_message_id": 7}, "thread.previous_message_id"),
    ],
)
def test_a_malformed_thread_is_a_400_that_names_it(store, thread, message) -> None:
    with pytest.raises(GatewayError) as caught:
        begin_turn({"model": "m", "messages": [], "thread": thread}, "a", store, ThreadSettings())
    assert caught.value.status == 400 and message in caught.value.message


def test_a_gateway_without_threads_says_the_request_is_unsupported(store) -> None:
    body = {"model": "m", "messages": [user("hi")], "thread": {"type": "create"}}
    error = rejection(lambda: begin_turn(body, "a", store, ThreadSettings(enabled=False)))
    assert error.status == 400 and error.error_type == "invalid_request_error"
    assert error.details == {"error_code": "thread_unsupported_request", "unsupported": ["thread"]}


def test_a_conversation_over_the_size_cap_is_unsupported_and_claims_nothing(store) -> None:
    created(store)
    small = ThreadSettings(max_bytes=1024)
    body = {"model": "m", "messages": [user("x" * 2000)], "thread": continue_from("msg_1")}
    error = rejection(lambda: begin_turn(body, "alice", store, small))
    assert error.details == {
        "error_code": "thread_unsupported_request",
        "unsupported": ["thread_size"],
    }
    assert continuing(store) is not None


def test_a_reply_that_outgrows_the_cap_is_not_kept(store) -> None:
    body = {"model": "m", "messages": [user("hi")], "thread": {"type": "create"}}
    turn = begin_turn(body, "alice", store, ThreadSettings(max_bytes=1024))
    turn.succeeded(reply("msg_big", "y" * 2000))
    assert rejection(lambda: continuing(store, previous="msg_big")).status == 404


# --- the reply a stream adds up to -----------------------------------------------------------


def test_the_accumulated_stream_is_the_message_the_sdk_would_assemble() -> None:
    events = [
        {"type": "message_start", "message": {"id": "msg_s", "role": "assistant", "content": []}},
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "thinking", "thinking": ""},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "thinking_delta", "thinking": "hm"},
        },
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "signature_delta", "signature": "s"},
        },
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "text_delta", "text": "Let "},
        },
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "me."}},
        {"type": "content_block_stop", "index": 1},
        {
            "type": "content_block_start",
            "index": 2,
            "content_block": {"type": "tool_use", "id": "t1", "name": "f", "input": {}},
        },
        {
            "type": "content_block_delta",
            "index": 2,
            "delta": {"type": "input_json_delta", "partial_json": '{"a":'},
        },
        {
            "type": "content_block_delta",
            "index": 2,
            "delta": {"type": "input_json_delta", "partial_json": " 1}"},
        },
        {"type": "content_block_stop", "index": 2},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use"},
            "usage": {"output_tokens": 9},
        },
    ]
    accumulator = MessageAccumulator()
    accumulator.feed(events)
    assert accumulator.message is None  # not before message_stop
    accumulator.feed([{"type": "message_stop"}])
    message = accumulator.message
    assert message["id"] == "msg_s" and message["stop_reason"] == "tool_use"
    assert message["content"] == [
        {"type": "thinking", "thinking": "hm", "signature": "s"},
        {"type": "text", "text": "Let me."},
        {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}},
    ]


def test_a_stream_that_failed_adds_up_to_nothing() -> None:
    accumulator = MessageAccumulator()
    accumulator.feed(
        [
            {"type": "message_start", "message": {"id": "m", "content": []}},
            {"type": "error", "error": {"type": "api_error", "message": "cut"}},
        ]
    )
    assert accumulator.message is None
