"""Placing requests on a route's backends, against both engines: the service-wide count of
requests in flight per backend, and the memory of which backend served a conversation."""

from __future__ import annotations

import time

from app.state.store import Placement

AB = ["a", "b"]


def test_requests_in_flight_are_counted_until_given_back(store):
    first = store.place(Placement(AB))
    second = store.place(Placement(AB))
    assert (first.backend, second.backend) == ("a", "b")  # the least loaded, first on a tie
    assert second.loads == {"a": 1, "b": 0}
    assert store.backend_loads(AB) == {"a": 1, "b": 1}
    store.unplace(first.backend, first.lease)
    assert store.backend_loads(AB) == {"a": 0, "b": 1}
    assert store.place(Placement(AB)).backend == "a"


def test_a_lease_left_behind_expires(store):
    store.place(Placement(AB, lease_ttl=0.2))
    assert store.backend_loads(AB) == {"a": 1, "b": 0}
    time.sleep(0.3)  # the worker holding it died: its count goes by itself
    assert store.backend_loads(AB) == {"a": 0, "b": 0}
    assert store.place(Placement(AB)).loads == {"a": 0, "b": 0}


def test_a_conversation_goes_back_to_the_backend_that_served_its_longest_prefix(store):
    store.place(Placement(["b", "a"], remember=["h2"]))  # the first turn, on b
    store.place(Placement(AB, remember=["x2"]))  # another conversation, on a
    placed = store.place(Placement(AB, lookups=["h4", "h3", "h2", "h1"], remember=["h4"]))
    assert (placed.backend, placed.routed) == ("b", "prefix")
    again = store.place(Placement(AB, lookups=["h4", "x2"]))
    assert (again.backend, again.routed) == ("b", "prefix")  # the longest hit wins


def test_the_session_is_the_hint_when_no_prefix_is_known(store):
    store.place(Placement(["b", "a"], session="s1", remember=["s1"]))
    placed = store.place(Placement(AB, lookups=["other"], session="s1"))
    assert (placed.backend, placed.routed) == ("b", "session")
    fresh = store.place(Placement(AB, lookups=["none"], session="s2"))
    assert fresh.routed == "new"


def test_a_known_backend_over_its_bound_spills_and_the_conversation_moves(store):
    store.place(Placement(AB, remember=["h1"]))  # on a
    for _ in range(3):
        store.place(Placement(["a"]))  # a is busy: 4 in flight, b idle
    placed = store.place(Placement(AB, lookups=["h1"], remember=["h2"], hit_factor=2.0))
    # 4 + 1 <= ceil(2 * (4 + 1) / 2) = 5: at factor 2 a prefix hit still fits.
    assert placed.routed == "prefix"
    placed = store.place(Placement(AB, lookups=["h2"], remember=["h3"], hit_factor=1.5))
    assert (placed.backend, placed.routed) == ("b", "spilled")
    after = store.place(Placement(AB, lookups=["h3", "h2"], hit_factor=1.5))
    assert (after.backend, after.routed) == ("b", "prefix")


def test_a_backend_no_longer_a_candidate_loses_its_conversations(store):
    store.place(Placement(AB, remember=["h1"]))  # on a
    placed = store.place(Placement(["b"], lookups=["h1"], remember=["h2"]))
    assert (placed.backend, placed.routed) == ("b", "failover")
    back = store.place(Placement(AB, lookups=["h2", "h1"]))
    assert (back.backend, back.routed) == ("b", "prefix")


def test_a_moved_request_takes_its_lease_and_its_conversation_along(store):
    placed = store.place(Placement(AB, remember=["h1"]))
    store.moved(placed.lease, placed.backend, "b", 60.0, ["h1"], 60.0)
    assert store.backend_loads(AB) == {"a": 0, "b": 1}
    assert store.place(Placement(AB, lookups=["h1"])).backend == "b"
    store.unplace("b", placed.lease)
    assert store.backend_loads(AB) == {"a": 0, "b": 1}  # only the last placement's is left


def test_the_memory_expires(store):
    store.place(Placement(["b", "a"], remember=["h1"], memory_ttl=0.2))
    time.sleep(0.3)
    assert store.place(Placement(AB, lookups=["h1"])).routed == "new"


def test_the_memory_keeps_at_most_its_size(store):
    # SQLite trims on one write in 64; Redis on every write. Enough writes for both.
    for i in range(130):
        store.place(Placement(["b"], remember=[f"k{i}"], max_entries=10, lease_ttl=0.01))
    time.sleep(0.05)  # their leases are over
    assert store.place(Placement(AB, lookups=["k0"])).routed == "new"  # the oldest went
    assert store.place(Placement(AB, lookups=["k129"])).routed == "prefix"
