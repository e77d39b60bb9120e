"""Per-key limits for the whole service: the official SDK and plain HTTP against one real
gunicorn with four gevent workers sharing the SQLite store, where every limit is exact however
the requests spread over workers and connections (what a key's limits ask of the store and how
their refusals read, pure: tests/unit/policy/test_limits.py)."""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import anthropic
import pytest
import requests
from fakebackend import FakeBackend, JSONReply, StreamReply, chunks, completion, error_body
from servers import Gunicorn
from waiting import eventually

from app.state.sqlite_store import SQLiteStore

BODY = {
    "model": "claude-haiku-4-5",
    "max_tokens": 20,
    "messages": [{"role": "user", "content": "hi"}],
}


# --- through real gunicorn: four workers, one SQLite store -----------------------------------

ADMIN = "admin-token-limits-0123"
KEYS = {
    # A token comes back every two minutes: none can while a test sends its few requests.
    "rate": {"requests_per_minute": 0.5, "burst": 2},
    # One comes back in five seconds, so the refused request is sure to be refused and the
    # SDK's retry (Retry-After: at most 5) is sure to get through.
    "retry": {"requests_per_minute": 12, "burst": 1},
    "exact": {"requests_per_minute": 1, "burst": 5},
    "alive": {"requests_per_minute": 1, "burst": 5},
    "stream": {"max_concurrent": 1},
    "hangup": {"max_concurrent": 1, "output_tokens_per_minute": 1000},
    "slow": {"max_concurrent": 1},
    "failing": {"max_concurrent": 1},
    "output": {"output_tokens_per_minute": 100},
    "daily": {"tokens_per_day": 200},
    "counting": {"requests_per_minute": 0.5, "burst": 2, "tokens_per_day": 1},
    "count_slot": {"max_concurrent": 1},
    "free": {},
}


def secret(name: str) -> str:
    return f"sk-gw-{name}-0123456789"


def config_text(backend: FakeBackend, keys: dict[str, dict[str, Any]]) -> str:
    lines = [f'[upstream]\nurl = "{backend.url}"\n[admin]\ntoken = "{ADMIN}"\n']
    for name, limits in keys.items():
        digest = hashlib.sha256(secret(name).encode()).hexdigest()
        lines.append(f'[[auth.keys]]\nname = "{name}"\nsha256 = "{digest}"\n')
        lines += [f"{field} = {value}\n" for field, value in limits.items()]
    return "".join(lines)


def start(backend: FakeBackend, directory: Path, keys: dict, **env: str) -> Gunicorn:
    config = directory / "gateway.toml"
    config.write_text(config_text(backend, keys))
    return Gunicorn(
        {"GATEWAY_CONFIG": str(config), "GATEWAY_RETRIES": "0", **env},
        directory / "gunicorn.log",
    )


@pytest.fixture(scope="module")
def server(module_backend: FakeBackend, tmp_path_factory) -> Iterator[Gunicorn]:
    gunicorn = start(module_backend, tmp_path_factory.mktemp("limits"), KEYS, GATEWAY_WORKERS="4")
    yield gunicorn
    gunicorn.stop()


def sdk(server: Gunicorn, name: str, **kwargs: Any) -> anthropic.Anthropic:
    kwargs.setdefault("max_retries", 0)
    return anthropic.Anthropic(base_url=server.url, api_key=secret(name), **kwargs)


def post(server: Gunicorn, name: str, **extra: Any) -> requests.Response:
    headers = {"x-api-key": secret(name), "connection": "close"}  # a new connection each time
    return requests.post(
        server.url + "/v1/messages", json={**BODY, **extra}, headers=headers, timeout=10
    )


