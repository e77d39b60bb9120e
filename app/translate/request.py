"""Anthropic Messages request -> OpenAI Chat Completions request (pure data in, data out).

Validation happens on the way: every problem becomes an ``InvalidRequest`` naming the field by
its path (``messages.2.content.0.text``), because a backend's own 400 for the translated request
would point at fields the client never sent.
"""

from __future__ import annotations

from typing import Any, Literal, TypeGuard

from app.errors import InvalidRequest, field_error
from app.translate.billing_header import Mode as BillingHeader
from app.translate.billing_header import clean_system_texts
from app.translate.content import (
    SERVER_BLOCKS,
    Block,
    Context,
    assistant_message,
    text_of,
    user_messages,
)
from app.translate.dialect import Dialect
from app.translate.openai_types import ChatMessage, ChatRequest, ReasoningEffort, ToolMessage
from app.translate.tokens import estimate_prompt_tokens
from app.translate.tools import add_tools

# How deep a request may nest. orjson parses up to 1024 levels but encodes only 255, and the
# translation nests parts of the request a few levels deeper, so a request that parses could
# otherwise fail when its payload is encoded; recursive walks (schema cleaning) stay bounded.
MAX_NESTING = 128
_CONTAINERS = (dict, list)

# The gateway matches stop sequences in every streamed piece of text itself: bounded, so that a
# request cannot make each piece cost milliseconds (256 of 1,000 characters: about 0.3 ms a
# piece for sequences built to be slow, microseconds for real ones).
MAX_STOP_SEQUENCES = 256
MAX_STOP_SEQUENCE_CHARS = 1000

# Anthropic effort levels -> the reasoning_effort values OpenAI-style servers accept.
EFFORTS: dict[str, ReasoningEffort] = {
    "low": "low",
    "medium": "medium",
    "high": "high",
    "xhigh": "high",
    "max": "high",
}
SAMPLING: tuple[Literal["temperature", "top_p"], ...] = ("temperature", "top_p")

Turn = tuple[str, list[Block]]


def translate_request(
    body: Any,
    *,
    backend_model: str,
    dialect: Dialect,
    dropped: list[str] | None = None,
    billing_header: BillingHeader,
) -> ChatRequest:
    """Build the Chat Completions payload for a validated Messages request body.

    With ``dialect.drop_unsupported``, what was dropped instead of refused is appended to
    ``dropped`` (paths and reasons), for the caller to report. ``billing_header``: what becomes
    of Claude Code's attribution line (app.translate.billing_header).
    """
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    check_request(body)
    ctx = Context(dialect, dropped if dropped is not None else [])
    _reject_untranslatable(body, ctx)
    system = clean_system_texts(_system_texts(body.get("system"), "system"), billing_header)
    turns = _normalise_turns(body["messages"], system, bool(dialect.reasoning_history))
    messages: list[ChatMessage] = []
    if system:
        messages.append({"role": "system", "content": "\n\n".join(system)})
    for role, blocks in turns:
        if role == "user":
            messages.extend(user_messages(blocks, ctx))
        else:
            messages.append(assistant_message(blocks, ctx))
    payload: ChatRequest = {"model": backend_model, "messages": _pair_tool_results(messages)}
    payload[dialect.max_tokens_field] = body["max_tokens"]
    _add_sampling(payload, body, dialect)
    add_tools(payload, body, ctx)
    _add_thinking(payload, body, dialect)
    _add_output_format(payload, body)
    if turns and turns[-1][0] == "assistant" and dialect.vllm_prefill:
        payload["continue_final_message"] = True
        payload["add_generation_prompt"] = False
    return payload


