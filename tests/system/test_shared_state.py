"""Several gateways on one Redis: a key's limits and usage are the service's, whichever host
answers; and a Redis that goes away and comes back is lived through as configured (open:
unlimited and loud; closed: 503 ``overloaded_error``), with no worker lost and no restart."""

from __future__ import annotations

import hashlib
import http.client
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import requests
from fakebackend import FakeBackend, StreamReply, chunks
from servers import Gunicorn, RedisServer, redis_available
from waiting import eventually

ADMIN = "admin-token-shared-0123"
BODY = {
    "model": "claude-haiku-4-5",
    "max_tokens": 20,
    "messages": [{"role": "user", "content": "hi"}],
}
KEYS = {
    "team": {"requests_per_minute": 1, "burst": 4},
    "pair": {"requests_per_minute": 1, "burst": 12},
    "solo": {"max_concurrent": 1},
    "guarded": {"requests_per_minute": 1, "burst": 2},
    "threads": {},
}

pytestmark = pytest.mark.skipif(
    not redis_available(), reason="redis-server is not installed (apt-get install redis-server)"
)


def secret(name: str) -> str:
    return f"sk-gw-{name}-shared-0123456789"


def start(backend: FakeBackend, directory: Path, redis_url: str, **extra: str) -> Gunicorn:
    lines = [f'[upstream]\nurl = "{backend.url}"\n[admin]\ntoken = "{ADMIN}"\n']
    for name, limits in KEYS.items():
        digest = hashlib.sha256(secret(name).encode()).hexdigest()
        lines.append(f'[[auth.keys]]\nname = "{name}"\nsha256 = "{digest}"\n')
        lines += [f"{field} = {value}\n" for field, value in limits.items()]
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "gateway.toml"
    config.write_text("".join(lines))
    env = {
        "GATEWAY_CONFIG": str(config),
        "GATEWAY_RETRIES": "0",
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_WORKERS": "2",
        **extra,
    }
    return Gunicorn(env, directory / "gunicorn.log")


@pytest.fixture(scope="module")
def hosts(module_backend, redis_server, tmp_path_factory) -> Iterator[tuple[Gunicorn, Gunicorn]]:
    """Two gateways, as on two hosts behind one load balancer: nothing shared but Redis."""
    base = tmp_path_factory.mktemp("hosts")
    with ExitStack() as started:  # the first is stopped too if the second fails to start
        first = start(module_backend, base / "a", redis_server.url)
        started.callback(first.stop)
        second = start(module_backend, base / "b", redis_server.url)
        started.callback(second.stop)
        yield first, second


def post(gateway: Gunicorn, name: str, **extra: Any) -> requests.Response:
    headers = {"x-api-key": secret(name), "connection": "close"}
    return requests.post(
        gateway.url + "/v1/messages", json={**BODY, **extra}, headers=headers, timeout=10
    )


