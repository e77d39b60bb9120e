"""Routes of replicas under real gunicorn with several workers: ``affinity`` sends each
conversation's turns to one replica, whichever worker (or host, over one Redis) takes them,
within a load bound; ``least_busy`` counts the whole service's requests in flight."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import requests
from fakebackend import AutoReply, FakeBackend, JSONReply, Recorded, completion
from servers import Gunicorn, RedisServer, free_port, redis_available
from waiting import eventually

SYSTEM = [
    {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.3a3; cch=7f3a9;"},
    {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
]
TOOLS = [{"name": "Read", "description": "read a file", "input_schema": {"type": "object"}}]


ADMIN = "admin-token-fleet-0123"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


class SlowReply(JSONReply):
    """An answer after ``delay`` seconds: requests stay in flight meanwhile."""


def slow(seconds: float) -> SlowReply:
    return SlowReply(completion("ok"), delay=seconds)


@pytest.fixture
def replicas() -> Iterator[list[FakeBackend]]:
    with ExitStack() as stack:
        yield [stack.enter_context(FakeBackend()) for _ in range(3)]


def config(
    directory: Path, backends: list[FakeBackend], strategy: str = "affinity", **routing: Any
) -> Path:
    lines = []
    for i, backend in enumerate(backends):
        lines.append(f'[[backends]]\nname = "r{i}"\nurl = "{backend.url}"\n')
    targets = ", ".join(f'{{ backend = "r{i}" }}' for i in range(len(backends)))
    lines.append(
        f'[[routes]]\nname = "fleet"\nmatch = "*"\nstrategy = "{strategy}"\ntargets = [{targets}]\n'
    )
    lines.append("[routing]\n" + "".join(f"{k} = {v}\n" for k, v in routing.items()))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "gateway.toml"
    path.write_text("".join(lines))
    return path


def gateway(path: Path, workers: int = 4, **env: str) -> Gunicorn:
    return Gunicorn(
        {"GATEWAY_CONFIG": str(path), "GATEWAY_WORKERS": str(workers), **env},
        path.parent / f"gunicorn-{uuid.uuid4().hex[:6]}.log",
    )


class Conversation:
    """A Claude Code-shaped conversation: the same system prompt and tools as every other, an
    opening of its own, a turn added each time."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.messages: list[dict[str, Any]] = [
            {"role": "user", "content": f"<system-reminder>shared</system-reminder> {name}"}
        ]

    def body(self) -> dict[str, Any]:
        return {
            "model": "claude-sonnet-4-6",
            "max_tokens": 16,
            "system": SYSTEM,
            "tools": TOOLS,
            "messages": self.messages,
        }

    def send(self, url: str, headers: dict[str, str] | None = None) -> requests.Response:
        response = requests.post(
            f"{url}/v1/messages", json=self.body(), headers=headers, timeout=30
        )
        assert response.status_code == 200, response.text
        turn = len(self.messages)
        self.messages = self.messages + [
            {"role": "assistant", "content": response.json()["content"]},
            {"role": "user", "content": f"{self.name} turn {turn}"},
        ]
        return response


def served_by(replicas: list[FakeBackend], name: str) -> list[int]:
    """The replica that received each of conversation ``name``'s requests."""
    return [
        index
        for index, replica in enumerate(replicas)
        for request in replica.requests
        if _opening(request).endswith(f" {name}")
    ]


def _opening(request: Recorded) -> str:
    body = request.json if isinstance(request.json, dict) else {}
    messages = body.get("messages") or []
    first = next((m for m in messages if m.get("role") == "user"), {})
    content = first.get("content", "")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def replica_of(replicas: list[FakeBackend], name: str) -> set[int]:
    return set(served_by(replicas, name))


def routed(server: Gunicorn, count: int) -> list[str | None]:
    """Why each of the first ``count`` requests went where it did (their access lines are
    written a moment after their answers)."""

    def lines() -> list[dict[str, Any]]:
        found = [x for x in server.access_lines() if x["path"] == "/v1/messages"]
        return found if len(found) >= count else []

    return [line.get("routed") for line in eventually(lines, f"{count} access lines")]