def clamp_max_tokens(payload: ChatRequest, dialect: Dialect) -> int | None:
    """Lower the output cap to what the backend can give; return the original if lowered.

    vLLM rejects a request outright when prompt plus max_tokens exceed the context, and Claude
    Code asks for 32k-64k whatever the model: clamping keeps such sessions working.
    """
    key = dialect.max_tokens_field
    requested = payload[key]
    limit = requested
    if dialect.max_tokens_cap:
        limit = min(limit, dialect.max_tokens_cap)
    if dialect.context_window:
        # A 25% margin on the estimate: overshooting the window costs the whole request.
        prompt = estimate_prompt_tokens(payload) * 5 // 4
        limit = min(limit, max(dialect.context_window - prompt, 1))
    if limit >= requested:
        return None
    payload[key] = limit
    return requested


def stop_sequences(body: dict[str, Any]) -> list[str]:
    """The client's stop sequences, for matching (translate_request refuses a wrong type;
    this may run before it, so anything but a list is none)."""
    stops = body.get("stop_sequences")
    if not isinstance(stops, list):
        return []
    return [s for s in stops if isinstance(s, str) and s]


# --- top-level validation -------------------------------------------------------------------


def check_request(body: Any) -> None:
    """The fields every route needs, checked before a backend is chosen."""
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    check_nesting(body)
    model = body.get("model")
    if "model" not in body:
        raise field_error("model", "field required")
    if not isinstance(model, str) or not model.strip():
        raise field_error("model", "must be a non-empty string")
    if "max_tokens" not in body:
        raise field_error("max_tokens", "field required")
    max_tokens = body["max_tokens"]
    if not _is_int(max_tokens) or max_tokens < 1:
        raise field_error("max_tokens", "must be an integer of at least 1")
    if "messages" not in body:
        raise field_error("messages", "field required")
    if not isinstance(body["messages"], list):
        raise field_error("messages", "must be an array of messages")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise field_error("stream", "must be a boolean")


def check_nesting(body: Any, limit: int = MAX_NESTING) -> None:
    """Refuse a body nested deeper than ``limit``, naming where. Walked a level at a time
    (one comprehension per level, about 100 µs for a 60 KB Claude Code request), so the
    usual shallow body costs little and a deep one is found without recursion."""
    if _depth_at_least(body, limit):
        raise field_error(_deep_path(body, limit), f"nests deeper than {limit} levels")


def _deep_path(body: Any, limit: int) -> str:
    """The path of the first value at depth ``limit`` + 1 (the body is depth 1)."""
    path: list[str] = []
    value = body
    for _ in range(limit):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, child in items:
            if isinstance(child, _CONTAINERS) and _depth_at_least(child, limit - len(path) - 1):
                path.append(str(key))
                value = child
                break
    return ".".join(path) or "request body"


def _depth_at_least(value: Any, levels: int) -> bool:
    """Whether containers nest ``levels`` levels below ``value`` (the walk of check_nesting)."""
    level = [value] if type(value) in _CONTAINERS else []
    for _ in range(levels):
        level = [
            v
            for c in level
            for v in (c.values() if type(c) is dict else c)
            if type(v) in _CONTAINERS
        ]
        if not level:
            return False
    return True


def _reject_untranslatable(body: dict[str, Any], ctx: Context) -> None:
    """Refuse fields whose silent loss would mislead the client about what ran."""
    if not body.get("mcp_servers"):
        return
    if ctx.dialect.drop_unsupported:
        ctx.dropped.append("mcp_servers")
        return
    raise field_error("mcp_servers", "MCP connectors are not supported by this gateway")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --- system prompt and turns ------------------------------------------------------------------


def _system_texts(system: Any, path: str) -> list[str]:
    """Texts of a ``system`` value (string or text blocks); empty texts are dropped."""
    if system is None:
        return []
    if isinstance(system, str):
        return [system] if system.strip() else []
    if not isinstance(system, list):
        raise field_error(path, "must be a string or an array of text blocks")
    texts = []
    for i, block in enumerate(system):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "mid_conv_system":
            texts.extend(_system_texts(block.get("content"), f"{path}.{i}.content"))
            continue
        if kind != "text":
            raise field_error(f"{path}.{i}", "system blocks must be text blocks")
        text = text_of(block, f"{path}.{i}")
        if text.strip():
            texts.append(text)
    return texts


