"""Anthropic content blocks -> OpenAI messages, one merged turn at a time (pure).

The ordering rules are the backend's, not Anthropic's: an assistant message with ``tool_calls``
must be followed at once by one ``tool`` message per call, so a user turn's tool results come
first and its text and images after them; ``tool`` messages cannot carry images, so those move
to a user message of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app import jsonc
from app.errors import field_error, shown
from app.ids import is_gateway_signature
from app.translate.dialect import Dialect
from app.translate.openai_types import (
    AssistantMessage,
    ContentPart,
    ImagePart,
    ToolCall,
    ToolMessage,
    UserMessage,
)

# A content block with the path it came from, so errors name what the client sent.
Block = tuple[str, dict[str, Any]]

IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
MAX_IMAGE_BYTES = 5 * 1024 * 1024  # Anthropic's per-image limit

# Assistant history blocks only Anthropic's servers produce or can use; a chat backend cannot,
# and dropping them keeps the visible conversation intact.
SERVER_BLOCKS = frozenset(
    {
        "redacted_thinking",
        "server_tool_use",
        "web_search_tool_result",
        "web_fetch_tool_result",
        "code_execution_tool_result",
        "bash_code_execution_tool_result",
        "text_editor_code_execution_tool_result",
        "tool_search_tool_result",
        "container_upload",
    }
)


@dataclass
class Context:
    """What block conversion needs besides the blocks: the backend's dialect, and where to
    note blocks dropped instead of refused (``dialect.drop_unsupported``)."""

    dialect: Dialect
    dropped: list[str] = field(default_factory=list)


def text_of(block: dict[str, Any], path: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise field_error(f"{path}.text", "must be a string")
    return text


# --- user turns ---------------------------------------------------------------------------------


def user_messages(blocks: list[Block], ctx: Context) -> list[ToolMessage | UserMessage]:
    """Tool results first (one ``tool`` message each), then the rest as one user message."""
    tool_messages: list[ToolMessage | UserMessage] = []
    relocated: list[ContentPart] = []
    parts: list[ContentPart] = []
    for path, block in blocks:
        kind = block["type"]
        if kind == "tool_result":
            message, images = _tool_message(block, path, ctx)
            tool_messages.append(message)
            relocated.extend(images)
        elif kind == "text":
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            parts.append(_image_part(block, path, ctx))
        elif kind in ("document", "search_result"):
            text = _document_text(block, path, ctx)
            if text is not None:
                parts.append({"type": "text", "text": text})
        elif kind in ("tool_use", "thinking", "redacted_thinking"):
            raise field_error(
                f"{path}.type", f"{shown(kind)} blocks are only allowed in assistant turns"
            )
        else:
            raise field_error(f"{path}.type", f"unsupported content block type {shown(kind)}")
    # Images moved out of tool results and the turn's own blocks share one user message:
    # strict chat templates refuse two user messages in a row.
    if relocated or parts:
        tool_messages.append({"role": "user", "content": _collapse(relocated + parts)})
    return tool_messages


def _collapse(parts: list[ContentPart]) -> str | list[ContentPart]:
    """Text-only content as one string: many chat templates accept nothing else."""
    texts = [p["text"] for p in parts if p["type"] == "text"]
    if len(texts) == len(parts):
        return "\n\n".join(texts)
    return parts


def _tool_message(
    block: dict[str, Any], path: str, ctx: Context
) -> tuple[ToolMessage, list[ImagePart]]:
    tool_use_id = block.get("tool_use_id")
    if not isinstance(tool_use_id, str) or not tool_use_id:
        raise field_error(f"{path}.tool_use_id", "must be a non-empty string")
    texts, images = _nested_content(block.get("content"), f"{path}.content", ctx)
    text = "\n\n".join(texts)
    if images:
        text = (text + "\n\n" if text else "") + f"({len(images)} image(s) attached below)"
    if block.get("is_error"):
        text = "Error: " + (text or "the tool reported an error")
    message: ToolMessage = {
        "role": "tool",
        "tool_call_id": tool_use_id,
        "content": text or "(empty)",
    }
    return message, images


def _nested_content(content: Any, path: str, ctx: Context) -> tuple[list[str], list[ImagePart]]:
    """Texts and image parts of a tool_result's (or a document's) content."""
    if content is None:
        return [], []
    if isinstance(content, str):
        return ([content] if content.strip() else []), []
    if not isinstance(content, list):
        raise field_error(path, "must be a string or an array of content blocks")
    texts: list[str] = []
    images: list[ImagePart] = []
    for j, block in enumerate(content):
        bpath = f"{path}.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            text = text_of(block, bpath)
            if text.strip():
                texts.append(text)
        elif kind == "image":
            images.append(_image_part(block, bpath, ctx))
        elif kind in ("document", "search_result"):
            document = _document_text(block, bpath, ctx)
            if document is not None:
                texts.append(document)
        elif kind == "tool_reference":
            name = block.get("tool_name")
            texts.append(f"(tool reference: {name if isinstance(name, str) else ''})")
        else:
            raise field_error(f"{bpath}.type", f"unsupported content type {shown(kind)}")
    return texts, images


def _image_part(block: dict[str, Any], path: str, ctx: Context) -> ImagePart:
    if not ctx.dialect.images:
        raise field_error(f"{path}.type", "this backend does not accept images")
    source = block.get("source")
    if not isinstance(source, dict):
        raise field_error(f"{path}.source", "field required")
    kind = source.get("type")
    if kind == "base64":
        url = _data_url(source, path)
    elif kind == "url":
        given = source.get("url")
        if not isinstance(given, str) or not given.startswith(("http://", "https://", "data:")):
            raise field_error(f"{path}.source.url", "must be an http(s) or data URL")
        url = given
        if not ctx.dialect.image_urls and not url.startswith("data:"):
            raise field_error(
                f"{path}.source.url", "this backend takes base64 images only, not image URLs"
            )
    else:
        raise field_error(f"{path}.source.type", f"unsupported image source type {shown(kind)}")
    return {"type": "image_url", "image_url": {"url": url}}


def _data_url(source: dict[str, Any], path: str) -> str:
    media_type = source.get("media_type")
    if not isinstance(media_type, str) or media_type not in IMAGE_MEDIA_TYPES:
        allowed = ", ".join(sorted(IMAGE_MEDIA_TYPES))
        raise field_error(f"{path}.source.media_type", f"must be one of {allowed}")
    data = source.get("data")
    if not isinstance(data, str) or not data:
        raise field_error(f"{path}.source.data", "must be a non-empty base64 string")
    if len(data) * 3 // 4 > MAX_IMAGE_BYTES:
        raise field_error(f"{path}.source.data", "image exceeds the 5 MB maximum")
    return f"data:{media_type};base64,{data}"


def _document_text(block: dict[str, Any], path: str, ctx: Context) -> str | None:
    """Text documents and search results inline as text; None when dropped (PDF etc.)."""
    if block["type"] == "search_result":
        texts, _ = _nested_content(block.get("content"), f"{path}.content", ctx)
        header = [str(block.get("title", "")), str(block.get("source", ""))]
        return "\n\n".join([h for h in header if h] + texts)
    source = block.get("source")
    if not isinstance(source, dict):
        source = {}
    kind = source.get("type")
    if kind == "text" and isinstance(source.get("data"), str):
        body = source["data"]
    elif kind == "content" and isinstance(source.get("content"), str | list):
        texts, images = _nested_content(source["content"], f"{path}.source.content", ctx)
        if images:
            raise field_error(f"{path}.source.content", "images inside documents are not supported")
        body = "\n\n".join(texts)
    elif ctx.dialect.drop_unsupported:
        ctx.dropped.append(f"{path} (document source {shown(kind)})")
        return None
    else:
        raise field_error(
            f"{path}.source.type",
            f"document source {shown(kind)} is not supported by this gateway "
            "(only text and content)",
        )
    header = [str(block[k]) for k in ("title", "context") if isinstance(block.get(k), str)]
    return "\n\n".join([*header, body])


# --- assistant turns ------------------------------------------------------------------------------


def assistant_message(blocks: list[Block], ctx: Context) -> AssistantMessage:
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[ToolCall] = []
    for path, block in blocks:
        kind = block["type"]
        if kind == "text":
            texts.append(block["text"])
        elif kind == "tool_use":
            calls.append(_tool_call(block, path))
        elif kind == "thinking":
            # Only reasoning this gateway's backends produced goes back; another model's
            # (Anthropic's own, from an earlier part of the session) means nothing here.
            if is_gateway_signature(block.get("signature")) and isinstance(
                block.get("thinking"), str
            ):
                thinking.append(block["thinking"])
        elif kind not in SERVER_BLOCKS:
            raise field_error(
                f"{path}.type", f"unsupported assistant content block type {shown(kind)}"
            )
    message: AssistantMessage = {"role": "assistant", "content": "\n\n".join(texts)}
    if calls:
        message["tool_calls"] = calls
    field_name = ctx.dialect.reasoning_history
    if field_name and (thinking or calls):
        # DeepSeek refuses a tool-call turn without its reasoning: send "" rather than nothing.
        message[field_name] = "\n\n".join(thinking)
    return message


def _tool_call(block: dict[str, Any], path: str) -> ToolCall:
    call_id, name, tool_input = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(call_id, str) or not call_id:
        raise field_error(f"{path}.id", "must be a non-empty string")
    if not isinstance(name, str) or not name:
        raise field_error(f"{path}.name", "must be a non-empty string")
    if not isinstance(tool_input, dict):
        raise field_error(f"{path}.input", "must be an object")
    arguments = jsonc.dumps_str(tool_input)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
