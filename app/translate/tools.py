"""Tool definitions and ``tool_choice``, Anthropic -> OpenAI functions (pure).

Claude Code sends some 25 tools with large JSON schemas; backends that compile schemas into
grammars (vLLM with guided decoding, llama.cpp) choke on some keywords, so schemas are cleaned
per dialect rather than passed through verbatim.
"""

from __future__ import annotations

from typing import Any

from app.errors import field_error, shown
from app.translate.content import Context
from app.translate.openai_types import ChatRequest, FunctionDefinition, FunctionTool, ToolChoice

# Keys whose values are maps from names to subschemas (the names themselves are not keywords).
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def add_tools(payload: ChatRequest, body: dict[str, Any], ctx: Context) -> None:
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise field_error("tools", "must be an array of tool definitions")
    functions = [
        f for i, tool in enumerate(tools or ()) if (f := _function(tool, f"tools.{i}", ctx))
    ]
    if functions:
        payload["tools"] = functions
    choice = body.get("tool_choice")
    if choice is None:
        return
    if not isinstance(choice, dict):
        raise field_error("tool_choice", "must be an object")
    kind = choice.get("type")
    if kind not in ("auto", "any", "tool", "none"):
        raise field_error("tool_choice.type", "must be one of 'auto', 'any', 'tool', 'none'")
    if kind == "none" or not functions:
        payload.pop("tools", None)  # a backend that ignores tool_choice "none" cannot misuse them
        return
    if kind == "tool":
        name = choice.get("name")
        if name is None:
            raise field_error("tool_choice.name", "field required")
        if not isinstance(name, str):
            raise field_error("tool_choice.name", "must be the name of a tool in tools")
        if name not in {f["function"]["name"] for f in functions}:
            raise field_error("tool_choice.name", f"no tool named {shown(name)} in tools")
    if ctx.dialect.tool_choice:
        payload["tool_choice"] = _openai_choice(kind, choice.get("name"))
    if choice.get("disable_parallel_tool_use"):
        payload["parallel_tool_calls"] = False


def parallel_disabled(body: dict[str, Any]) -> bool:
    """``disable_parallel_tool_use``: the gateway keeps the answer to one tool call itself,
    since some backends (llama.cpp) ignore ``parallel_tool_calls: false``."""
    choice = body.get("tool_choice")
    return isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True


def _openai_choice(kind: str, name: Any) -> ToolChoice:
    if kind == "any":
        return "required"
    if kind == "tool":
        return {"type": "function", "function": {"name": name}}
    return "auto"


def _function(tool: Any, path: str, ctx: Context) -> FunctionTool | None:
    if not isinstance(tool, dict):
        raise field_error(path, "must be an object")
    kind = tool.get("type")
    if kind not in (None, "custom"):
        if ctx.dialect.drop_unsupported:
            ctx.dropped.append(f"{path} (server tool {shown(kind)})")
            return None
        raise field_error(
            f"{path}.type",
            f"server tool {shown(kind)} cannot run on this backend; send custom tools",
        )
    name, schema = tool.get("name"), tool.get("input_schema")
    if not isinstance(name, str) or not name:
        raise field_error(f"{path}.name", "must be a non-empty string")
    if not isinstance(schema, dict):
        raise field_error(f"{path}.input_schema", "must be a JSON Schema object")
    function: FunctionDefinition = {
        "name": name,
        "parameters": clean_schema(schema, frozenset(ctx.dialect.schema_drop_keys)),
    }
    description = tool.get("description")
    if isinstance(description, str) and description:
        limit = ctx.dialect.max_description_chars
        function["description"] = description[:limit] if limit else description
    return {"type": "function", "function": function}


def clean_schema(schema: Any, drop: frozenset[str]) -> Any:
    """A copy of ``schema`` without the ``drop`` keywords, at every depth.

    Property names are data, not keywords: a property called ``format`` survives dropping the
    ``format`` keyword.
    """
    if isinstance(schema, list):
        return [clean_schema(item, drop) for item in schema]
    if not isinstance(schema, dict) or not drop:
        return schema
    cleaned: dict[str, Any] = {}
    for key, value in schema.items():
        if key in drop:
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            cleaned[key] = {name: clean_schema(sub, drop) for name, sub in value.items()}
        else:
            cleaned[key] = clean_schema(value, drop)
    return cleaned
