"""``<think>…</think>`` at the start of the answer text -> a thinking segment (pure).

Reasoning models served without a reasoning parser (vLLM without ``--reasoning-parser``,
llama.cpp with ``reasoning_format: none``) put their reasoning inline in ``content``. With the
``think_tags`` quirk the gateway splits it off into a thinking block, as a backend with a parser
would. Only a tag that opens the answer counts: a ``<think>`` later in the text is content.
"""

from __future__ import annotations

import re

OPEN, CLOSE = "<think>", "</think>"
_LEADING = re.compile(r"^\s*<think>(.*?)</think>\s*", re.S)


def split_complete(text: str) -> tuple[str, str]:
    """(thinking, text) of a whole answer."""
    match = _LEADING.match(text)
    if not match:
        return "", text
    return match.group(1).strip(), text[match.end() :]


class ThinkTagSplitter:
    """Incremental: feed content pieces, get ``(kind, text)`` segments; tags may span pieces."""

    __slots__ = ("_state", "_held")

    def __init__(self) -> None:
        self._state = "start"  # start -> thinking -> after -> text
        self._held = ""

    def feed(self, piece: str) -> list[tuple[str, str]]:
        text, self._held = self._held + piece, ""
        if self._state == "start":
            return self._at_start(text)
        if self._state == "thinking":
            return self._in_thinking(text)
        if self._state == "after":  # drop the blank lines between </think> and the answer
            text = text.lstrip()
            if not text:
                return []
            self._state = "text"
        return [("text", text)]

    def flush(self) -> list[tuple[str, str]]:
        held, self._held = self._held, ""
        if not held:
            return []
        return [("thinking" if self._state == "thinking" else "text", held)]

    def _at_start(self, text: str) -> list[tuple[str, str]]:
        stripped = text.lstrip()
        if stripped.startswith(OPEN):
            self._state = "thinking"
            return self._in_thinking(stripped[len(OPEN) :])
        if OPEN.startswith(stripped):  # maybe the tag's first characters: wait for more
            self._held = text
            return []
        self._state = "text"
        return [("text", text)]

    def _in_thinking(self, text: str) -> list[tuple[str, str]]:
        end = text.find(CLOSE)
        if end >= 0:
            self._state = "after"
            rest = self.feed(text[end + len(CLOSE) :])
            return ([("thinking", text[:end])] if text[:end] else []) + rest
        keep = _partial_suffix(text, CLOSE)
        self._held = text[len(text) - keep :] if keep else ""
        emit = text[: len(text) - keep]
        return [("thinking", emit)] if emit else []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0