def admin(gateway: Gunicorn, path: str) -> Any:
    reply = requests.get(gateway.url + path, headers={"x-api-key": ADMIN}, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


def metric(gateway: Gunicorn, name: str) -> float | None:
    for line in requests.get(gateway.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_a_burst_is_shared_by_two_hosts(hosts):
    first, second = hosts
    replies = [post(host, "team") for host in (first, second, first, second, first, second)]
    assert [r.status_code for r in replies] == [200, 200, 200, 200, 429, 429]
    remaining = [r.headers["anthropic-ratelimit-requests-remaining"] for r in replies[:4]]
    assert remaining == ["3", "2", "1", "0"]  # the service's count, not one host's


def test_requests_at_once_on_both_hosts_get_exactly_the_burst(hosts):
    first, second = hosts
    with ThreadPoolExecutor(24) as pool:
        statuses = list(pool.map(lambda i: post(hosts[i % 2], "pair").status_code, range(24)))
    assert sorted(statuses) == [200] * 12 + [429] * 12
    # Either host reports the usage of both (each worker writes its records once a second).
    for host in (first, second):
        eventually(
            lambda h=host: admin(h, "/admin/usage?key=pair&by=key")["total"]["requests"] == 12,
            "both hosts' usage reported",
        )


def test_a_stream_on_one_host_holds_the_keys_only_slot_on_the_other(hosts, module_backend):
    first, second = hosts
    # ~6 s of stream: still open when the other host is asked, however slow the machine
    module_backend.reply(StreamReply(chunks([f"t{i} " for i in range(30)]), delay=0.2))
    conn = http.client.HTTPConnection("127.0.0.1", first.port, timeout=30)
    headers = {"Content-Type": "application/json", "x-api-key": secret("solo")}
    conn.request("POST", "/v1/messages", json.dumps({**BODY, "stream": True}), headers)
    response = conn.getresponse()
    while not response.readline().startswith(b"event: content_block_delta"):
        pass
    try:
        refused = post(second, "solo")
        assert refused.status_code == 429
        assert "already has 1 requests in flight" in refused.json()["error"]["message"]
        assert admin(second, "/status")["keys"]["solo"]["in_flight"] == 1
        response.read()
    finally:
        conn.close()
    # The slot is given back once the first host has finished the stream, after its last byte.
    eventually(lambda: not admin(second, "/status")["keys"]["solo"]["in_flight"], "slot freed")
    assert post(second, "solo").status_code == 200


def test_a_thread_created_on_one_host_is_continued_on_the_other(hosts, module_backend):
    first, second = hosts
    created = post(first, "threads", thread={"type": "create"})
    assert created.status_code == 200
    seen = len(module_backend.requests)
    follow = {"thread": {"type": "continue", "previous_message_id": created.json()["id"]}}
    continued = post(second, "threads", messages=[{"role": "user", "content": "more"}], **follow)
    assert continued.status_code == 200, continued.text
    sent = module_backend.requests[seen].json["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    again = post(first, "threads", **follow)  # the first host knows it was continued
    assert again.status_code == 409
    assert again.json()["error"]["details"]["error_code"] == "thread_already_continued"


# --- Redis goes away and comes back ----------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


def worker_pids(gateway: Gunicorn) -> set[int]:
    return {line["worker"] for line in gateway.access_lines()}


def test_store_outage_fails_open_loudly_and_recovers_by_itself(module_backend, own_redis, tmp_path):
    gateway = start(module_backend, tmp_path / "gw", own_redis.url)
    try:
        assert [post(gateway, "guarded").status_code for _ in range(3)] == [200, 200, 429]
        own_redis.stop()
        during = [post(gateway, "guarded") for _ in range(6)]
        assert [r.status_code for r in during] == [200] * 6  # open: let through, unlimited
        assert "anthropic-ratelimit-requests-limit" not in during[-1].headers
        assert metric(gateway, "gateway_state_store_up") == 0
        assert "state store unavailable, letting requests through unlimited" in (
            gateway.log_path.read_text()
        )
        status = admin(gateway, "/status")
        assert status["state"]["up"] is False or status["keys"]["guarded"]["in_flight"] is None
        own_redis.start()  # an empty Redis: the limits start again from a rested key
        eventually(lambda: post(gateway, "guarded").status_code == 429, "limits back on")
        # The worker that answered has found the store; the other finds it on its own (its
        # watcher pings every second), and the gauge is the lowest of the two until then.
        eventually(lambda: metric(gateway, "gateway_state_store_up") == 1, "the store up gauge")
        # Logged by whichever worker saw it go, which need not be the one that answered.
        eventually(lambda: "state store is back" in gateway.log_path.read_text(), "its return")
        assert gateway.process.poll() is None and len(worker_pids(gateway)) <= 2
    finally:
        gateway.stop()


def test_store_outage_fails_closed_with_503_overloaded_and_recovers(
    module_backend, own_redis, tmp_path
):
    gateway = start(
        module_backend, tmp_path / "gw", own_redis.url, GATEWAY_STATE_ON_FAILURE="closed"
    )
    try:
        assert post(gateway, "guarded").status_code == 200
        own_redis.stop()
        refused = post(gateway, "guarded")
        assert refused.status_code == 503
        assert refused.json()["error"]["type"] == "overloaded_error"
        assert "state store is unavailable" in refused.json()["error"]["message"]
        assert refused.headers["retry-after"] == "1"
        # Routes that need no store still answer.
        assert requests.get(gateway.url + "/healthz", timeout=5).status_code == 200
        own_redis.start()
        eventually(lambda: post(gateway, "guarded").status_code == 200, "requests admitted")
        assert gateway.process.poll() is None
    finally:
        gateway.stop()


def test_a_redis_down_at_start_is_found_once_it_is_up(module_backend, tmp_path):
    redis = RedisServer(tmp_path / "redis")
    redis.stop()
    gateway = start(module_backend, tmp_path / "gw", redis.url)  # starts: the store is lazy
    try:
        assert post(gateway, "guarded").status_code == 200
        redis.start()
        eventually(lambda: post(gateway, "guarded").status_code == 429, "limits on")
    finally:
        gateway.stop()
        redis.stop()
