"""Routes of replicas under real gunicorn with several workers: ``affinity`` sends each
conversation's turns to one replica, whichever worker (or host, over one Redis) takes them,
within a load bound; ``least_busy`` counts the whole service's requests in flight."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from fakebackend import AutoReply, FakeBackend, JSONReply, Recorded, completion
from metrics import metric_sum
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


@dataclass
class GatedReply(JSONReply):
    """An answer once the test opens ``gate`` (at most a minute later): requests stay in flight
    until the test has seen what it needs, however slow the machine."""

    gate: threading.Event = field(default_factory=threading.Event)

    def send(self, handler: Any, request: Recorded) -> None:
        self.gate.wait(60)
        super().send(handler, request)


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
    lines.append(f'[admin]\ntoken = "{ADMIN}"\n')
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


def in_flight(server: Gunicorn) -> list[int]:
    """Each replica's requests in flight across the whole service (every worker's leases)."""
    backends = requests.get(f"{server.url}/status", headers=AUTH, timeout=10).json()["backends"]
    return [backends[name]["service_in_flight"] for name in sorted(backends)]


def assert_idle_and_serving(server: Gunicorn) -> None:
    """After whatever the test did to it, the gateway holds no replica's slot and serves the
    next conversation."""
    eventually(lambda: not any(in_flight(server)), "every replica's slot given back")
    Conversation(f"next-{uuid.uuid4().hex[:8]}").send(server.url)
    assert not any(in_flight(server))


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
            replica.default = slow(6.0)  # all six in flight together, however slow the machine
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
        assert_idle_and_serving(server)
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
        assert_idle_and_serving(server)
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


def eight_in_flight(server: Gunicorn, two: list[FakeBackend], round_: int) -> dict[str, Any]:
    """Eight requests one after another, each counted by the service before the next comes,
    all held until the service's count has been read: what was counted, where each went, and
    which workers took them."""
    gated = GatedReply(completion("ok"))
    for replica in two:
        replica.default = gated
    before = [len(r.requests) for r in two]
    lines_before = len(server.access_lines())
    try:
        with ThreadPoolExecutor(8) as pool:
            sent = []
            for i in range(8):
                eventually(lambda i=i: sum(in_flight(server)) == i, f"{i} requests in flight")
                sent.append(pool.submit(Conversation(f"l{round_}-{i}").send, server.url))
            eventually(lambda: sum(in_flight(server)) == 8, "all eight in flight")
            counts = in_flight(server)
            gated.gate.set()
            for future in sent:
                future.result()
    finally:
        gated.gate.set()
    lines = eventually(lambda: server.access_lines()[lines_before:], "access lines")
    return {
        "counts": counts,
        "per_replica": [len(r.requests) - b for r, b in zip(two, before, strict=True)],
        "workers": {x["worker"] for x in lines if x["path"] == "/v1/messages"},
    }


def test_least_busy_counts_every_workers_requests_in_flight(replicas, tmp_path):
    two = replicas[:2]
    server = gateway(config(tmp_path, two, strategy="least_busy"))
    try:
        # Which worker accepts each connection is the kernel's choice: a round whose eight
        # requests all went to one worker proves nothing about the others, so another is sent.
        for round_ in range(4):
            seen = eight_in_flight(server, two, round_)
            if len(seen["workers"]) > 1:
                break
        assert_idle_and_serving(server)
    finally:
        server.stop()
    assert len(seen["workers"]) > 1
    assert seen["per_replica"] == [4, 4]
    assert seen["counts"] == [4, 4]


def test_a_client_that_hangs_up_gives_its_replicas_slot_back(replicas, tmp_path):
    two = replicas[:2]
    for replica in two:
        replica.default = slow(8.0)
    server = gateway(config(tmp_path, two), workers=2)
    try:
        for i in range(4):
            with pytest.raises(requests.Timeout):
                requests.post(
                    f"{server.url}/v1/messages", json=Conversation(f"h{i}").body(), timeout=1
                )
        for replica in two:
            replica.default = AutoReply()
        assert_idle_and_serving(server)
    finally:
        server.stop()


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


def test_a_replica_that_comes_back_takes_new_conversations_and_the_moved_ones_stay(
    replicas, tmp_path
):
    two = replicas[:2]
    # Its breaker opens at its first failure and lets a probe through a second later.
    path = config(tmp_path, two, breaker_failures=1, breaker_cooldown=1)
    server = gateway(path, workers=2, GATEWAY_RETRIES="2")
    served = {i: [replica] for i, replica in enumerate(two)}  # every life of each replica
    try:
        conversations = [Conversation(f"c{i}-{uuid.uuid4().hex[:8]}") for i in range(6)]
        for conv in conversations:
            conv.send(server.url)
        homes = {c.name: replica_of(two, c.name).pop() for c in conversations}
        dead = max(range(2), key=lambda r: list(homes.values()).count(r))
        survivor = 1 - dead
        orphans = [c for c in conversations if homes[c.name] == dead]
        two[dead].stop()
        for conv in conversations:  # the orphans move to the survivor
            conv.send(server.url)
        back = FakeBackend(port=two[dead].port).start()
        served[dead].append(back)
        time.sleep(1.5)  # every worker's breaker on it lets its next request through
        # One moved conversation in flight on the survivor: the replica that came back is the
        # least loaded, so the new conversations are its, one after another.
        gated = GatedReply(completion("ok"))
        two[survivor].reply(gated)  # its next request's answer only
        newcomers = [Conversation(f"n{i}-{uuid.uuid4().hex[:8]}") for i in range(4)]
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(orphans[0].send, server.url)
            try:
                eventually(lambda: held.done() or in_flight(server)[survivor] == 1, "held")
                assert not held.done(), "a moved conversation went back to the replica"
                for conv in newcomers:
                    conv.send(server.url)
            finally:
                gated.gate.set()
            held.result()
        for conv in conversations + newcomers:
            conv.send(server.url)
        reasons = routed(server, 27)
        assert_idle_and_serving(server)
    finally:
        server.stop()
        for life in served[dead][1:]:
            life.stop()

    def lives(name: str) -> list[int]:
        return sorted(i for i in served for r in served[i] for _ in served_by([r], name))

    for conv in orphans:  # its first turn where it died, then the survivor's for good
        assert lives(conv.name) == sorted([dead] + [survivor] * (len(conv.messages) // 2 - 1))
    for conv in conversations:
        if conv not in orphans:
            assert lives(conv.name) == [survivor] * 3
    for conv in newcomers:
        assert lives(conv.name) == [dead] * 2
    assert sorted(reasons) == sorted(
        ["new"] * 10 + ["failover"] * len(orphans) + ["prefix"] * (17 - len(orphans))
    )