def open_stream(server: Gunicorn, name: str, **extra: Any) -> tuple[Any, Any]:
    """A stream under way: its first text delta has arrived."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    headers = {"Content-Type": "application/json", "x-api-key": secret(name)}
    conn.request("POST", "/v1/messages", json.dumps({**BODY, "stream": True, **extra}), headers)
    response = conn.getresponse()
    assert response.status == 200
    while not response.readline().startswith(b"event: content_block_delta"):
        pass
    return conn, response


def admin(server: Gunicorn, path: str) -> Any:
    reply = requests.get(server.url + path, headers={"x-api-key": ADMIN}, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


def usage_of(server: Gunicorn, key: str, requests: int | None = None) -> dict[str, int]:
    """The key's usage totals, once they count ``requests`` requests if given (a stream
    settles when it closes, a moment after its client has read it)."""

    def total() -> dict[str, int]:
        return admin(server, f"/admin/usage?key={key}&by=key")["total"]

    if requests is None:
        return total()
    return eventually(
        lambda: (now := total())["requests"] == requests and now,
        f"usage of {key} counting {requests} requests",
    )


def in_flight(server: Gunicorn, key: str) -> int:
    return admin(server, "/status")["keys"][key]["in_flight"]


def rejections(server: Gunicorn, reason: str, key: str) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    prefix = f'gateway_requests_rejected_total{{key="{key}",reason="{reason}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def test_over_the_rate_is_a_rate_limit_error_with_the_rate_headers(server):
    with sdk(server, "rate") as client:
        first = client.messages.with_raw_response.create(**BODY)
        assert first.headers["anthropic-ratelimit-requests-limit"] == "2"
        assert first.headers["anthropic-ratelimit-requests-remaining"] == "1"
        reset = parsedate_to_datetime(first.headers["date"])
        assert first.headers["anthropic-ratelimit-requests-reset"] >= reset.strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        client.messages.create(**BODY)
        with pytest.raises(anthropic.RateLimitError) as caught:
            client.messages.create(**BODY)
    error = caught.value
    assert error.status_code == 429
    assert error.body["error"]["type"] == "rate_limit_error"
    assert 60 < int(error.response.headers["retry-after"]) <= 120  # the next token's two minutes
    assert error.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert "'rate' is over its 0.5 requests per minute (burst 2)" in error.body["error"]["message"]
    assert rejections(server, "rate_limited", "rate") == 1


def test_the_sdk_waits_for_retry_after_and_gets_through(server, module_backend):
    with sdk(server, "retry", max_retries=1) as client:
        client.messages.create(**BODY)
        started = time.monotonic()
        message = client.messages.create(**BODY)  # refused once, retried after Retry-After
        waited = time.monotonic() - started
    assert message.content[0].text == "Hello"
    assert 1 < waited < 30
    assert rejections(server, "rate_limited", "retry") == 1


def test_the_burst_is_exact_across_four_workers_on_many_connections(server):
    # 20 requests at once, each on its own connection, spread over the four workers: the key's
    # burst of 5 lets exactly 5 through (no refill to speak of: one request a minute).
    with ThreadPoolExecutor(20) as pool:
        statuses = sorted(pool.map(lambda _: post(server, "exact").status_code, range(20)))
    assert statuses == [200] * 5 + [429] * 15
    lines = [line for line in server.access_lines() if line.get("key") == "exact"]
    assert len({line["worker"] for line in lines}) > 1  # the workers really shared it


def test_the_burst_is_exact_on_one_keep_alive_connection(server):
    # One connection is one worker: with per-worker limits it would get a quarter of the burst.
    with requests.Session() as session:
        session.headers["x-api-key"] = secret("alive")
        statuses = [
            session.post(server.url + "/v1/messages", json=BODY, timeout=10).status_code
            for _ in range(8)
        ]
    assert statuses == [200] * 5 + [429] * 3


def test_output_tokens_reserve_max_tokens_and_settle_to_what_was_used(server, module_backend):
    # 100 output tokens a minute; each request reserves max_tokens=60 and uses 5 (the fake
    # backend's usage). Without settlement the second request would be refused.
    for _ in range(4):
        reply = post(server, "output", max_tokens=60)
        assert reply.status_code == 200, reply.text
        assert reply.headers["anthropic-ratelimit-output-tokens-limit"] == "100"
        assert int(reply.headers["anthropic-ratelimit-output-tokens-remaining"]) < 45
    too_big = post(server, "output", max_tokens=101)
    assert too_big.status_code == 429
    assert too_big.headers["x-should-retry"] == "false" and "retry-after" not in too_big.headers
    message = too_big.json()["error"]["message"]
    assert "100 output tokens per minute, less than this request reserves" in message
    assert too_big.headers["anthropic-ratelimit-output-tokens-limit"] == "100"
    assert usage_of(server, "output", requests=4)["output_tokens"] == 4 * 5


def test_a_daily_budget_is_spent_by_real_usage_then_refuses(server, module_backend):
    # 200 tokens a day; each request reserves its estimate and max_tokens=20, and really uses
    # 10 input and 5 output tokens: about thirteen fit in the budget, then it is spent.
    statuses = [post(server, "daily").status_code for _ in range(20)]
    admitted = statuses.count(200)
    assert statuses == [200] * admitted + [429] * (20 - admitted)
    assert 8 <= admitted <= 13
    refused = post(server, "daily")
    assert "daily budget of 200 tokens" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) > 0  # the day's end
    used = usage_of(server, "daily", requests=admitted)
    assert used["requests"] == admitted
    assert used["input_tokens"] + used["output_tokens"] == admitted * 15 <= 200


def test_one_open_stream_holds_the_only_slot_until_it_ends(server, module_backend):
    # Five seconds of stream: it is still open when the next request comes, however slowly.
    module_backend.reply(StreamReply(chunks([f"t{i} " for i in range(20)]), delay=0.25))
    conn, response = open_stream(server, "stream")
    try:
        with sdk(server, "stream") as client:
            with pytest.raises(anthropic.RateLimitError) as caught:
                client.messages.create(**BODY)
        assert caught.value.response.headers["retry-after"] == "1"
        assert "already has 1 requests in flight" in caught.value.body["error"]["message"]
        assert in_flight(server, "stream") == 1
        assert b"event: message_stop" in response.read()  # the stream runs to its end
    finally:
        conn.close()
    eventually(lambda: in_flight(server, "stream") == 0, "the stream's slot given back")
    assert post(server, "stream").status_code == 200  # and the slot is free again
    assert post(server, "stream", stream=True).status_code == 200
    assert post(server, "stream").status_code == 200
    assert rejections(server, "concurrency", "stream") == 1


def test_a_client_that_hangs_up_mid_stream_frees_its_slot_and_settles_its_tokens(
    server, module_backend
):
    # The stream carries no usage before it ends, so what the client got is what counts: its
    # slot comes back, max_tokens=500 of reservation is settled to the text streamed so far.
    closed = module_backend.closed_by_client
    pieces = [f"word{i} " for i in range(400)]
    module_backend.reply(StreamReply(chunks(pieces, usage=None), delay=0.02))
    conn, _ = open_stream(server, "hangup", max_tokens=500)
    assert post(server, "hangup").status_code == 429
    time.sleep(0.3)
    conn.close()  # hang up mid-stream
    assert module_backend.wait_closed(closed + 1, timeout=30)
    eventually(lambda: in_flight(server, "hangup") == 0, "the hung-up stream's slot given back")
    used = usage_of(server, "hangup", requests=1)
    assert 0 < used["output_tokens"] < 500
    assert used["input_tokens"] > 0  # the estimate stands: the backend read the prompt
    after = post(server, "hangup", max_tokens=20)
    assert after.status_code == 200
    remaining = int(after.headers["anthropic-ratelimit-output-tokens-remaining"])
    assert 1000 - used["output_tokens"] - 20 - 5 <= remaining <= 1000 - 20


def test_a_slow_json_request_holds_its_slot_too(server, module_backend):
    module_backend.reply(JSONReply(completion("slow"), delay=5.0))  # outlasts the refused one
    results: list[int] = []
    worker = threading.Thread(target=lambda: results.append(post(server, "slow").status_code))
    worker.start()
    eventually(lambda: in_flight(server, "slow") == 1, "the slow request holding its slot")
    assert post(server, "slow").status_code == 429
    worker.join(timeout=30)
    assert results == [200]
    assert post(server, "slow").status_code == 200


def test_a_failed_request_frees_its_slot_and_counts_as_an_error(server, module_backend):
    module_backend.reply(
        JSONReply(error_body("boom"), status=500),
        StreamReply(chunks(["a", "b", "c"]), cut_after=2),
    )
    assert post(server, "failing").status_code == 500
    broken = post(server, "failing", stream=True)  # the backend drops the stream midway
    assert broken.status_code == 200 and "event: error" in broken.text
    assert post(server, "failing").status_code == 200
    used = usage_of(server, "failing", requests=3)
    assert used["errors"] == 2


def test_a_key_without_limits_is_never_limited_and_gets_no_rate_headers(server):
    for _ in range(5):
        reply = post(server, "free")
        assert reply.status_code == 200
        assert "anthropic-ratelimit-requests-limit" not in reply.headers
    assert usage_of(server, "free", requests=5)["requests"] == 5


def test_listing_models_is_not_limited(server):
    with sdk(server, "retry") as client:
        for _ in range(5):
            assert client.models.list() is not None


def test_token_counts_are_held_to_the_request_rate_but_spend_no_tokens(server):
    # A daily budget of one token: no message fits, yet counting, which spends none, does,
    # as long as the key's request rate (a burst of two) lets it.
    with sdk(server, "counting") as client:
        with pytest.raises(anthropic.RateLimitError):
            client.messages.create(**BODY)
        for _ in range(2):
            counted = client.messages.with_raw_response.count_tokens(
                model="m", messages=BODY["messages"]
            )
            assert counted.parse().input_tokens > 0
        assert counted.headers["anthropic-ratelimit-requests-remaining"] == "0"
        with pytest.raises(anthropic.RateLimitError) as caught:
            client.messages.count_tokens(model="m", messages=BODY["messages"])
    error = caught.value
    assert error.body["error"]["type"] == "rate_limit_error"
    assert (
        "'counting' is over its 0.5 requests per minute (burst 2)" in error.body["error"]["message"]
    )
    assert 60 < int(error.response.headers["retry-after"]) <= 120
    assert error.response.headers["anthropic-ratelimit-requests-limit"] == "2"
    assert rejections(server, "rate_limited", "counting") == 1
    assert usage_of(server, "counting")["requests"] == 0  # counts make no usage records


def test_a_token_count_needs_a_free_slot_of_its_key_and_gives_it_back(server, module_backend):
    # Five seconds of stream: it is still open when the next request comes, however slowly.
    module_backend.reply(StreamReply(chunks([f"t{i} " for i in range(20)]), delay=0.25))
    conn, response = open_stream(server, "count_slot")
    try:
        with sdk(server, "count_slot") as client:
            with pytest.raises(anthropic.RateLimitError) as caught:
                client.messages.count_tokens(model="m", messages=BODY["messages"])
            assert "already has 1 requests in flight" in caught.value.body["error"]["message"]
            assert b"event: message_stop" in response.read()
    finally:
        conn.close()
    eventually(lambda: in_flight(server, "count_slot") == 0, "the stream's slot given back")
    with sdk(server, "count_slot") as client:
        for _ in range(3):  # each count gives its slot back
            assert client.messages.count_tokens(model="m", messages=BODY["messages"]).input_tokens
    assert in_flight(server, "count_slot") == 0
    assert post(server, "count_slot").status_code == 200


def test_after_all_of_it_no_key_holds_a_slot(server):
    def idle() -> bool:
        return all(v["in_flight"] == 0 for v in admin(server, "/status")["keys"].values())

    eventually(idle, "every key's slots given back")
    assert set(admin(server, "/status")["keys"]) == set(KEYS)


def test_a_worker_on_its_way_out_writes_the_usage_it_has_not_written_yet(module_backend, tmp_path):
    # Usage is written a second at a time; a gateway stopped at once still keeps all of it.
    server = start(module_backend, tmp_path, {"free": {}}, GATEWAY_WORKERS="2")
    try:
        assert [post(server, "free").status_code for _ in range(7)] == [200] * 7
    finally:
        server.stop()
    store = SQLiteStore(str(server.log_path.with_suffix(".state")))
    try:
        (row,) = store.usage("2000-01-01", "2999-12-31", "free", None)
    finally:
        store.close()
    assert (row.requests, row.input_tokens, row.output_tokens) == (7, 70, 35)
