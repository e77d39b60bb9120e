"""Identifiers in Anthropic's shapes: ``msg_…``, ``req_…``, ``toolu_…``.

Random, alphanumeric and long enough that clients can use them as keys. They need to be unique,
not secret, so they come from ``random`` (Mersenne Twister, seeded from the OS, and reseeded in
every forked worker by the module itself) rather than ``os.urandom``, which is a system call
per id on the path of every request.
"""

from __future__ import annotations

import random

_bits = random.getrandbits


def _random(n: int) -> str:
    """``n`` hex characters (4 random bits each)."""
    return f"{_bits(4 * n):0{n}x}"


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


def batch_id(now: float) -> str:
    """``msgbatch_01…``: the creation time in milliseconds (fixed-width hex) first, so that ids
    sort as the batches were created, which is the order lists are served and paged in."""
    return f"msgbatch_01{int(now * 1000):012x}{_random(12)}"
