"""Identifiers in Anthropic's shapes: ``msg_…``, ``req_…``, ``toolu_…``.

Random, alphanumeric and long enough that clients can use them as keys. Hex of ``os.urandom``:
one call per id, on the path of every request (a per-character alphabet lookup cost more than
a microsecond each time).
"""

from __future__ import annotations

import os


def _random(n: int) -> str:
    """``n`` hex characters (4 random bits each)."""
    return os.urandom((n + 1) // 2).hex()[:n]


def message_id() -> str:
    return "msg_01" + _random(22)


def request_id() -> str:
    return "req_01" + _random(22)


def tool_use_id() -> str:
    return "toolu_01" + _random(22)


SIGNATURE_PREFIX = "gw1."


def thinking_signature() -> str:
    """The ``signature`` of thinking blocks the gateway produces; clients send it back."""
    return SIGNATURE_PREFIX + _random(32)


def is_gateway_signature(signature: object) -> bool:
    """True for thinking the gateway's backends produced (not Anthropic's own, say)."""
    return isinstance(signature, str) and signature.startswith(SIGNATURE_PREFIX)
