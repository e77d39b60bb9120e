"""Anthropic Messages API gateway for OpenAI-compatible Chat Completions backends.

Importing the package is cheap and side-effect free: the gunicorn master imports ``app.config``
before its workers monkey-patch the network stack, so Flask and the backend client load only in
``create_app``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from app.config import Settings


def create_app(settings: Settings | None = None) -> Flask:
    """Build the WSGI app; settings come from ``GATEWAY_CONFIG`` and the environment by default."""
    from app.serving.web import build_app

    return build_app(settings)
