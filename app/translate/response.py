"""OpenAI Chat Completion -> Anthropic ``message`` object, plus the mappings streams share.

``stop_reason``, usage and tool-argument parsing live here once, so the streaming and the
non-streaming paths cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from app import ids, jsonc
from app.translate.anthropic_types import ContentBlock, Message, StopReason, Usage
from app.translate.backend_shape import (
    delta_of,
    first_choice,
    function_of,
    malformed,
    tool_calls_of,
)
from app.translate.openai_types import Delta
from app.translate.text_filter import TextFilter
from app.translate.think_tags import split_complete
from app.translate.upstream_errors import error_from_body


def translate_response(
    completion: Any,
    *,
    model: str,
    message_id: str,
    stop_sequences: list[str],
    think_tags: bool = False,
    prefill: str = "",
    single_tool: bool = False,
    max_tokens: int | None = None,
    backend: str = "",
) -> Message:
    """The Anthropic message for a complete (non-streamed) backend answer.

    ``prefill``: the assistant text the request ended with, removed if the answer repeats
    it; the answer is cut at the first of ``stop_sequences`` (app.translate.text_filter).
    ``single_tool``: at most one tool call (``disable_parallel_tool_use``). ``max_tokens``: the
    cap the backend was sent, to tell a full context from it (``context_window_exceeded``).
    ``backend``: its name, for the message of an error about its answer."""
    if not isinstance(completion, dict):
        raise malformed("a response that is not a JSON object", backend)
    if "error" in completion or completion.get("object") == "error":
        raise error_from_body(completion)
    choice = first_choice(completion, backend)
    if choice is None:
        raise malformed("no choices", backend)
    message = delta_of(choice, "message", backend)
    text = TextFilter(stop_sequences, prefill)
    content = _content_blocks(message, think_tags, text, backend)
    if single_tool:
        content = _first_tool_only(content)
    has_tools = any(b["type"] == "tool_use" for b in content)
    stop_reason, stop_sequence = map_stop_reason(
        choice.get("finish_reason"),
        has_tools,
        choice.get("stop_reason"),
        stop_sequences,
        refused=bool(message.get("refusal")),
        context_full=context_window_exceeded(completion, max_tokens),
    )
    if stop_reason is None:
        raise error_from_body(completion)
    if text.matched is not None:
        stop_reason, stop_sequence = "stop_sequence", text.matched
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": map_usage(completion.get("usage"), estimate_output=_estimate(content)),
    }


def _content_blocks(
    message: Delta, think_tags: bool, text_filter: TextFilter, backend: str
) -> list[ContentBlock]:
    """Thinking, then text, then tool calls: the order Anthropic models produce. A stop
    sequence in the text ends the answer there, tool calls included."""
    blocks: list[ContentBlock] = []
    reasoning = reasoning_text(message)
    text = _text(message.get("content"))
    if think_tags and not reasoning:
        reasoning, text = split_complete(text)
    text = text_filter.whole(text) + _text(message.get("refusal"))
    if reasoning:
        blocks.append(
            {"type": "thinking", "thinking": reasoning, "signature": ids.thinking_signature()}
        )
    if text:
        blocks.append({"type": "text", "text": text})
    if text_filter.matched is not None:
        return blocks
    seen: set[str] = set()
    for call in tool_calls_of(message, backend):
        function = function_of(call)
        call_id = tool_use_id(call.get("id"), seen)
        blocks.append(
            {
                "type": "tool_use",
                "id": call_id,
                "name": function.get("name") or "",
                "input": parse_arguments(function.get("arguments")),
            }
        )
    return blocks


def _first_tool_only(blocks: list[ContentBlock]) -> list[ContentBlock]:
    first = next((i for i, b in enumerate(blocks) if b["type"] == "tool_use"), None)
    if first is None:
        return blocks
    return [b for i, b in enumerate(blocks) if b["type"] != "tool_use" or i == first]


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts, as some servers return
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def reasoning_text(delta: Delta) -> str:
    """Reasoning under either name (vLLM/Ollama ``reasoning``, DeepSeek/llama.cpp ``_content``)."""
    text: object = delta.get("reasoning_content") or delta.get("reasoning")
    return text if isinstance(text, str) else ""


def tool_use_id(upstream_id: object, seen: set[str]) -> str:
    """Keep the backend's call id when usable and unique, else mint a ``toolu_`` id."""
    if isinstance(upstream_id, str) and upstream_id and upstream_id not in seen:
        seen.add(upstream_id)
        return upstream_id
    new_id = ids.tool_use_id()
    seen.add(new_id)
    return new_id


_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")


