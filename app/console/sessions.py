"""Console sessions: the admin token is posted once, and the answer is an opaque random id in
a cookie, kept server-side in the state store (so every worker and host knows it) with an idle
and an absolute lifetime.

The cookie holds only the id; the store holds only the id's SHA-256 (a copy of the store
opens no session) and a digest of the admin token it was opened with: a changed token ends
every session. Sign-in attempts are held to a rate per client address, by the store's own
buckets (its key names cannot clash with a client key's: those have no ``:``); a sign-in that
succeeds gives its attempt back, so only wrong tokens use the rate up.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from app.state.guard import GuardedStore
from app.state.store import Ask, Bucket, Settlement

COOKIE = "gateway_console"
PATH = "/admin/"
IDLE = 30 * 60.0  # seconds a session lasts unused
ABSOLUTE = 12 * 3600.0  # seconds a session lasts at most
# Sign-in attempts per client address: 5 at once, then one every 6 s (10 a minute).
SIGN_IN = Bucket("requests", per=6.0, capacity=5)


def token_digest(admin_token: str) -> str:
    return hashlib.sha256(b"gateway-console\0" + admin_token.encode()).hexdigest()


def stored_id(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class Sessions:
    def __init__(self, store: GuardedStore, admin_token: str) -> None:
        self.store = store
        self.admin_token = admin_token
        self.digest = token_digest(admin_token)

    def may_try(self, address: str) -> bool:
        """One sign-in attempt of ``address`` against its rate."""
        verdict = self.store.admit(Ask(_attempts(address), takes=[(SIGN_IN, 1)]))
        return verdict.admitted

    def sign_in(self, offered: str, address: str) -> str | None:
        """A new session's id if ``offered`` is the admin token, else None."""
        if not hmac.compare_digest(offered.encode(), self.admin_token.encode()):
            return None
        self.store.settle(Settlement(_attempts(address), None, corrections=[(SIGN_IN, 1)]))
        session_id = secrets.token_urlsafe(32)
        self.store.start_session(stored_id(session_id), self.digest, IDLE, ABSOLUTE)
        return session_id

    def live(self, session_id: str | None) -> bool:
        if not session_id or len(session_id) > 100:
            return False
        return self.store.check_session(stored_id(session_id), self.digest, IDLE)

    def end(self, session_id: str) -> None:
        self.store.end_session(stored_id(session_id))


def _attempts(address: str) -> str:
    return f"console:sign-in:{address}"


def csrf_token(session_id: str) -> str:
    """The session's token for forms: derived from the session id (which the page's script
    cannot read, the cookie being HttpOnly), so it needs no storage of its own."""
    return hmac.new(session_id.encode(), b"console-csrf", hashlib.sha256).hexdigest()


def csrf_ok(session_id: str, offered: str) -> bool:
    return hmac.compare_digest(csrf_token(session_id).encode(), offered.encode())


def who(session_id: str) -> str:
    """The session as the audit log names it: a short, stable tag that opens nothing."""
    return "session " + stored_id(session_id)[:10]
