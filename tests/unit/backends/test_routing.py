"""Routes, aliases and globs (pure resolution), routing config errors, and the balancer."""

from __future__ import annotations

from typing import Any

import pytest

from app.backends.balancer import Balancer
from app.backends.routing import backend_model, resolve
from app.config import ConfigError, Route, Routing, Target, build_settings
from app.errors import NotFound

BACKENDS = [
    {"name": "big", "url": "http://127.0.0.1:8001/v1", "dialect": "vllm"},
    {"name": "small", "url": "http://127.0.0.1:8002/v1", "dialect": "llamacpp"},
    {"name": "overflow", "url": "http://127.0.0.1:8003/v1", "protocol": "anthropic"},
]
ROUTES = [
    {"name": "haiku", "match": "claude-*haiku*", "backend": "small", "model": "qwen3-8b"},
    {
        "name": "claude",
        "match": ["claude-*", "sonnet"],
        "strategy": "weighted",
        "targets": [
            {"backend": "big", "model": "qwen3-235b", "weight": 3},
            {"backend": "overflow", "model": "claude-via-anthropic", "weight": 1},
        ],
    },
    {"name": "exact", "match": "claude-3-5-haiku-latest", "backend": "big", "model": "qwen3-32b"},
]


def settings(**extra: Any):
    raw = {"backends": BACKENDS, "routes": ROUTES, **extra}
    return build_settings(raw, {})


@pytest.mark.parametrize(
    ("model", "route", "backend", "backend_model_name"),
    [
        ("claude-3-5-haiku-latest", "exact", "big", "qwen3-32b"),
        ("claude-haiku-4-5", "haiku", "small", "qwen3-8b"),
        ("claude-sonnet-4-6", "claude", "big", "qwen3-235b"),
        ("sonnet", "claude", "big", "qwen3-235b"),
        ("claude-opus-4-7", "claude", "big", "qwen3-235b"),
    ],
    ids=["exact_beats_earlier_glob", "glob_in_order", "second_glob", "exact_in_list", "opus"],
)
def test_resolution_table(model: str, route: str, backend: str, backend_model_name: str) -> None:
    found = resolve(settings(), model)
    assert found.name == route
    assert found.targets[0].backend == backend
    assert backend_model(found.targets[0], model) == backend_model_name


def test_unknown_model_without_default_is_not_found() -> None:
    with pytest.raises(NotFound) as caught:
        resolve(settings(), "gpt-4o")
    assert caught.value.status == 404
    assert "gpt-4o" in caught.value.message and "http" not in caught.value.message


def test_routing_default_catches_the_rest() -> None:
    found = resolve(settings(routing={"default": "haiku"}), "gpt-4o")
    assert found.name == "haiku"


def test_upstream_table_is_the_default_backend_and_route() -> None:
    cfg = build_settings({"upstream": {"url": "http://127.0.0.1:9000/v1", "model": "m1"}}, {})
    route = resolve(cfg, "anything")
    assert route.targets == (Target("default", "m1"),)
    assert set(cfg.backends) == {"default"}


def test_aliases_route_to_the_default_backend() -> None:
    cfg = build_settings({"upstream": {}, "models": {"claude-haiku-4-5": "qwen3-8b"}}, {})
    assert resolve(cfg, "claude-haiku-4-5").targets == (Target("default", "qwen3-8b"),)
    assert backend_model(resolve(cfg, "other").targets[0], "other") == "other"


