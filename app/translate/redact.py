"""Secrets out of backend text before it reaches a client or a log (pure).

A backend's error text may quote the request it was sent, headers included: one such error
echoed the gateway's own ``Authorization: Bearer`` header, which went to the client and into
the log. Every excerpt of backend text therefore goes through ``redact``: the configured
secrets (backend API keys, header values sent to backends, the admin token) are replaced
wherever they appear, and so is anything shaped like a bearer token or an API key, configured
or not.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "[redacted]"
# Secrets shorter than this are not searched for: they would match ordinary text.
MIN_SECRET = 8
_SHAPES = re.compile(
    r"(?i)(\bbearer\s+|\bbasic\s+|\bx-api-key\W{1,4}|\bapi[_-]?key\W{1,4})[A-Za-z0-9._~+/=-]{6,}"
    r"|\b(?:sk|pk|rk|gsk|xai|hf)[-_][A-Za-z0-9_-]{12,}"
)


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets: tuple[str, ...] = ()
        self.set_secrets(secrets)

    def set_secrets(self, secrets: Iterable[str]) -> None:
        """The configured secrets, longest first (so one that contains another goes whole)."""
        kept = {s for s in secrets if len(s) >= MIN_SECRET}
        self.secrets = tuple(sorted(kept, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return _SHAPES.sub(_masked, text)


def _masked(match: re.Match[str]) -> str:
    prefix = match.group(1)
    return f"{prefix}{MASK}" if prefix else MASK


# The worker's one redactor: app.serving.web gives it the configured secrets at start.
redact = Redactor()