def parse_arguments(arguments: object) -> dict[str, Any]:
    """Tool arguments as an object: parsed, repaired when unambiguous, or wrapped raw.

    A broken ``input`` would crash the client's JSON handling; wrapping the raw text under
    ``_raw_arguments`` lets the tool reject it and the model try again.
    """
    if isinstance(arguments, dict):
        return arguments
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    text = str(arguments)
    for candidate in (text, _FENCE.sub(r"\1", text), _TRAILING_COMMA.sub(r"\1", text)):
        try:
            value = jsonc.loads(candidate)
        except jsonc.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return {"_raw_arguments": text}


def map_stop_reason(
    finish_reason: object,
    has_tool_calls: bool,
    matched: object,
    stop_sequences: list[str],
    *,
    refused: bool = False,
    context_full: bool = False,
) -> tuple[StopReason | None, str | None]:
    """OpenAI ``finish_reason`` -> Anthropic ``(stop_reason, stop_sequence)``.

    ``matched`` is vLLM's per-choice ``stop_reason``: the stop string that fired, the only way
    to learn which one did. ``refused``: the backend sent refusal text. ``context_full``: the
    answer showed that a ``length`` stop was the context window's (``context_window_exceeded``).
    Returns ``(None, None)`` for ``error``, which is not a stop.
    """
    if finish_reason == "error":
        return None, None
    if finish_reason in CONTEXT_FULL_REASONS or (finish_reason == "length" and context_full):
        return "model_context_window_exceeded", None
    if finish_reason == "length":
        return "max_tokens", None
    if has_tool_calls or finish_reason in ("tool_calls", "function_call"):
        return "tool_use", None
    if finish_reason == "content_filter" or refused:
        return "refusal", None
    if isinstance(matched, str) and matched in stop_sequences:
        return "stop_sequence", matched
    return "end_turn", None


# finish_reason values that name the full context outright: Mistral's, and Anthropic's own.
CONTEXT_FULL_REASONS = ("model_length", "model_context_window_exceeded")


def context_window_exceeded(obj: Mapping[str, Any], max_tokens: int | None = None) -> bool:
    """Whether a backend's completion, or one chunk of its stream, shows that a ``length``
    stop came from the context window filling up rather than from ``max_tokens``.

    Clients act differently on the two (Claude Code says the context is full instead of
    suggesting a larger output cap). Most backends cannot tell them apart by then: older vLLM,
    SGLang, OpenAI and DeepSeek refuse up front a request whose prompt plus ``max_tokens``
    does not fit, Ollama shifts its context. llama.cpp only checks the prompt, then stops with
    the same ``length`` either way, and so does vLLM 0.32 (it lowers ``max_tokens`` to
    what fits); what tells it apart is llama.cpp's debugging block (``__verbose``,
    ``truncated`` at a ``limit`` stop before ``n_predict`` tokens), or, given the
    ``max_tokens`` it was sent, a count of fewer tokens than that (llama.cpp's ``timings``,
    anyone's ``usage``: a ``length`` stop short of ``max_tokens`` is the window's). Stream callers
    test every chunk: the two arrive in different ones. Meant for ``map_stop_reason``, which
    heeds it only for a ``length`` stop. Safe on any shape: what is not as expected is no
    evidence.
    """
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        if choices[0].get("finish_reason") in CONTEXT_FULL_REASONS:
            return True
    usage = obj.get("usage")
    return (
        _verbose_says_context_full(obj.get("__verbose"))
        or _stopped_short(obj.get("timings"), "predicted_n", max_tokens)
        or _stopped_short(usage, "completion_tokens", max_tokens)
    )


def _verbose_says_context_full(verbose: object) -> bool:
    if not isinstance(verbose, dict) or verbose.get("truncated") is not True:
        return False
    if verbose.get("stop_type") != "limit":
        return False
    settings = verbose.get("generation_settings")
    budget = _int(settings.get("n_predict")) if isinstance(settings, dict) else 0
    return budget <= 0 or _int(verbose.get("tokens_predicted")) < budget


def _stopped_short(counts: object, key: str, max_tokens: int | None) -> bool:
    if not isinstance(counts, dict) or not max_tokens:
        return False
    predicted = counts.get(key)
    if not isinstance(predicted, int) or isinstance(predicted, bool):
        return False  # no count is no evidence
    return predicted < max_tokens


def map_usage(usage: object, *, estimate_output: int = 0) -> Usage:
    """OpenAI usage -> Anthropic usage; ``input_tokens`` excludes cached tokens there."""
    if not isinstance(usage, dict):
        usage = {}
    prompt = _int(usage.get("prompt_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    cached = cached or _int(usage.get("prompt_cache_hit_tokens"))
    output = usage.get("completion_tokens")
    return {
        "input_tokens": max(prompt - cached, 0),
        "output_tokens": _int(output) if output is not None else estimate_output,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _estimate(content: list[ContentBlock]) -> int:
    """Rough output size (4 characters a token) for backends that report no usage."""
    chars = 0
    for block in content:
        if block["type"] == "text":
            chars += len(block["text"])
        elif block["type"] == "thinking":
            chars += len(block["thinking"])
    return (chars + 3) // 4
