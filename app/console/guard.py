"""What every console request passes before its view: a live session (else the sign-in page
for a page, a 403 for anything else), and for a POST the same origin and the session's CSRF
token; and the headers every console answer carries."""

from __future__ import annotations

from flask import Request
from werkzeug.wrappers import Response

# No inline script or style anywhere: the pages load their script and styles from /admin/static.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: with it a browser sends "Origin: null" on a POST, and the origin check
    # would refuse the console's own forms.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def same_origin(request: Request) -> bool:
    """The POST comes from a page of this console: its ``Origin`` is this host's (browsers
    send it on every POST); without one, ``Sec-Fetch-Site`` must say same-origin."""
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin == f"{request.scheme}://{request.host}"
    return request.headers.get("Sec-Fetch-Site") == "same-origin"


def secure(response: Response, private: bool) -> Response:
    response.headers.update(HEADERS)
    if private:
        response.headers["Cache-Control"] = "no-store"
    return response
