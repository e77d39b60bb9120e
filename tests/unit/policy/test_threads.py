"""Message threads (app/policy/threads.py): the protocol against a real SQLite store, the reply
a stream adds up to, and the official SDK's ``tool_runner`` (which threads by default) through
real gunicorn with four workers, streamed and not, including a thread the gateway lost."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
import requests
from fakebackend import (
    FakeBackend,
    JSONReply,
    StreamReply,
    chunks,
    completion,
    tool_call_chunks,
)
from servers import Gunicorn
from waiting import eventually

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


def rejection(call) -> ThreadRejected:  # type: ignore[no-untyped-def]
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


# --- the SDK's tool runner through gunicorn with four workers --------------------------------


@anthropic.beta_tool
def get_weather(city: str) -> str:
    """Current weather for a city.

    Args:
        city: the city's name
    """
    return f"3°C in {city}"


@anthropic.beta_tool
def get_time(tz: str) -> str:
    """The time of day in a time zone.

    Args:
        tz: an IANA time zone
    """
    return f"12:00 in {tz}"


@pytest.fixture(scope="module")
def server(module_backend: FakeBackend, tmp_path_factory) -> Iterator[Gunicorn]:
    directory = tmp_path_factory.mktemp("threads")
    config = directory / "gateway.toml"
    config.write_text(f'[upstream]\nurl = "{module_backend.url}"\n')
    gunicorn = Gunicorn(
        {"GATEWAY_CONFIG": str(config), "GATEWAY_RETRIES": "0", "GATEWAY_WORKERS": "4"},
        directory / "gunicorn.log",
    )
    yield gunicorn
    gunicorn.stop()


def sdk(server: Gunicorn) -> anthropic.Anthropic:
    # A new connection per request, so the turns of one conversation reach different workers.
    return anthropic.Anthropic(
        base_url=server.url, api_key="k", max_retries=0, default_headers={"connection": "close"}
    )


def tool_turns(stream: bool) -> list[Any]:
    """Three backend answers: a weather call, a time call, the final text."""
    weather = [("call_w", "get_weather", ['{"city": ', '"Oslo"}'])]
    time_call = [("call_t", "get_time", ['{"tz": "Europe/Oslo"}'])]
    if stream:
        return [
            StreamReply(tool_call_chunks(weather, text="Checking.")),
            StreamReply(tool_call_chunks(time_call)),
            StreamReply(chunks(["Cold, ", "and noon."])),
        ]
    calls = [
        {
            "id": c[0][0],
            "type": "function",
            "function": {"name": c[0][1], "arguments": "".join(c[0][2])},
        }
        for c in (weather, time_call)
    ]
    return [
        JSONReply(
            completion(
                "Checking.", finish_reason="tool_calls", extra_message={"tool_calls": [calls[0]]}
            )
        ),
        JSONReply(
            completion(None, finish_reason="tool_calls", extra_message={"tool_calls": [calls[1]]})
        ),
        JSONReply(completion("Cold, and noon.")),
    ]


def run_tools(server: Gunicorn, stream: bool, tools: list[Any] | None = None) -> Any:
    with sdk(server) as client:
        runner = client.beta.messages.tool_runner(
            model="claude-haiku-4-5",
            max_tokens=200,
            system=SYSTEM,
            messages=[{"role": "user", "content": "Weather and time in Oslo?"}],
            tools=tools or [get_weather, get_time],
            stream=stream,
        )
        return runner.until_done()


def thread_lines(server: Gunicorn, since: int, count: int) -> list[dict[str, Any]]:
    """The access lines of /v1/messages after the first ``since``, once there are ``count``
    (a line is written once its answer has gone)."""

    def lines() -> list[dict[str, Any]]:
        return [x for x in server.access_lines()[since:] if x.get("path") == "/v1/messages"]

    return eventually(lambda: len(now := lines()) >= count and now, f"{count} access lines")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_the_tool_runner_threads_its_turns_across_workers(server, module_backend, stream):
    workers_seen: set[int] = set()
    for _ in range(4):  # a few conversations, so that turns land on several workers
        seen = len(module_backend.requests)
        before = len(server.access_lines())
        module_backend.reply(*tool_turns(stream))
        final = run_tools(server, stream)
        assert [block.text for block in final.content if block.type == "text"] == [
            "Cold, and noon."
        ]
        lines = thread_lines(server, before, 3)
        assert [(line["status"], line.get("thread")) for line in lines] == [
            (200, "create"),
            (200, "continue"),
            (200, "continue"),
        ]
        workers_seen |= {line["worker"] for line in lines}
        # The backend got the whole conversation each turn: system, tools and all messages.
        sent = [r.json for r in module_backend.requests[seen:]]
        assert [m["role"] for m in sent[2]["messages"]] == [
            "system", "user", "assistant", "tool", "assistant", "tool",
        ]  # fmt: skip
        assert sent[2]["messages"][3] == {
            "role": "tool",
            "tool_call_id": "call_w",
            "content": "3°C in Oslo",
        }
        assert [t["function"]["name"] for t in sent[2]["tools"]] == ["get_weather", "get_time"]
        assert all("thread" not in body for body in sent)
    assert len(workers_seen) > 1  # the threads were continued by workers that did not keep them


def test_a_lost_thread_makes_the_sdk_replay_the_history_and_succeed(server, module_backend):
    """Between two turns the gateway loses every thread (as a store wiped or expired would):
    the continue is a thread_not_found, and the SDK sends the whole history again."""
    state = Path(str(server.log_path.with_suffix(".state"))) / "gateway.sqlite3"

    @anthropic.beta_tool
    def get_weather(city: str) -> str:
        """Current weather for a city.

        Args:
            city: the city's name
        """
        with sqlite3.connect(state) as db:
            db.execute("DELETE FROM threads")
        return f"3°C in {city}"

    before = len(server.access_lines())
    seen = len(module_backend.requests)
    module_backend.reply(*tool_turns(stream=False))
    final = run_tools(server, stream=False, tools=[get_weather, get_time])
    assert final.content[0].text == "Cold, and noon."
    lines = thread_lines(server, before, 4)
    assert [(line["status"], line.get("thread")) for line in lines] == [
        (200, "create"),
        (404, "continue"),  # lost: thread_not_found
        (200, "create"),  # the replay, with the whole history
        (200, "continue"),
    ]
    assert len(module_backend.requests) - seen == 3  # the 404 never reached the backend


def test_threads_over_plain_http_speak_the_error_codes(server, module_backend):
    url = server.url + "/v1/messages"
    body = {"model": "m", "max_tokens": 20, "messages": [user("hi")]}
    first = requests.post(url, json={**body, "thread": {"type": "create"}}, timeout=10).json()
    lost = requests.post(url, json={**body, "thread": continue_from("msg_gone")}, timeout=10)
    assert lost.status_code == 404
    assert lost.json()["error"]["details"] == {"error_code": "thread_not_found"}
    ok = requests.post(url, json={**body, "thread": continue_from(first["id"])}, timeout=10)
    assert ok.status_code == 200
    again = requests.post(url, json={**body, "thread": continue_from(first["id"])}, timeout=10)
    assert again.status_code == 409
    assert again.json()["error"]["details"] == {"error_code": "thread_already_continued"}
    with_system = requests.post(
        url, json={**body, "system": "x", "thread": continue_from(ok.json()["id"])}, timeout=10
    )
    assert with_system.status_code == 400
    assert with_system.json()["error"]["message"].startswith("system: cannot be sent")
