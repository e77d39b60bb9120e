"""Identifiers in Anthropic's shapes: ``msg_…``, ``req_…``, ``toolu_…``.

Random, URL-safe and long enough that clients can use them as keys; generated from
``os.urandom`` in one call each, which is cheaper than ``secrets`` helpers per character.
"""

from __future__ import annotations

import os

_ALPHABET = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"  # base58-like


def _random(n: int) -> str:
    alphabet = _ALPHABET
    size = len(alphabet)
    return "".join(alphabet[b % size] for b in os.urandom(n))


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
