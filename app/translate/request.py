"""Anthropic Messages request -> OpenAI Chat Completions request (pure data in, data out).

Validation happens on the way: every problem becomes an ``InvalidRequest`` naming the field by
its path (``messages.2.content.0.text``), because a backend's own 400 for the translated request
would point at fields the client never sent.
"""

from __future__ import annotations

from typing import Any

from app import jsonc
from app.errors import InvalidRequest, field_error
from app.translate.dialect import Dialect

# A content block with the path it came from, so errors name what the client sent.
Block = tuple[str, dict[str, Any]]
Turn = tuple[str, list[Block]]

IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})

# Assistant history blocks that only Anthropic's servers produce or can check; a chat backend
# cannot use them, and dropping them keeps the visible conversation intact.
DROPPED_ASSISTANT_BLOCKS = frozenset(
    {
        "thinking",
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


def translate_request(body: Any, *, backend_model: str, dialect: Dialect) -> dict[str, Any]:
    """Build the Chat Completions payload for a validated Messages request body."""
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    _check_required(body)
    _reject_untranslatable(body)
    system = _system_texts(body.get("system"), "system")
    turns = _normalise_turns(body["messages"], system)
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": "\n\n".join(system)})
    for role, blocks in turns:
        if role == "user":
            messages.extend(_user_messages(blocks))
        else:
            messages.append(_assistant_message(blocks))
    payload: dict[str, Any] = {"model": backend_model, "messages": messages}
    payload[dialect.max_tokens_field] = body["max_tokens"]
    _add_sampling(payload, body, dialect)
    _add_tools(payload, body)
    _add_output_format(payload, body)
    if turns and turns[-1][0] == "assistant" and dialect.vllm_prefill:
        payload["continue_final_message"] = True
        payload["add_generation_prompt"] = False
    return payload


def stop_sequences(body: dict[str, Any]) -> list[str]:
    """The client's stop sequences (validated by translate_request), for stop_reason mapping."""
    return [s for s in body.get("stop_sequences") or () if isinstance(s, str) and s]


# --- top-level validation -------------------------------------------------------------------


def _check_required(body: dict[str, Any]) -> None:
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


def _reject_untranslatable(body: dict[str, Any]) -> None:
    """Refuse fields whose silent loss would mislead the client about what ran."""
    if body.get("mcp_servers"):
        raise field_error("mcp_servers", "MCP connectors are not supported by this gateway")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
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
        text = _text_of(block, f"{path}.{i}")
        if text.strip():
            texts.append(text)
    return texts


def _normalise_turns(messages: list[Any], system: list[str]) -> list[Turn]:
    """Validate roles, fold system messages into ``system``, merge same-role neighbours.

    Returns ``(role, blocks)`` per merged turn; each block keeps its source path so errors
    found later still point at what the client sent.
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
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(blocks)
        else:
            turns.append((role, blocks))
    _trim_prefill(turns)
    turns = [t for t in turns if t[1]]
    if not turns:
        raise field_error("messages", "at least one message with non-empty content is required")
    return _merge_after_drops(turns)


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
        if block["type"] == "text" and not _text_of(block, f"{path}.{j}").strip():
            continue
        blocks.append((f"{path}.{j}", block))
    return blocks


def _text_of(block: dict[str, Any], path: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise field_error(f"{path}.text", "must be a string")
    return text


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


def _merge_after_drops(
    turns: list[Turn],
) -> list[Turn]:
    """Dropping empty turns can make two same-role turns neighbours; merge them again."""
    merged: list[Turn] = []
    for turn in turns:
        if merged and merged[-1][0] == turn[0]:
            merged[-1][1].extend(turn[1])
        else:
            merged.append(turn)
    return merged


# --- user turns --------------------------------------------------------------------------------


def _user_messages(blocks: list[Block]) -> list[dict[str, Any]]:
    """Tool results first (one ``tool`` message each), then the rest as one user message."""
    tool_messages: list[dict[str, Any]] = []
    relocated: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for bpath, block in blocks:
        kind = block["type"]
        if kind == "tool_result":
            message, images = _tool_message(block, bpath)
            tool_messages.append(message)
            relocated.extend(images)
        elif kind == "text":
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            parts.append(_image_part(block, bpath))
        elif kind == "document":
            parts.append({"type": "text", "text": _document_text(block, bpath)})
        elif kind in ("tool_use", "thinking", "redacted_thinking"):
            raise field_error(
                f"{bpath}.type", f"'{kind}' blocks are only allowed in assistant turns"
            )
        else:
            raise field_error(f"{bpath}.type", f"unsupported content block type '{kind}'")
    out = tool_messages
    if relocated:
        out.append({"role": "user", "content": relocated})
    if parts:
        out.append({"role": "user", "content": _collapse(parts)})
    return out


def _collapse(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text-only content as one string: many chat templates accept nothing else."""
    if all(p["type"] == "text" for p in parts):
        return "\n\n".join(p["text"] for p in parts)
    return parts


def _tool_message(block: dict[str, Any], path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    tool_use_id = block.get("tool_use_id")
    if not isinstance(tool_use_id, str) or not tool_use_id:
        raise field_error(f"{path}.tool_use_id", "must be a non-empty string")
    texts, images = _tool_result_content(block.get("content"), f"{path}.content")
    text = "\n\n".join(texts)
    if images:
        text = (text + "\n\n" if text else "") + f"({len(images)} image(s) attached below)"
    if block.get("is_error"):
        text = "Error: " + (text or "the tool reported an error")
    message = {"role": "tool", "tool_call_id": tool_use_id, "content": text or "(empty)"}
    return message, images


def _tool_result_content(content: Any, path: str) -> tuple[list[str], list[dict[str, Any]]]:
    if content is None:
        return [], []
    if isinstance(content, str):
        return ([content] if content.strip() else []), []
    if not isinstance(content, list):
        raise field_error(path, "must be a string or an array of content blocks")
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        bpath = f"{path}.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            text = _text_of(block, bpath)
            if text.strip():
                texts.append(text)
        elif kind == "image":
            images.append(_image_part(block, bpath))
        elif kind == "document":
            texts.append(_document_text(block, bpath))
        else:
            raise field_error(f"{bpath}.type", f"unsupported tool_result content type '{kind}'")
    return texts, images


def _image_part(block: dict[str, Any], path: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict):
        raise field_error(f"{path}.source", "field required")
    kind = source.get("type")
    if kind == "base64":
        media_type = source.get("media_type")
        if media_type not in IMAGE_MEDIA_TYPES:
            raise field_error(
                f"{path}.source.media_type",
                f"must be one of {', '.join(sorted(IMAGE_MEDIA_TYPES))}",
            )
        data = source.get("data")
        if not isinstance(data, str) or not data:
            raise field_error(f"{path}.source.data", "must be a non-empty base64 string")
        url = f"data:{media_type};base64,{data}"
    elif kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://", "data:")):
            raise field_error(f"{path}.source.url", "must be an http(s) or data URL")
    else:
        raise field_error(f"{path}.source.type", f"unsupported image source type '{kind}'")
    return {"type": "image_url", "image_url": {"url": url}}


def _document_text(block: dict[str, Any], path: str) -> str:
    """Plain-text documents are inlined; anything else would need a PDF reader upstream."""
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "text" and isinstance(source.get("data"), str):
        body = source["data"]
    elif kind == "content" and isinstance(source.get("content"), str | list):
        texts, images = _tool_result_content(source["content"], f"{path}.source.content")
        if images:
            raise field_error(f"{path}.source.content", "images inside documents are not supported")
        body = "\n\n".join(texts)
    else:
        raise field_error(
            f"{path}.source.type",
            f"document source '{kind}' is not supported by this gateway (only text and content)",
        )
    header = [str(block[k]) for k in ("title", "context") if isinstance(block.get(k), str)]
    return "\n\n".join([*header, body])


# --- assistant turns ---------------------------------------------------------------------------


def _assistant_message(blocks: list[Block]) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for path, block in blocks:
        kind = block["type"]
        if kind == "text":
            texts.append(block["text"])
        elif kind == "tool_use":
            calls.append(_tool_call(block, path))
        elif kind not in DROPPED_ASSISTANT_BLOCKS:
            raise field_error(f"{path}.type", f"unsupported assistant content block type '{kind}'")
    message: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts)}
    if calls:
        message["tool_calls"] = calls
    return message


def _tool_call(block: dict[str, Any], path: str) -> dict[str, Any]:
    call_id, name, tool_input = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(call_id, str) or not call_id:
        raise field_error(f"{path}.id", "must be a non-empty string")
    if not isinstance(name, str) or not name:
        raise field_error(f"{path}.name", "must be a non-empty string")
    if not isinstance(tool_input, dict):
        raise field_error(f"{path}.input", "must be an object")
    arguments = jsonc.dumps_str(tool_input)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# --- parameters, tools, output format ----------------------------------------------------------


def _add_sampling(payload: dict[str, Any], body: dict[str, Any], dialect: Dialect) -> None:
    for key in ("temperature", "top_p"):
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
        stops = [s for s in stops if s]
        if dialect.max_stop_sequences:
            stops = stops[: dialect.max_stop_sequences]
        if stops:
            payload["stop"] = stops
    _add_user(payload, body.get("metadata"), dialect)


def _add_user(payload: dict[str, Any], metadata: Any, dialect: Dialect) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise field_error("metadata", "must be an object")
    user_id = metadata.get("user_id")
    if user_id is not None and not isinstance(user_id, str):
        raise field_error("metadata.user_id", "must be a string or null")
    if user_id and dialect.user_field:
        payload["user"] = user_id


def _add_tools(payload: dict[str, Any], body: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list):
        raise field_error("tools", "must be an array of tool definitions")
    functions = [_function(tool, f"tools.{i}") for i, tool in enumerate(tools)]
    choice = body.get("tool_choice")
    if functions:
        payload["tools"] = functions
    if choice is None:
        return
    if not isinstance(choice, dict):
        raise field_error("tool_choice", "must be an object")
    kind = choice.get("type")
    if kind == "none" or not functions:
        payload.pop("tools", None)  # some backends ignore tool_choice "none"
        return
    if kind == "auto":
        payload["tool_choice"] = "auto"
    elif kind == "any":
        payload["tool_choice"] = "required"
    elif kind == "tool":
        name = choice.get("name")
        if name not in {f["function"]["name"] for f in functions}:
            raise field_error("tool_choice.name", f"no tool named {name!r} in tools")
        payload["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        raise field_error("tool_choice.type", "must be one of 'auto', 'any', 'tool', 'none'")
    if choice.get("disable_parallel_tool_use"):
        payload["parallel_tool_calls"] = False


def _function(tool: Any, path: str) -> dict[str, Any]:
    if not isinstance(tool, dict):
        raise field_error(path, "must be an object")
    kind = tool.get("type")
    if kind not in (None, "custom"):
        raise field_error(
            f"{path}.type",
            f"server tool '{kind}' cannot run on this backend; send custom tools only",
        )
    name, schema = tool.get("name"), tool.get("input_schema")
    if not isinstance(name, str) or not name:
        raise field_error(f"{path}.name", "must be a non-empty string")
    if not isinstance(schema, dict):
        raise field_error(f"{path}.input_schema", "must be a JSON Schema object")
    function: dict[str, Any] = {"name": name, "parameters": schema}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    return {"type": "function", "function": function}


def _add_output_format(payload: dict[str, Any], body: dict[str, Any]) -> None:
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
