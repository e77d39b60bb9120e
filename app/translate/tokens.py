"""Token estimates for when the backend cannot count: clamping and count_tokens fallback.

A documented rough rule, not a tokenizer: four UTF-8 bytes a token (about four characters of
English, one CJK character, since those take three bytes), plus a few tokens of chat-template
framing per message. It needs no vocabulary file, so it works offline and costs microseconds.
"""

from __future__ import annotations

from typing import Any

from app import jsonc

BYTES_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4


def estimate_prompt_tokens(payload: dict[str, Any]) -> int:
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
