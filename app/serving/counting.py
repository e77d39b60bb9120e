"""``POST /v1/messages/count_tokens``: the prompt's size, counted by a backend's tokenizer where
it has one, else estimated.

A count costs a backend real work (a tokenizer call, two on llama.cpp), so it is held to what
holds a message: its key's request rate and requests in flight (not its token limits or
budgets: counting spends no tokens), and a slot on the backend (its ``max_concurrency``, its
breaker). A backend that is full or held back by its breaker is not asked: the count is
estimated instead, which is what any tokenizer failure gives too.
"""

from __future__ import annotations

from typing import Any, cast

from flask import Response

from app import jsonc
from app.backends.client import BackendClient
from app.backends.dispatch import Dispatcher
from app.backends.routing import backend_model, resolve
from app.config import Settings
from app.serving.state import RequestState
from app.translate.request import check_request, translate_request
from app.translate.tokens import estimate_prompt_tokens

JSON = "application/json"
# What a count_tokens body has that an Anthropic backend's own count_tokens does not take.
NOT_COUNTED = ("max_tokens", "stream")


def count_tokens(
    body: Any, state: RequestState, settings: Settings, dispatcher: Dispatcher
) -> Response:
    """``input_tokens``, with ``x-gateway-token-count`` saying whether it is exact."""
    if isinstance(body, dict):
        body = {**body, "max_tokens": 1, "stream": False}  # not part of this request
        body.pop("thread", None)  # a count is never a turn of a thread
    check_request(body)
    route = resolve(settings, body["model"])
    outcome = state.outcome
    assert outcome is not None  # every /v1/ request has one
    outcome.model, outcome.route = body["model"], route.name
    state.admit_count()
    target, slot = dispatcher.count_slot(route)
    outcome.backend = target.backend
    client = dispatcher.clients[target.backend]
    payload = _payload(client, body, backend_model(target, body["model"]), settings)
    count = None
    if slot is not None:
        try:
            count = client.count_tokens(payload, state.request_id)
        finally:
            slot.release(None)  # a count says nothing of whether the backend can serve
    how = "estimate" if count is None else "exact"
    if count is None:
        count = estimate_prompt_tokens(payload)
    headers = {"x-gateway-token-count": how}
    return Response(jsonc.dumps({"input_tokens": count}), mimetype=JSON, headers=headers)


def _payload(
    client: BackendClient, body: dict[str, Any], model: str, settings: Settings
) -> dict[str, Any]:
    """The prompt as the backend's tokenizer takes it (and the estimate reads it)."""
    if client.config.protocol == "anthropic":
        return {k: v for k, v in body.items() if k not in NOT_COUNTED} | {"model": model}
    translated = translate_request(
        body,
        backend_model=model,
        dialect=client.config.dialect,
        billing_header=settings.translate.billing_header,
    )
    return cast(dict[str, Any], translated)  # a ChatRequest is a dict at run time
