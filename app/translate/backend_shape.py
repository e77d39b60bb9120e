"""A backend's answer or stream chunk, walked safely: each object and list the translators
step into is checked to be one before they do, and a wrong one is an ``UpstreamError``
naming it, counted against the backend, instead of an ``AttributeError`` the client would
see as the gateway's own internal error.

The rule: containers (the choice, its delta or message, ``tool_calls`` and each call, its
``function``) and the tool call's name and arguments are checked here; other leaves (text,
reasoning, finish reason, usage counts) are checked where they are read, where a value of the
wrong type is ignored as it always was. After the checks the values carry the types of
app.translate.openai_types; the checks cost a few ``isinstance`` calls a chunk.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, cast

from app.errors import UpstreamError
from app.translate.openai_types import Choice, Delta, FunctionFragment, ToolCallFragment


def malformed(what: str, backend: str = "") -> UpstreamError:
    """The error for an answer or chunk that is not of the OpenAI shape: the backend's fault
    (it cannot serve), reported as any unusable backend answer is."""
    who = f"backend {backend}" if backend else "backend"
    return UpstreamError(f"{who} sent {what}", backend_fault=True)


def first_choice(answer: Mapping[str, Any], backend: str = "") -> Choice | None:
    """``choices[0]``; None when there are no choices (a stream's usage chunk)."""
    choices = answer.get("choices")
    if not choices:
        return None
    if not isinstance(choices, list):
        raise malformed("choices that are not an array", backend)
    choice = choices[0]
    if not isinstance(choice, dict):
        raise malformed("a choice that is not an object", backend)
    return cast(Choice, choice)


def delta_of(choice: Choice, field: Literal["delta", "message"], backend: str = "") -> Delta:
    """A stream choice's ``delta`` or an answer's ``message``; empty when absent or null."""
    value: object = choice.get(field)
    if not value:
        return {}
    if not isinstance(value, dict):
        raise malformed(f"a {field} that is not an object", backend)
    return cast(Delta, value)


def tool_calls_of(delta: Delta, backend: str = "") -> list[ToolCallFragment]:
    """The tool calls (or their fragments) of a delta or message, each checked; the legacy
    single ``function_call`` as call 0."""
    calls: object = delta.get("tool_calls")
    if not calls:
        legacy: object = delta.get("function_call")
        if isinstance(legacy, dict):
            return [checked_call({"index": 0, "function": legacy}, backend)]
        return []
    if not isinstance(calls, list):
        raise malformed("tool_calls that are not an array", backend)
    return [checked_call(call, backend) for call in calls]


def checked_call(call: object, backend: str = "") -> ToolCallFragment:
    """One entry of ``tool_calls``: an object whose ``function``, if any, is an object with a
    string ``name`` and ``arguments`` as JSON text (or, as some servers send them, the
    object itself)."""
    if not isinstance(call, dict):
        raise malformed("a tool call that is not an object", backend)
    function = call.get("function")
    if function is None:
        return cast(ToolCallFragment, call)
    if not isinstance(function, dict):
        raise malformed("a tool call whose function is not an object", backend)
    name = function.get("name")
    if name is not None and not isinstance(name, str):
        raise malformed("a tool call whose name is not a string", backend)
    arguments = function.get("arguments")
    if arguments is not None and not isinstance(arguments, str | dict):
        raise malformed("tool call arguments that are neither JSON text nor an object", backend)
    return cast(ToolCallFragment, call)


def function_of(call: ToolCallFragment) -> FunctionFragment:
    return call.get("function") or {}
