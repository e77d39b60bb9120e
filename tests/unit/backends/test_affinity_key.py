"""The key a conversation is known by, for routing it back to the replica that holds its
prefix: a hash chain over its messages, and the client's session id."""

from __future__ import annotations

import json

from app.backends.affinity import conversation, hash_chain, rendezvous, session_id
from app.state.store import Placement, choose

SYSTEM = [
    {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.3a3; cch=7f3a9;"},
    {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
]
TOOLS = [{"name": "Read", "input_schema": {"type": "object"}}]


def body(*texts: str, system=SYSTEM) -> dict:
    roles = ["user", "assistant"]
    messages = [{"role": roles[i % 2], "content": text} for i, text in enumerate(texts)]
    return {"model": "m", "system": system, "tools": TOOLS, "messages": messages}


def test_the_next_turn_holds_this_turns_chain():
    turn1 = hash_chain("r", body("hi"))
    turn2 = hash_chain("r", body("hi", "hello", "read a.py"))
    assert turn2[: len(turn1)] == turn1
    assert conversation("r", body("hi", "hello", "read a.py"), {}).lookups[2] == turn1[-1]


def test_conversations_that_share_system_tools_and_opening_differ_after_it():
    one = hash_chain("r", body("hi", "hello", "fix the bug"))
    other = hash_chain("r", body("hi", "hello", "write the docs"))
    assert one[:2] == other[:2]
    assert one[2] != other[2]


def test_the_billing_line_and_cache_control_do_not_change_the_key():
    moved = [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.9ff; cch=12345;"},
        {"type": "text", "text": "You are Claude Code."},
    ]
    assert hash_chain("r", body("hi", system=moved)) == hash_chain("r", body("hi"))
    marked = body("hi", "hello", "more")
    marked["messages"][2]["content"] = [
        {"type": "text", "text": "more", "cache_control": {"type": "ephemeral"}}
    ]
    assert hash_chain("r", marked) == hash_chain("r", body("hi", "hello", "more"))


def test_a_different_system_prompt_is_a_different_conversation():
    subagent = [{"type": "text", "text": "You are a search agent."}]
    assert hash_chain("r", body("hi", system=subagent))[0] != hash_chain("r", body("hi"))[0]


def test_routes_do_not_share_keys():
    assert hash_chain("r1", body("hi")) != hash_chain("r2", body("hi"))


def test_a_request_looks_up_its_last_eight_prefixes_longest_first():
    texts = [f"m{i}" for i in range(12)]
    conv = conversation("r", body(*texts), {})
    chain = hash_chain("r", body(*texts))
    assert conv is not None
    assert conv.lookups == chain[::-1][:8]
    assert conv.last == chain[-1]


def test_the_session_comes_from_the_header_then_metadata():
    user_id = json.dumps({"device_id": "d", "session_id": "s-meta"})
    meta = {**body("hi"), "metadata": {"user_id": user_id}}
    assert session_id(meta, {"x-claude-code-session-id": "s-head"}) == "s-head"
    assert session_id(meta, {}) == "s-meta"
    legacy = {"metadata": {"user_id": "user_abc_account_1234-5678_session_deadbeef-0001"}}
    assert session_id(legacy, {}) == "deadbeef-0001"
    assert session_id({"metadata": {"user_id": "{not json"}}, {}) is None
    assert session_id(body("hi"), {}) is None


def test_a_new_conversation_is_ordered_by_its_session_or_its_first_message():
    with_session = conversation("r", body("hi"), {"x-claude-code-session-id": "s"})
    without = conversation("r", body("hi"), {})
    assert with_session is not None and without is not None
    assert with_session.ring_key == with_session.session
    assert without.ring_key == hash_chain("r", body("hi"))[0]
    assert conversation("r", {"model": "m", "messages": []}, {}) is None


def test_rendezvous_moves_only_the_keys_of_a_removed_replica():
    keys = [f"k{i}" for i in range(200)]
    before = {k: rendezvous(k, ["a", "b", "c"])[0] for k in keys}
    after = {k: rendezvous(k, ["a", "c"])[0] for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != "b")
    assert 40 < sum(1 for k in keys if before[k] == "a") < 100  # about a third each


def placement(**fields) -> Placement:
    return Placement(["a", "b", "c"], hit_factor=1.5, new_factor=1.25, **fields)


def test_a_known_replica_keeps_its_conversation_up_to_its_bound():
    # Three replicas, six in flight: the bound is ceil(1.5 * 7 / 3) = 4 with this request.
    loads = {"a": 3, "b": 2, "c": 1}
    assert choose(placement(), loads, "a", by_session=False) == ("a", "prefix")
    assert choose(placement(), {"a": 4, "b": 1, "c": 1}, "a", False) == ("b", "spilled")
    # A session hint is a weaker reason: ceil(1.25 * 7 / 3) = 3.
    assert choose(placement(), loads, "a", by_session=True) == ("c", "spilled")
    assert choose(placement(), loads, "b", by_session=True) == ("b", "session")


def test_an_idle_route_always_admits_the_known_replica():
    idle = {"a": 0, "b": 0, "c": 0}
    assert choose(placement(), idle, "c", by_session=True) == ("c", "session")


def test_a_new_conversation_goes_to_the_least_loaded_the_first_of_them_on_a_tie():
    assert choose(placement(), {"a": 2, "b": 1, "c": 1}, None, False) == ("b", "new")


def test_a_known_replica_that_is_no_candidate_is_a_failover():
    assert choose(placement(), {"a": 1, "b": 0, "c": 2}, "gone", False) == ("b", "failover")