def _normalise_turns(messages: list[Any], system: list[str], keep_thinking: bool) -> list[Turn]:
    """Validate roles, fold system messages into ``system``, merge same-role neighbours.

    Returns ``(role, blocks)`` per merged turn; each block keeps its source path so errors
    found later still point at what the client sent. Blocks the backend cannot use are dropped
    first, so a turn left empty disappears and its neighbours merge.
    """
    turns: list[Turn] = []
    for i, message in enumerate(messages):
        path = f"messages.{i}"
        if not isinstance(message, dict):
            raise field_error(path, "must be an object with role and content")
        role = message.get("role")
        if role not in ("user", "assistant", "system"):
            raise field_error(f"{path}.role", "must be one of 'user', 'assistant', 'system'")
        if "content" not in message:
            raise field_error(f"{path}.content", "field required")
        if role == "system":
            system.extend(_system_texts(message["content"], f"{path}.content"))
            continue
        blocks = _blocks(message["content"], f"{path}.content")
        if role == "assistant":
            blocks = [b for b in blocks if _useful_in_history(b[1]["type"], keep_thinking)]
        turns.append((role, blocks))
    turns = _merge([t for t in turns if t[1]])
    _trim_prefill(turns)
    if turns and not turns[-1][1]:
        turns.pop()
    if not turns:
        raise field_error("messages", "at least one message with non-empty content is required")
    return turns


def _useful_in_history(kind: str, keep_thinking: bool) -> bool:
    if kind == "thinking":
        return keep_thinking
    return kind not in SERVER_BLOCKS


def _blocks(content: Any, path: str) -> list[Block]:
    """Content as a block list, with empty text blocks dropped (some clients send them)."""
    if isinstance(content, str):
        return [(path, {"type": "text", "text": content})] if content.strip() else []
    if not isinstance(content, list):
        raise field_error(path, "must be a string or an array of content blocks")
    blocks = []
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise field_error(f"{path}.{j}", "must be a content block object with a type")
        if block["type"] == "text" and not text_of(block, f"{path}.{j}").strip():
            continue
        blocks.append((f"{path}.{j}", block))
    return blocks


def _trim_prefill(turns: list[Turn]) -> None:
    """A final assistant turn is a prefill; trailing whitespace would be mis-tokenised."""
    if not turns or turns[-1][0] != "assistant":
        return
    blocks = turns[-1][1]
    while blocks and blocks[-1][1]["type"] == "text":
        path, block = blocks[-1]
        text = block["text"].rstrip()
        if text:
            blocks[-1] = (path, dict(block, text=text))
            return
        blocks.pop()


def _merge(turns: list[Turn]) -> list[Turn]:
    """Consecutive same-role turns become one, as the API itself treats them."""
    merged: list[Turn] = []
    for turn in turns:
        if merged and merged[-1][0] == turn[0]:
            merged[-1][1].extend(turn[1])
        else:
            merged.append(turn)
    return merged


# --- parameters, tools, output format ----------------------------------------------------------


