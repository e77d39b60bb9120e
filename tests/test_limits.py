"""Per-key limits: the GCRA and concurrency maths with a hand-driven clock (app/limits.py), and
the official SDK against real gunicorn (gevent worker) with keys that have limits."""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import anthropic
import pytest
import requests
from fakebackend import FakeBackend, JSONReply, StreamReply, chunks, completion, error_body
from servers import Gunicorn

from app.config import ConfigError, Limits
from app.limits import KeyState, LimitExceeded, worker_count

BODY = {
    "model": "claude-haiku-4-5",
    "max_tokens": 20,
    "messages": [{"role": "user", "content": "hi"}],
}


def refused(state: KeyState, now: float) -> LimitExceeded:
    with pytest.raises(LimitExceeded) as caught:
        state.admit(now)
    return caught.value


# --- the rate: GCRA with a burst -------------------------------------------------------------


def test_a_rested_key_gets_its_burst_then_one_request_per_interval() -> None:
    state = KeyState("k", Limits(requests_per_minute=60, burst=3))  # one a second, three at once
    for _ in range(3):
        state.admit(100.0).release()
    error = refused(state, 100.0)
    assert (error.status, error.error_type, error.reason) == (
        429,
        "rate_limit_error",
        "rate_limited",
    )
    assert error.headers == {"retry-after": "1"}
    assert "'k' is limited to 60 requests per minute with a burst of 3" in error.message
    refused(state, 100.99)
    state.admit(101.0)  # one interval later, one more
    refused(state, 101.5)
    state.admit(102.0)


def test_the_bucket_refills_at_the_rate_up_to_the_burst_and_no_further() -> None:
    state = KeyState("k", Limits(requests_per_minute=60, burst=3))
    for _ in range(3):
        state.admit(0.0)
    assert state.remaining(0.0) == 0
    assert state.remaining(2.0) == 2
    assert state.remaining(1000.0) == 3  # a long rest fills the burst, not more
    for _ in range(3):
        state.admit(1000.0)
    refused(state, 1000.0)


def test_a_refused_request_uses_up_nothing() -> None:
    state = KeyState("k", Limits(requests_per_minute=60, burst=1))
    state.admit(0.0)
    for _ in range(50):
        refused(state, 0.5)  # a client hammering while refused does not push its wait back
    state.admit(1.0)


def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one() -> None:
    state = KeyState("k", Limits(requests_per_minute=6, burst=1))  # one per 10 s
    state.admit(0.0)
    assert refused(state, 0.0).headers["retry-after"] == "10"
    assert refused(state, 2.5).headers["retry-after"] == "8"  # 7.5 s to wait
    assert refused(state, 9.99).headers["retry-after"] == "1"


def test_burst_defaults_to_a_minutes_worth() -> None:
    state = KeyState("k", Limits(requests_per_minute=5))
    for _ in range(5):
        state.admit(0.0)
    refused(state, 0.0)
    assert refused(state, 0.0).headers["retry-after"] == "12"


def test_fractional_rate() -> None:
    state = KeyState("k", Limits(requests_per_minute=0.5, burst=1))  # one per two minutes
    state.admit(0.0)
    assert refused(state, 60.0).headers["retry-after"] == "60"
    state.admit(120.0)


@pytest.mark.parametrize(
    ("limits", "workers", "interval", "burst", "concurrent"),
    [
        (Limits(requests_per_minute=60, burst=10, max_concurrent=4), 1, 1.0, 10, 4),
        (Limits(requests_per_minute=60, burst=10, max_concurrent=4), 2, 2.0, 5, 2),
        (Limits(requests_per_minute=60, burst=10, max_concurrent=4), 3, 3.0, 4, 2),
        (Limits(requests_per_minute=60, burst=1, max_concurrent=1), 4, 4.0, 1, 1),
        (Limits(requests_per_minute=120), 4, 2.0, 30, 0),
    ],
    ids=["one_worker", "two_even", "three_rounded_up", "never_below_one", "default_burst"],
)
def test_each_worker_holds_its_share(
    limits: Limits, workers: int, interval: float, burst: int, concurrent: int
) -> None:
    state = KeyState("k", limits, workers)
    assert (state.interval, state.burst, state.max_concurrent) == (interval, burst, concurrent)
    for _ in range(burst):
        state.admit(0.0).release()
    error = refused(state, 0.0)
    assert error.headers["retry-after"] == str(int(interval))
    if workers > 1:
        assert f"this worker's 1/{workers} share" in error.message


