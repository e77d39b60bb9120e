"""Client authentication: the key a client presents, found by its SHA-256 digest.

Clients send their key as ``x-api-key`` (the Anthropic SDKs) or ``Authorization: Bearer``
(Claude Code with ``ANTHROPIC_AUTH_TOKEN``). The configuration holds only digests
(``[[auth.keys]]`` in app/config/), so the gateway never keeps a key it could leak; the key
a client presents is hashed once per request and the digest looked up in a dict: one SHA-256
of a short string and one dict lookup, however many keys there are.

Why no constant-time comparison: a timing attack needs a comparison whose duration depends on
how much of a *secret* the guess matches. Here the guess is hashed first, and what is compared
is its digest, which the client cannot steer: to make a digest share a chosen prefix with a
stored one it would need a SHA-256 preimage. The dict lookup compares Python's hash of the
digest (SipHash with a per-process random key) before any bytes, so its timing says nothing
useful either; and even learning a stored digest would not give away the key, which is what the
gateway accepts. ``hmac.compare_digest`` is for comparing the secret itself, as the admin token
check in app/serving/admin.py does.

Pure: the standard library only, no Flask. ``python -m app.keys`` makes, lists and revokes
keys, and prints the ``sha256 = "..."`` line of a key for the config file.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")
_sha256 = hashlib.sha256


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else None."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


def identify(keys: Mapping[bytes, T], environ: Mapping[str, Any]) -> tuple[T | None, bytes | None]:
    """The configured entry for the key a request presents, and that key's digest.

    ``environ`` is the WSGI environ (reading it directly is cheaper than through a headers
    object). ``x-api-key`` is tried first; a client that sends both headers (an SDK given both
    an API key and an auth token) is let in by either. Returns (None, None) when the request
    carries no key, (None, digest) when its key is unknown.
    """
    api_key = environ.get("HTTP_X_API_KEY")
    bearer = bearer_token(environ.get("HTTP_AUTHORIZATION"))
    offered = api_key or bearer
    if not offered:
        return None, None
    digest = _sha256(offered.encode()).digest()
    found = keys.get(digest)
    if found is None and api_key and bearer:
        other = _sha256(bearer.encode()).digest()
        found = keys.get(other)
        if found is not None:
            digest = other
    return found, digest


def is_admin(environ: Mapping[str, Any], admin_token: str) -> bool:
    """Whether the request presents the admin token (as a bearer token or ``x-api-key``)."""
    if not admin_token:
        return False
    offered = bearer_token(environ.get("HTTP_AUTHORIZATION")) or environ.get("HTTP_X_API_KEY")
    if not isinstance(offered, str) or not offered:
        return False
    return hmac.compare_digest(offered.encode(), admin_token.encode())


def client_id(digest: bytes | None) -> str | None:
    """A short, stable, non-reversible id of a presented key, for the access log."""
    return None if digest is None else "key_" + digest[:6].hex()


def config_line(key: str) -> str:
    """The ``sha256 = "..."`` line of ``[[auth.keys]]`` for ``key``."""
    return f'sha256 = "{_sha256(key.encode()).hexdigest()}"'