def test_each_conversation_stays_on_one_replica_across_workers(replicas, tmp_path):
    server = gateway(config(tmp_path, replicas))
    try:
        conversations = [Conversation(f"c{i}-{uuid.uuid4().hex[:8]}") for i in range(8)]
        for _ in range(4):
            for conv in conversations:
                conv.send(server.url)
        reasons = routed(server, 32)
        lines = [x for x in server.access_lines() if x["path"] == "/v1/messages"]
    finally:
        server.stop()
    for conv in conversations:
        assert len(served_by(replicas, conv.name)) == 4
        assert len(replica_of(replicas, conv.name)) == 1, conv.name
    used = set().union(*(replica_of(replicas, c.name) for c in conversations))
    assert len(used) > 1  # new conversations are spread over the replicas
    assert len({x["worker"] for x in lines}) > 1  # and several workers took the turns
    assert sorted(reasons) == ["new"] * 8 + ["prefix"] * 24


@pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")
def test_two_gateways_on_one_redis_route_a_conversation_alike(replicas, tmp_path):
    redis = RedisServer(tmp_path / "redis")
    try:
        env = {"GATEWAY_REDIS_URL": redis.url}
        with ExitStack() as started:
            hosts = []
            for name in ("a", "b"):
                host = gateway(config(tmp_path / name, replicas), workers=2, **env)
                started.callback(host.stop)
                hosts.append(host)
            conversations = [Conversation(f"h{i}-{uuid.uuid4().hex[:8]}") for i in range(6)]
            for turn in range(4):
                for i, conv in enumerate(conversations):
                    conv.send(hosts[(turn + i) % 2].url)  # each turn on the other host
            reasons = routed(hosts[0], 12) + routed(hosts[1], 12)
    finally:
        redis.stop()
    for conv in conversations:
        assert len(replica_of(replicas, conv.name)) == 1, conv.name
    # Each host found the turns the other one placed: the memory is the service's.
    assert sorted(reasons) == ["new"] * 6 + ["prefix"] * 18


def test_a_replica_over_its_load_bound_spills_and_the_conversation_stays_there(replicas, tmp_path):
    two = replicas[:2]
    server = gateway(config(tmp_path, two, affinity_hit_factor=1.5))
    try:
        opening = Conversation(f"s-{uuid.uuid4().hex[:8]}")
        opening.send(server.url)
        (home,) = replica_of(two, opening.name)
        for replica in two:
            replica.default = slow(1.5)
        # Six follow-ups of the same conversation at once (each its own next message): the
        # first three fit its replica's bound (1.5 x the average), the rest spill.
        branches: dict[str, Conversation] = {}
        for i in range(6):
            branch = Conversation(opening.name)
            branch.messages = opening.messages[:-1] + [{"role": "user", "content": f"b{i}"}]
            branches[f"b{i}"] = branch
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda b: b.send(server.url), branches.values()))
        # In the order they were placed, home holding k - 1 and the other replica s: the
        # k-th fits while k - s <= ceil(1.5 * k / 2): k = 1, 2, 3 do; the 4th spills; with
        # one on the other replica, the 5th and 6th fit again.
        assert sorted(routed(server, 7)[1:]) == ["prefix"] * 5 + ["spilled"]
        for replica in two:
            replica.default = AutoReply()
        other = two[1 - home]
        (spilled,) = [_user_texts(r)[1] for r in other.requests]
        branches[spilled].send(server.url)  # its next turn goes where it spilled to
        assert routed(server, 8)[-1] == "prefix"
        assert _user_texts(other.requests[-1])[1:] == [spilled, f"{opening.name} turn 3"]
    finally:
        server.stop()


def _user_texts(request: Recorded) -> list[str]:
    body = request.json if isinstance(request.json, dict) else {}
    return [m["content"] for m in body.get("messages") or [] if m.get("role") == "user"]


def test_a_dead_replicas_conversations_move_once_and_stay(replicas, tmp_path):
    server = gateway(config(tmp_path, replicas), workers=2, GATEWAY_RETRIES="2")
    try:
        conversations = [Conversation(f"d{i}-{uuid.uuid4().hex[:8]}") for i in range(9)]
        for conv in conversations:
            conv.send(server.url)
        homes = {c.name: replica_of(replicas, c.name).pop() for c in conversations}
        dead = max(range(3), key=lambda r: sum(1 for h in homes.values() if h == r))
        assert sum(1 for h in homes.values() if h == dead) >= 1
        replicas[dead].stop()
        before = len(routed(server, 9))
        for _ in range(3):
            for conv in conversations:
                conv.send(server.url)
        reasons = routed(server, before + 27)[before:]
    finally:
        server.stop()
    orphans = [c for c in conversations if homes[c.name] == dead]
    for conv in conversations:
        served = sorted(served_by(replicas, conv.name))
        if conv in orphans:  # its first turn where it died, then moved once and stayed
            assert served.count(dead) == 1
            assert len(set(served) - {dead}) == 1 and len(served) == 4
        else:
            assert served == [homes[conv.name]] * 4
    assert reasons.count("failover") == len(orphans)
    assert reasons.count("prefix") == len(reasons) - len(orphans)


