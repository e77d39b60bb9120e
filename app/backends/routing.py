"""Which route serves a model name: exact names and aliases first, then globs in config order,
then the default route (pure).

Clients send Anthropic model names (``claude-sonnet-4-6``, whatever Claude Code sends); routes
map them to (backend, backend model) targets. The response still reports the name the client
asked for.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from app.config import Route, Settings, Target
from app.errors import NotFound

_GLOB_CHARS = frozenset("*?[")


def is_glob(pattern: str) -> bool:
    return not _GLOB_CHARS.isdisjoint(pattern)


def resolve(settings: Settings, model: str) -> Route:
    """The route for ``model``; NotFound when nothing matches and there is no default."""
    for route in settings.routes:
        if model in route.match:
            return route
    for route in settings.routes:
        if any(is_glob(p) and fnmatchcase(model, p) for p in route.match):
            return route
    if settings.default_route is not None:
        return settings.default_route
    raise NotFound(f"model: {model!r} is not served by this gateway")


def backend_model(target: Target, requested: str) -> str:
    """The model name to send to the target's backend."""
    return target.model or requested