def test_empty_target_model_means_the_requested_name() -> None:
    cfg = build_settings(
        {"backends": BACKENDS[:1], "routes": [{"match": "*", "backend": "big"}]}, {}
    )
    assert backend_model(resolve(cfg, "llama3.1:8b").targets[0], "llama3.1:8b") == "llama3.1:8b"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"backends": [{"url": "http://127.0.0.1:1/v1"}]}, "backends.0.name: required"),
        ({"backends": [BACKENDS[0], BACKENDS[0]]}, "backends.1.name: 'big' is declared twice"),
        ({"backends": [{**BACKENDS[0], "protocol": "grpc"}]}, "backends.0.protocol"),
        ({"backends": [{**BACKENDS[0], "url": "127.0.0.1"}]}, "backends.0.url"),
        ({"backends": [{**BACKENDS[0], "quirks": {"top_kk": True}}]}, "backends.0.quirks.top_kk"),
        ({"backends": [{**BACKENDS[0], "model": "x"}]}, "backends.0.model"),
        ({"backends": BACKENDS, "routes": [{"backend": "big"}]}, "routes.0.match"),
        (
            {"backends": BACKENDS, "routes": [{"match": "*", "backend": "gpu9"}]},
            "routes.0.targets.0.backend: no backend named 'gpu9'",
        ),
        ({"backends": BACKENDS, "routes": [{"match": "*", "targets": []}]}, "routes.0.targets"),
        (
            {
                "backends": BACKENDS,
                "routes": [{"match": "*", "backend": "big", "strategy": "random"}],
            },
            "routes.0.strategy",
        ),
        (
            {
                "backends": BACKENDS,
                "routes": [{"match": "*", "targets": [{"backend": "big", "weight": -1}]}],
            },
            "routes.0.targets.0.weight",
        ),
        (
            {"backends": BACKENDS, "routing": {"default": "nope"}},
            "routing.default: no route named 'nope'",
        ),
        ({"backends": BACKENDS, "routing": {"retries": -1}}, "routing.retries"),
        ({"backends": BACKENDS, "routing": {"retry": 1}}, "routing.retry: unknown setting"),
        ({"backends": {"name": "x"}}, "backends: must be an array of tables"),
        (
            {"backends": BACKENDS, "models": {"a": "b"}},
            "models: aliases map to the default backend",
        ),
        ({"admin": {"token_env": "MISSING_TOKEN"}}, "admin.token_env"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_routing_config_errors_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_settings(raw, {})
    assert message in str(caught.value)


# --- balancer ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def balancer(clock: Clock, limits: dict[str, int] | None = None, **policy: Any) -> Balancer:
    return Balancer(limits or {"a": 0, "b": 0}, Routing(**policy), clock=clock, rng=lambda: 0.0)


ROUTE = Route("r", ("*",), (Target("a"), Target("b")))


def fail(b: Balancer, backend: str, times: int) -> None:
    for _ in range(times):
        slot = b.acquire(backend)
        assert slot is not None
        slot.release(ok=False)


def test_breaker_opens_after_consecutive_failures_and_probes_back() -> None:
    clock = Clock()
    b = balancer(clock, breaker_failures=3, breaker_cooldown=30)
    fail(b, "a", 2)
    assert b.state("a") == "closed"
    fail(b, "a", 1)
    assert b.state("a") == "open"
    assert [t.backend for t in b.plan(ROUTE)] == ["b", "a"]  # held back, not taken out
    clock.now += 30
    assert b.state("a") == "half_open"
    assert [t.backend for t in b.plan(ROUTE)] == ["a", "b"]
    probe = b.acquire("a")
    assert probe is not None and probe.probe
    assert [t.backend for t in b.plan(ROUTE)] == ["b", "a"]  # one probe at a time
    probe.release(ok=True)
    assert b.state("a") == "closed"
    assert [t.backend for t in b.plan(ROUTE)] == ["a", "b"]


def test_failed_probe_reopens_the_breaker() -> None:
    clock = Clock()
    b = balancer(clock, breaker_failures=1, breaker_cooldown=10)
    fail(b, "a", 1)
    clock.now += 10
    fail(b, "a", 1)
    assert b.state("a") == "open"
    clock.now += 9
    assert b.state("a") == "open"


def test_a_probe_that_says_nothing_frees_the_next_probe() -> None:
    """A probe whose client left (no verdict) must not leave the breaker stuck half-open."""
    clock = Clock()
    b = balancer(clock, breaker_failures=1, breaker_cooldown=10)
    fail(b, "a", 1)
    clock.now += 10
    probe = b.acquire("a")
    assert probe is not None and probe.probe
    probe.release(ok=None)
    assert b.snapshot()["a"]["probing"] is False
    second = b.acquire("a")
    assert second is not None and second.probe


def test_a_slot_is_released_once_however_often_it_is_released() -> None:
    b = balancer(Clock(), breaker_failures=5)
    slot = b.acquire("a")
    assert slot is not None
    slot.release(ok=False)
    slot.release(ok=False)
    slot.release(ok=True)
    snapshot = b.snapshot()["a"]
    assert (snapshot["in_flight"], snapshot["errors"], snapshot["successes"]) == (0, 1, 0)


def test_a_success_resets_the_failure_count() -> None:
    b = balancer(Clock(), breaker_failures=2)
    fail(b, "a", 1)
    slot = b.acquire("a")
    assert slot is not None
    slot.release(ok=True)
    fail(b, "a", 1)
    assert b.state("a") == "closed"


def test_outcomes_without_verdict_do_not_count() -> None:
    b = balancer(Clock(), breaker_failures=1)
    slot = b.acquire("a")
    assert slot is not None
    slot.release(ok=None)  # e.g. the client went away, or a 400
    assert b.state("a") == "closed"


def test_concurrency_cap() -> None:
    b = balancer(Clock(), limits={"a": 1, "b": 0})
    slot = b.acquire("a")
    assert slot is not None
    assert b.acquire("a") is None
    slot.release(ok=True)
    assert b.acquire("a") is not None


def test_batch_items_leave_the_concurrency_cap_to_interactive_requests() -> None:
    b = balancer(Clock(), limits={"a": 1, "b": 0})
    items = [b.acquire("a", batch=True) for _ in range(2)]  # admitted by the store's slots
    assert None not in items
    slot = b.acquire("a")  # the cap is the interactive requests'
    assert slot is not None
    assert b.acquire("a") is None
    for item in items:
        item.release(ok=True)  # type: ignore[union-attr]
    slot.release(ok=True)
    assert b.snapshot()["a"]["in_flight"] == 0


def test_least_busy_orders_by_in_flight() -> None:
    b = balancer(Clock())
    route = Route("r", ("*",), (Target("a"), Target("b")), "least_busy")
    assert b.acquire("a")
    assert [t.backend for t in b.plan(route)] == ["b", "a"]


@pytest.mark.parametrize(("draw", "first"), [(0.0, "a"), (0.74, "a"), (0.76, "b"), (0.99, "b")])
def test_weighted_order_follows_the_weights(draw: float, first: str) -> None:
    b = Balancer({"a": 0, "b": 0, "c": 0}, Routing(), rng=lambda: draw)
    route = Route(
        "r",
        ("*",),
        (Target("a", weight=3), Target("b", weight=1), Target("c", weight=0)),
        "weighted",
    )
    order = [t.backend for t in b.plan(route)]
    assert order[0] == first
    assert order[-1] == "c"  # weight 0: failover only
    assert sorted(order) == ["a", "b", "c"]


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    b = Balancer({"a": 0}, Routing(backoff=0.1, max_backoff=1.0), rng=lambda: 1.0)
    assert [b.retry_delay(n) for n in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert Balancer({"a": 0}, Routing(), rng=lambda: 0.0).retry_delay(3) == 0.0