def test_the_memory_of_a_conversation_expires(replicas, tmp_path):
    server = gateway(config(tmp_path, replicas, affinity_ttl=1), workers=2)
    try:
        conv = Conversation(f"e-{uuid.uuid4().hex[:8]}")
        conv.send(server.url)
        conv.send(server.url)
        time.sleep(1.5)
        conv.send(server.url)
        assert routed(server, 3) == ["new", "prefix", "new"]
    finally:
        server.stop()


def test_new_conversations_are_balanced_by_the_services_load(replicas, tmp_path):
    two = replicas[:2]
    for replica in two:
        replica.default = slow(1.0)
    server = gateway(config(tmp_path, two))
    try:
        conversations = [Conversation(f"n{i}-{uuid.uuid4().hex[:8]}") for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda c: c.send(server.url), conversations))
        assert routed(server, 8) == ["new"] * 8
    finally:
        server.stop()
    assert [len(r.requests) for r in two] == [4, 4]


def test_least_busy_counts_every_workers_requests_in_flight(replicas, tmp_path):
    two = replicas[:2]
    for replica in two:
        replica.default = slow(3.0)
    path = config(tmp_path, two, strategy="least_busy")
    path.write_text(path.read_text() + f'[admin]\ntoken = "{ADMIN}"\n')
    server = gateway(path)
    try:

        def send(i: int) -> str:
            time.sleep(i * 0.15)  # one after another, each still in flight when the next comes
            return str(Conversation(f"l{i}").send(server.url).status_code)

        with ThreadPoolExecutor(9) as pool:
            sent = pool.map(send, range(8))
            time.sleep(1.6)  # all eight in flight
            status = pool.submit(requests.get, f"{server.url}/status", headers=AUTH, timeout=10)
            backends = status.result().json()["backends"]
            list(sent)
        workers = {x["worker"] for x in server.access_lines() if x["path"] == "/v1/messages"}
    finally:
        server.stop()
    assert len(workers) > 1
    assert [len(r.requests) for r in two] == [4, 4]
    assert [backends[f"r{i}"]["service_in_flight"] for i in range(2)] == [4, 4]


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_why_each_replica_was_chosen_and_the_cached_tokens_it_reported(
    replicas, tmp_path
):
    usage = {"prompt_tokens": 100, "completion_tokens": 5}
    cached = {**usage, "prompt_tokens_details": {"cached_tokens": 80}}
    two = replicas[:2]
    server = gateway(config(tmp_path, two), workers=2)
    try:
        conv = Conversation(f"m-{uuid.uuid4().hex[:8]}")
        for replica in two:
            replica.reply(JSONReply(completion("ok", usage=usage)))  # a first turn: no cache
            replica.default = JSONReply(completion("ok", usage=cached))
        for _ in range(3):
            conv.send(server.url)
        assert routed(server, 3) == ["new", "prefix", "prefix"]
        text = requests.get(server.url + "/metrics", timeout=10).text
    finally:
        server.stop()
    (home,) = replica_of(two, conv.name)
    backend = f"r{home}"
    assert metric_sum(text, "gateway_routed_total", backend=backend, routed="new") == 1
    assert metric_sum(text, "gateway_routed_total", backend=backend, routed="prefix") == 2
    assert metric_sum(text, "gateway_routed_total") == 3
    assert metric_sum(text, "gateway_cached_input_tokens_total", backend=backend) == 160


def test_with_the_store_down_conversations_still_stick_and_nothing_fails(replicas, tmp_path):
    """Failing closed is for limits: routing goes on, each worker by rendezvous hashing of the
    conversation (every worker alike), with no load bound and no memory."""
    env = {"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    server = gateway(config(tmp_path, replicas), GATEWAY_STATE_ON_FAILURE="closed", **env)
    try:
        conversations = [Conversation(f"down{i}-{uuid.uuid4().hex[:8]}") for i in range(6)]
        for _ in range(3):
            for conv in conversations:
                conv.send(server.url)
        assert routed(server, 18) == [None] * 18
    finally:
        server.stop()
    for conv in conversations:
        assert len(replica_of(replicas, conv.name)) == 1, conv.name
    assert len(set().union(*(replica_of(replicas, c.name) for c in conversations))) > 1