def test_rate_headers_describe_the_answering_worker() -> None:
    state = KeyState("k", Limits(requests_per_minute=60, burst=3))
    state.admit(10.0)
    state.admit(10.0)
    wall = 1_800_000_000.2  # 2027-01-15T08:00:00.2Z
    assert dict(state.rate_headers(10.0, wall)) == {
        "anthropic-ratelimit-requests-limit": "3",
        "anthropic-ratelimit-requests-remaining": "1",
        "anthropic-ratelimit-requests-reset": "2027-01-15T08:00:03Z",  # full 2.0 s later
    }
    rested = dict(state.rate_headers(60.0, wall))
    assert rested["anthropic-ratelimit-requests-remaining"] == "3"
    assert rested["anthropic-ratelimit-requests-reset"] == "2027-01-15T08:00:01Z"


# --- requests in flight ----------------------------------------------------------------------


def test_max_concurrent_holds_until_a_lease_is_released() -> None:
    state = KeyState("k", Limits(max_concurrent=2))
    first = state.admit(0.0)
    state.admit(0.0)
    error = refused(state, 0.0)
    assert (error.reason, error.headers) == ("concurrency", {"retry-after": "1"})
    assert "already has 2 requests in flight" in error.message
    first.release()
    state.admit(0.0)
    refused(state, 0.0)


def test_a_lease_is_released_once_however_often_it_is_called() -> None:
    state = KeyState("k", Limits(max_concurrent=2))
    lease = state.admit(0.0)
    state.admit(0.0)
    lease.release()
    lease.release()  # e.g. the stream's end and the response's close both call it
    assert state.in_flight == 1


def test_a_request_refused_by_the_rate_takes_no_concurrency_slot() -> None:
    state = KeyState("k", Limits(requests_per_minute=60, burst=1, max_concurrent=5))
    state.admit(0.0)
    refused(state, 0.0)
    assert state.in_flight == 1


def test_a_key_without_limits_is_not_limited() -> None:
    state = KeyState("k", Limits(), 4)
    assert not state.limited
    assert KeyState("k", Limits(max_concurrent=1)).limited
    assert KeyState("k", Limits(requests_per_minute=1)).limited


@pytest.mark.parametrize(
    ("environ", "workers"),
    [
        ({}, 1),
        ({"GATEWAY_WORKERS": ""}, 1),
        ({"GATEWAY_WORKERS": "4"}, 4),
        ({"GATEWAY_WORKERS": "0"}, 1),
    ],
)
def test_worker_count_comes_from_gateway_workers(environ: dict[str, str], workers: int) -> None:
    assert worker_count(environ) == workers


def test_worker_count_that_is_not_a_number_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="^GATEWAY_WORKERS: must be an integer"):
        worker_count({"GATEWAY_WORKERS": "many"})


# --- through real gunicorn with the official SDK ---------------------------------------------

KEYS = {
    "rate": {"requests_per_minute": 60, "burst": 2},
    "retry": {"requests_per_minute": 60, "burst": 1},
    "stream": {"max_concurrent": 1},
    "hangup": {"max_concurrent": 1},
    "slow": {"max_concurrent": 1},
    "failing": {"max_concurrent": 1},
    "free": {},
}


def secret(name: str) -> str:
    return f"sk-gw-{name}-0123456789"


def config_text(backend: FakeBackend, keys: dict[str, dict[str, Any]]) -> str:
    lines = [f'[upstream]\nurl = "{backend.url}"\n']
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
    gunicorn = start(module_backend, tmp_path_factory.mktemp("limits"), KEYS)
    yield gunicorn
    gunicorn.stop()


def sdk(server: Gunicorn, name: str, **kwargs: Any) -> anthropic.Anthropic:
    kwargs.setdefault("max_retries", 0)
    return anthropic.Anthropic(base_url=server.url, api_key=secret(name), **kwargs)


def post(server: Gunicorn, name: str, **extra: Any) -> requests.Response:
    headers = {"x-api-key": secret(name)}
    return requests.post(
        server.url + "/v1/messages", json={**BODY, **extra}, headers=headers, timeout=10
    )


