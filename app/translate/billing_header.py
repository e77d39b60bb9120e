"""Claude Code's attribution line in the system prompt, made cache-friendly (pure).

Claude Code opens its system prompt with a line of its own, for Anthropic's billing:

    x-anthropic-billing-header: cc_version=2.1.197.3a3; cc_entrypoint=cli; cch=7f3a9;

The last part of ``cc_version`` is a hash of the conversation's first message, so it differs
from one conversation (and subagent) to the next, and ``cch`` (sent to any server by earlier
versions, only to Anthropic's own API by 2.1.197) differs on every request. The line comes
first in the prompt, so a backend's prefix cache could never match past it: every request would
recompute the system prompt and the tool definitions behind it, tens of thousands of tokens.

Modes (``[translate] billing_header``):

- ``normalize`` (the default) gives the changing values fixed ones, so that every request of
  every conversation of a Claude Code version starts with the same bytes (llama.cpp's own
  Anthropic endpoint fixes ``cch`` likewise); the line itself stays as the client sent it;
- ``drop`` removes the line (vLLM's Anthropic endpoint drops a system block that starts with it);
- ``keep`` sends it as it came.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal, get_args

Mode = Literal["normalize", "drop", "keep"]
MODES: tuple[Mode, ...] = get_args(Mode)
MARKER = "x-anthropic-billing-header:"

# The line: the marker at the start of a line, then ``key=value;`` pairs. Claude Code gives it
# a system block of its own; older versions ran the prompt on after the last ``;`` ("...;You are
# Claude Code"), and a string system prompt may have it on its first line.
_LINE = re.compile(r"^x-anthropic-billing-header:(?:[ \t]*[\w.-]+=[^;\n]*;)*[ \t]*\n?", re.M)
_CCH = re.compile(r"\bcch=[^;]*;")
_FINGERPRINT = re.compile(r"\b(cc_version=\d+\.\d+\.\d+)\.[^;]*;")
FIXED_CCH = "cch=00000;"  # what Claude Code itself writes before the value is filled in
FIXED_FINGERPRINT = "000"


def clean_system_texts(texts: list[str], mode: Mode) -> list[str]:
    """The system prompt's texts with the attribution line normalised, dropped or kept.

    Returns ``texts`` itself when there is nothing to do (a substring test, before any
    regular expression, keeps that path cheap); a text left empty by ``drop`` is removed.
    """
    if mode not in MODES:
        raise ValueError(f"billing_header: must be one of {', '.join(MODES)} (got {mode!r})")
    if mode == "keep" or not any(MARKER in text for text in texts):
        return texts
    replace = _normalized if mode == "normalize" else _dropped
    cleaned = [_clean(text, replace) if MARKER in text else text for text in texts]
    return [text for text in cleaned if text.strip()]


def _clean(text: str, replace: Callable[[re.Match[str]], str]) -> str:
    """``text`` with each attribution line replaced; the expression runs only where the
    marker is (a system prompt is tens of kilobytes, the line one of its first)."""
    parts: list[str] = []
    done = 0
    at = text.find(MARKER)
    while at != -1:
        line = _LINE.match(text, at)  # None unless the marker starts a line
        if line:
            parts += (text[done:at], replace(line))
            done = line.end()
        at = text.find(MARKER, max(at + 1, done))
    return "".join(parts) + text[done:] if parts else text


def _normalized(line: re.Match[str]) -> str:
    fixed = _CCH.sub(FIXED_CCH, line.group())
    return _FINGERPRINT.sub(rf"\1.{FIXED_FINGERPRINT};", fixed)


def _dropped(line: re.Match[str]) -> str:
    return ""
