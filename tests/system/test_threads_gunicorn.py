"""Message threads end to end: the official SDK's ``tool_runner`` (which threads by default)
through real gunicorn with four workers, streamed and not, including a thread the gateway lost
(the protocol itself, against a SQLite store: tests/unit/policy/test_threads.py)."""

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

SYSTEM = "You are terse."


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def continue_from(message_id: str) -> dict[str, str]:
    return {"type": "continue", "previous_message_id": message_id}


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


def turns(lines: list[dict[str, Any]]) -> list[tuple[int, str | None]]:
    """Each line's status and thread kind, in no particular order: a line is written once its
    answer has gone, so the client's next turn, on another worker, may be logged first (the
    order of the turns is what the backend received)."""
    return turns_of([(line["status"], line.get("thread")) for line in lines])


def turns_of(pairs: list[tuple[int, str | None]]) -> list[tuple[int, str | None]]:
    return sorted(pairs, key=lambda pair: (pair[0], pair[1] or ""))


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
        assert turns(lines) == turns_of([(200, "create"), (200, "continue"), (200, "continue")])
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
    assert turns(lines) == turns_of(
        [
            (200, "create"),
            (404, "continue"),  # lost: thread_not_found
            (200, "create"),  # the replay, with the whole history
            (200, "continue"),
        ]
    )
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