def open_stream(server: Gunicorn, name: str) -> tuple[http.client.HTTPConnection, Any]:
    """A stream under way: its first text delta has arrived."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    headers = {"Content-Type": "application/json", "x-api-key": secret(name)}
    conn.request("POST", "/v1/messages", json.dumps({**BODY, "stream": True}), headers)
    response = conn.getresponse()
    assert response.status == 200
    while not response.readline().startswith(b"event: content_block_delta"):
        pass
    return conn, response


def rejections(server: Gunicorn, reason: str, key: str) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    prefix = f'gateway_requests_rejected_total{{key="{key}",reason="{reason}"}} '
    return sum(float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def test_over_the_rate_is_a_rate_limit_error_with_retry_after(server):
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
    assert error.response.headers["retry-after"] == "1"
    assert "'rate' is limited to 60 requests per minute" in error.body["error"]["message"]
    assert rejections(server, "rate_limited", "rate") == 1


def test_the_sdk_waits_for_retry_after_and_gets_through(server, module_backend):
    with sdk(server, "retry", max_retries=1) as client:
        client.messages.create(**BODY)
        started = time.monotonic()
        message = client.messages.create(**BODY)  # refused once, retried after 1 s
        waited = time.monotonic() - started
    assert message.content[0].text == "Hello"
    assert 0.9 < waited < 5
    assert rejections(server, "rate_limited", "retry") == 1


def test_one_open_stream_holds_the_only_slot_until_it_ends(server, module_backend):
    module_backend.reply(StreamReply(chunks([f"t{i} " for i in range(20)]), delay=0.05))
    conn, response = open_stream(server, "stream")
    try:
        with sdk(server, "stream") as client:
            with pytest.raises(anthropic.RateLimitError) as caught:
                client.messages.create(**BODY)
        assert caught.value.response.headers["retry-after"] == "1"
        assert "already has 1 requests in flight" in caught.value.body["error"]["message"]
        assert b"event: message_stop" in response.read()  # the stream runs to its end
    finally:
        conn.close()
    assert post(server, "stream").status_code == 200  # and the slot is free again
    assert post(server, "stream", stream=True).status_code == 200
    assert post(server, "stream").status_code == 200
    assert rejections(server, "concurrency", "stream") == 1


def test_a_client_that_hangs_up_mid_stream_frees_its_slot(server, module_backend):
    closed = module_backend.closed_by_client
    module_backend.reply(StreamReply(chunks([f"t{i} " for i in range(400)]), delay=0.02))
    conn, _ = open_stream(server, "hangup")
    assert post(server, "hangup").status_code == 429
    conn.close()  # hang up mid-stream
    assert module_backend.wait_closed(closed + 1, timeout=5)
    assert post(server, "hangup").status_code == 200


def test_a_slow_json_request_holds_its_slot_too(server, module_backend):
    module_backend.reply(JSONReply(completion("slow"), delay=1.0))
    results: list[int] = []
    worker = threading.Thread(target=lambda: results.append(post(server, "slow").status_code))
    worker.start()
    time.sleep(0.4)
    assert post(server, "slow").status_code == 429
    worker.join(timeout=10)
    assert results == [200]
    assert post(server, "slow").status_code == 200


def test_a_failed_request_frees_its_slot(server, module_backend):
    module_backend.reply(
        JSONReply(error_body("boom"), status=500),
        StreamReply(chunks(["a", "b", "c"]), cut_after=2),
    )
    assert post(server, "failing").status_code == 500
    broken = post(server, "failing", stream=True)  # the backend drops the stream midway
    assert broken.status_code == 200 and "event: error" in broken.text
    assert post(server, "failing").status_code == 200


def test_a_key_without_limits_is_never_limited_and_gets_no_rate_headers(server):
    for _ in range(5):
        reply = post(server, "free")
        assert reply.status_code == 200
        assert "anthropic-ratelimit-requests-limit" not in reply.headers


def test_limits_apply_to_messages_only(server):
    with sdk(server, "retry") as client:
        for _ in range(5):
            assert client.messages.count_tokens(model="m", messages=BODY["messages"]).input_tokens
            assert client.models.list() is not None


def test_every_worker_holds_its_share_of_the_limit(module_backend, tmp_path):
    keys = {"shared": {"requests_per_minute": 60, "burst": 2}}
    server = start(module_backend, tmp_path, keys, GATEWAY_WORKERS="2")
    try:
        with requests.Session() as session:  # one keep-alive connection: one worker
            session.headers["x-api-key"] = secret("shared")
            first = session.post(server.url + "/v1/messages", json=BODY, timeout=10)
            second = session.post(server.url + "/v1/messages", json=BODY, timeout=10)
    finally:
        server.stop()
    assert first.status_code == 200
    assert first.headers["anthropic-ratelimit-requests-limit"] == "1"
    assert second.status_code == 429
    assert second.headers["retry-after"] == "2"
    assert "this worker's 1/2 share" in second.json()["error"]["message"]