def _pair_tool_results(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Each assistant ``tool_calls`` message followed by exactly one ``tool`` message per call,
    in call order, as backends require; a call with no result gets a placeholder result.

    Backends answer a broken pairing with cryptic 400s, so it is settled (or refused) here.
    """
    paired: list[ChatMessage] = []
    calls: list[str] = []
    results: dict[str, ToolMessage] = {}
    for message in [*messages, None]:  # None: the end, where the last calls are settled
        if message is not None and message["role"] == "tool":
            call_id = message["tool_call_id"]
            if call_id not in calls or call_id in results:
                raise field_error(
                    "messages",
                    f"tool_result for tool_use_id {call_id!r} does not answer a tool_use "
                    "of the assistant turn just before it",
                )
            results[call_id] = message
            continue
        for call_id in calls:
            paired.append(results.get(call_id) or _missing_result(call_id))
        calls = []
        if message is not None and message["role"] == "assistant":
            calls = [c["id"] for c in message.get("tool_calls", ())]
        results = {}
        if message is not None:
            paired.append(message)
    return paired


def _missing_result(call_id: str) -> ToolMessage:
    return {"role": "tool", "tool_call_id": call_id, "content": "(no result)"}


def _add_sampling(payload: ChatRequest, body: dict[str, Any], dialect: Dialect) -> None:
    for key in SAMPLING:
        value = body.get(key)
        if value is None:
            continue
        if not _is_number(value) or not 0 <= value <= 1:
            raise field_error(key, "must be a number between 0 and 1")
        payload[key] = value
    top_k = body.get("top_k")
    if top_k is not None:
        if not _is_int(top_k) or top_k < 0:
            raise field_error("top_k", "must be a non-negative integer")
        if dialect.top_k:
            payload["top_k"] = top_k
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise field_error("stop_sequences", "must be an array of strings")
        if len(stops) > MAX_STOP_SEQUENCES:
            raise field_error("stop_sequences", f"at most {MAX_STOP_SEQUENCES} sequences")
        for i, stop in enumerate(stops):
            if len(stop) > MAX_STOP_SEQUENCE_CHARS:
                message = f"at most {MAX_STOP_SEQUENCE_CHARS} characters"
                raise field_error(f"stop_sequences.{i}", message)
        # Not sent: the gateway matches stop sequences itself (app.translate.text_filter),
        # because backends do not say which one fired, and some take only four.
    _add_user(payload, body.get("metadata"), dialect)


def _add_user(payload: ChatRequest, metadata: Any, dialect: Dialect) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise field_error("metadata", "must be an object")
    user_id = metadata.get("user_id")
    if user_id is not None and not isinstance(user_id, str):
        raise field_error("metadata.user_id", "must be a string or null")
    if user_id and dialect.user_field:
        payload["user"] = user_id


def _add_thinking(payload: ChatRequest, body: dict[str, Any], dialect: Dialect) -> None:
    """Anthropic ``thinking`` / ``output_config.effort`` -> the backend's thinking switch."""
    thinking = body.get("thinking")
    config = body.get("output_config")
    effort = config.get("effort") if isinstance(config, dict) else None
    enabled = _thinking_enabled(thinking)
    if effort is not None and (not isinstance(effort, str) or effort not in EFFORTS):
        raise field_error("output_config.effort", f"must be one of {', '.join(EFFORTS)}")
    if enabled is None and effort is None:
        return
    if dialect.thinking == "chat_template_kwargs" and enabled is not None:
        payload["chat_template_kwargs"] = {"enable_thinking": enabled}
    elif dialect.thinking == "deepseek" and enabled is not None:
        payload["thinking"] = {"type": "enabled" if enabled else "disabled"}
    elif dialect.thinking == "reasoning_effort":
        if enabled is False:
            payload["reasoning_effort"] = "none"
        else:
            payload["reasoning_effort"] = EFFORTS.get(effort or "", _budget_effort(thinking))


def _thinking_enabled(thinking: object) -> bool | None:
    if thinking is None:
        return None
    kind: object = thinking.get("type") if isinstance(thinking, dict) else None
    if kind not in ("enabled", "disabled", "adaptive"):
        raise field_error("thinking.type", "must be one of 'enabled', 'disabled', 'adaptive'")
    if kind == "enabled" and isinstance(thinking, dict):
        budget = thinking.get("budget_tokens")
        if not _is_int(budget) or budget < 1:
            raise field_error("thinking.budget_tokens", "must be a positive integer")
    return kind != "disabled"


def _budget_effort(thinking: object) -> ReasoningEffort:
    budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
    if not _is_int(budget):
        return "medium"
    return "low" if budget <= 4096 else "medium" if budget <= 16384 else "high"


def _add_output_format(payload: ChatRequest, body: dict[str, Any]) -> None:
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise field_error("output_config.format.type", "must be 'json_schema'")
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise field_error("output_config.format.schema", "must be a JSON Schema object")
    payload["response_format"] = {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }
