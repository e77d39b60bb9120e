"""Token estimates for when the backend cannot count: clamping and count_tokens fallback.

A documented rough rule, not a tokenizer: four UTF-8 bytes a token (about four characters of
English, one CJK character, since those take three bytes), plus a few tokens of chat-template
framing per message. It needs no vocabulary file, so it works offline and costs microseconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app import jsonc

BYTES_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4


def estimate_prompt_tokens(payload: Mapping[str, Any]) -> int:
    """Estimated prompt size of an OpenAI chat payload (messages and tool definitions)."""
    messages = payload.get("messages") or []
    size = sum(len(_text(m.get("content")).encode()) for m in messages)
    size += sum(len(jsonc.dumps(m["tool_calls"])) for m in messages if m.get("tool_calls"))
    if payload.get("tools"):
        size += len(jsonc.dumps(payload["tools"]))
    return size // BYTES_PER_TOKEN + TOKENS_PER_MESSAGE * len(messages)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # Image parts count as a fixed-size placeholder, not their base64 length.
        return "".join(
            p.get("text", "") if p.get("type") == "text" else "x" * 3000 for p in content
        )
    return ""


# An image or a document passed as data counts as this many tokens, not its base64 length.
TOKENS_PER_ATTACHMENT = 1600


def estimate_request_tokens(body: dict[str, Any]) -> int:
    """Estimated input of an Anthropic Messages request (system, messages, tools), for the
    token limits to reserve at admission (its real count settles them at the end)."""
    size = _bytes(body.get("system"))
    messages = body.get("messages")
    attachments = 0
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            blocks, found = _blocks_size(content)
            size += blocks
            attachments += found
    if body.get("tools"):
        size += len(jsonc.dumps(body["tools"]))
    count = len(messages) if isinstance(messages, list) else 0
    return (
        size // BYTES_PER_TOKEN + TOKENS_PER_MESSAGE * count + TOKENS_PER_ATTACHMENT * attachments
    )


def _blocks_size(content: Any) -> tuple[int, int]:
    """(bytes of text, attachments) of a message's content, tool results included."""
    if not isinstance(content, list):
        return _bytes(content), 0
    size = attachments = 0
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind in ("image", "document") and not _is_text_document(block):
            attachments += 1
        elif kind == "tool_use":
            size += len(jsonc.dumps(block.get("input") or {}))
        elif kind == "tool_result":
            inner, found = _blocks_size(block.get("content"))
            size, attachments = size + inner, attachments + found
        else:
            size += _bytes(block.get("text") or block.get("thinking") or block.get("source"))
    return size, attachments


def _is_text_document(block: dict[str, Any]) -> bool:
    source = block.get("source")
    return isinstance(source, dict) and source.get("type") in ("text", "content")


def _bytes(value: Any) -> int:
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        return sum(_bytes(v.get("text") if isinstance(v, dict) else v) for v in value)
    if isinstance(value, dict):
        return _bytes(value.get("data") or value.get("content"))
    return 0
