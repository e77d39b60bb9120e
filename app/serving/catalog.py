"""The model list served at ``GET /v1/models``: the names clients may send, from the config.

Clients (and Claude Code's model picker) see the Anthropic-side names: every alias and exact
route name, and the default route's backend model, each as an Anthropic model object (glob
patterns cannot be listed). Pagination follows the API: ``limit``, ``after_id``,
``before_id``, and ``has_more`` always present, because the SDK's auto-pager keeps asking
while it is missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.backends.routing import is_glob, resolve
from app.config import Settings
from app.errors import InvalidRequest, NotFound

CREATED_AT = "2025-01-01T00:00:00Z"  # backends do not say; a fixed RFC 3339 date is allowed


def model_ids(settings: Settings) -> list[str]:
    names = [p for route in settings.routes for p in route.match if not is_glob(p)]
    default = settings.default_route
    if default is not None:
        names += [t.model for t in default.targets if t.model]
    return list(dict.fromkeys(names))


def model_object(model_id: str, settings: Settings) -> dict[str, Any]:
    route = resolve(settings, model_id)
    backend_models = {t.model or model_id for t in route.targets}
    display = model_id
    if backend_models != {model_id}:
        display = f"{model_id} ({', '.join(sorted(backend_models))})"
    return {"type": "model", "id": model_id, "display_name": display, "created_at": CREATED_AT}


def find_model(model_id: str, settings: Settings) -> dict[str, Any]:
    if model_id not in model_ids(settings):
        raise NotFound(f"model: {model_id!r} is not served by this gateway")
    return model_object(model_id, settings)


def models_page(settings: Settings, args: Mapping[str, str]) -> dict[str, Any]:
    ids = model_ids(settings)
    limit = _limit(args.get("limit"))
    after, before = args.get("after_id"), args.get("before_id")
    if after in ids:
        ids = ids[ids.index(after) + 1 :]
    if before in ids:
        ids = ids[: ids.index(before)]
        page, has_more = ids[-limit:], len(ids) > limit
    else:
        page, has_more = ids[:limit], len(ids) > limit
    return {
        "data": [model_object(i, settings) for i in page],
        "has_more": has_more,
        "first_id": page[0] if page else None,
        "last_id": page[-1] if page else None,
    }


def _limit(value: str | None) -> int:
    if value is None:
        return 20
    try:
        limit = int(value)
    except ValueError:
        raise InvalidRequest("limit: must be an integer between 1 and 1000") from None
    if not 1 <= limit <= 1000:
        raise InvalidRequest("limit: must be an integer between 1 and 1000")
    return limit
