"""What identifies a conversation, for routing it back to the replica that holds its prefix in
cache (pure: no Flask, no I/O).

Claude Code's system prompt and tools are the same for every session, and its first user
message opens with the same injected reminders, so the first bytes of a request say nothing
about whose conversation it is. The conversation is the chain instead: ``h0`` hashes the route,
the system prompt (without the attribution line, whose values change per request) and the
tools; each message then extends the chain, ``h_i = H(h_{i-1}, message_i)``, with
``cache_control`` left out (its breakpoints move every turn). Conversations only grow, so turn
n+1's chain holds turn n's: a request looks up its last few prefix hashes and takes the longest
one the store remembers. A subagent or a compacted conversation starts a chain of its own.

The client's session id (Claude Code's ``X-Claude-Code-Session-Id`` header, or the
``session_id`` in ``metadata.user_id``) is a weaker hint, for a request whose prefix no one has
seen.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app import jsonc
from app.translate.billing_header import clean_system_texts

LOOKUPS = 8  # prefix hashes a request looks up: a tool loop adds two messages a turn
SESSION_HEADER = "x-claude-code-session-id"
_LEGACY_SESSION = re.compile(r"_session_([0-9a-fA-F-]{8,64})$")


@dataclass(frozen=True)
class Conversation:
    """What the store is asked about a request: its prefix hashes, the longest first; the key
    to remember it by (its whole chain); its session's key; and the key that orders the
    replicas for a new conversation (the same on every worker and host)."""

    lookups: list[str]
    last: str
    session: str | None
    ring_key: str


def conversation(
    route: str, body: Mapping[str, Any], headers: Mapping[str, str]
) -> Conversation | None:
    """The request's conversation; None when it has no messages to chain."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    chain = hash_chain(route, body)
    session = session_id(body, headers)
    session_key = _digest(b"s\0" + route.encode() + b"\0" + session.encode()) if session else None
    lookups = chain[::-1][:LOOKUPS]
    return Conversation(lookups, chain[-1], session_key, session_key or chain[0])


def hash_chain(route: str, body: Mapping[str, Any]) -> list[str]:
    """One hash per message, each covering the route, system, tools and every message up to it."""
    head = hashlib.blake2b(route.encode(), digest_size=16)
    head.update(b"\0")
    head.update(jsonc.dumps(_system(body.get("system"))))
    head.update(b"\0")
    head.update(jsonc.dumps(_without_cache_control(body.get("tools"))))
    previous = head.digest()
    chain: list[str] = []
    for message in body.get("messages") or ():
        step = hashlib.blake2b(previous, digest_size=16)
        step.update(jsonc.dumps(_message(message)))
        previous = step.digest()
        chain.append(previous.hex())
    return chain


def session_id(body: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
    """The client's session: the header, else ``metadata.user_id`` (a JSON string with a
    ``session_id``, or the older ``user_<sha>_account_<uuid>_session_<uuid>``)."""
    header = headers.get(SESSION_HEADER)
    if header:
        return header[:200]
    metadata = body.get("metadata")
    user = metadata.get("user_id") if isinstance(metadata, dict) else None
    if not isinstance(user, str) or not user:
        return None
    if user.startswith("{"):
        try:
            parsed = json.loads(user)
        except ValueError:
            return None
        found = parsed.get("session_id") if isinstance(parsed, dict) else None
        return found[:200] if isinstance(found, str) and found else None
    legacy = _LEGACY_SESSION.search(user)
    return legacy.group(1) if legacy else None


def rendezvous(key: str, names: Sequence[str]) -> list[str]:
    """``names`` by highest random weight for ``key``: every worker and host orders them the
    same, and removing one moves only the keys it was first for."""
    return sorted(names, key=lambda name: _digest(f"{key}\0{name}".encode()), reverse=True)


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _system(system: Any) -> Any:
    """The system prompt without the attribution line (and without ``cache_control``)."""
    if isinstance(system, str):
        return clean_system_texts([system], "drop")
    if not isinstance(system, list):
        return system
    texts = [b.get("text") for b in system if isinstance(b, dict)]
    if all(isinstance(t, str) for t in texts) and len(texts) == len(system):
        return clean_system_texts([t for t in texts if isinstance(t, str)], "drop")
    return _without_cache_control(system)


def _message(message: Any) -> Any:
    """A message as it counts for the chain: its role and its content as blocks (a string is
    one text block, as it is to a model), each block without ``cache_control``."""
    if not isinstance(message, dict):
        return message
    content = message.get("content")
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    return [message.get("role"), _without_cache_control(content)]


def _without_cache_control(blocks: Any) -> Any:
    if not isinstance(blocks, list):
        return blocks
    return [
        {k: v for k, v in block.items() if k != "cache_control"}
        if isinstance(block, dict) and "cache_control" in block
        else block
        for block in blocks
    ]
