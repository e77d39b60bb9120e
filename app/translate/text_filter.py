"""The answer's text as Anthropic would give it: the prefill's echo removed, cut at the first
stop sequence (pure).

Backends differ in both. llama.cpp repeats an assistant prefill at the start of its answer
and never says which stop sequence fired; OpenAI takes at most four. So the gateway sends no
stop sequences at all and matches them itself, on every backend alike, and strips a repeated
prefill. In a stream, text is held back only while it could still be the start of a stop
sequence or of the prefill's echo, so the client sees everything else as it comes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class PrefillEcho:
    """Removes the prefill when the answer starts by repeating it.

    Until the answer has either repeated the whole prefill or departed from it, its text is
    held back; a departure releases everything held, so nothing the model wrote is lost.
    Whitespace before the echo (some templates start the answer on a new line) is part of it.
    """

    __slots__ = ("prefill", "held", "matched", "done")

    def __init__(self, prefill: str) -> None:
        self.prefill = prefill
        self.held: list[str] = []  # the text held back, as it came
        self.matched = 0  # characters of the prefill the answer has repeated so far
        self.done = not prefill

    def feed(self, text: str) -> str:
        if self.done:
            return text
        self.held.append(text)
        if not self.matched:
            text = text.lstrip()
            if not text:
                return ""
        prefill, at = self.prefill, self.matched
        left = len(prefill) - at
        if len(text) >= left and text.startswith(prefill[at:]):  # (slices no more than text)
            self._end()  # the echo is complete: the rest is the continuation
            return text[left:]
        if prefill.startswith(text, at):  # still echoing: hold it
            self.matched += len(text)
            return ""
        return self.flush()  # not an echo: give back what was held

    def flush(self) -> str:
        """At the end of the answer, or once it departs from the prefill: what was held is
        the model's own text."""
        held = "".join(self.held)
        self._end()
        return held

    def _end(self) -> None:
        self.done = True
        self.held = []


class StopMatcher:
    """Finds the first stop sequence in text that arrives in pieces."""

    __slots__ = ("sequences", "held", "matched")

    def __init__(self, sequences: list[str]) -> None:
        self.sequences = [s for s in dict.fromkeys(sequences) if s]
        self.held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """The text that can go to the client now. After a match, the text before it; the
        answer ends there, and anything fed later is dropped."""
        if self.matched is not None:
            return ""
        text = self.held + text
        self.held = ""
        if not self.sequences:
            return text
        cut, found = _first_match(text, self.sequences)
        if found is not None:
            self.matched = found
            return text[:cut]
        keep = _partial_tail(text, self.sequences)
        if keep:
            self.held = text[-keep:]
            return text[:-keep]
        return text

    def flush(self) -> str:
        """At the end of the answer: a tail that never became a stop sequence is text."""
        held, self.held = self.held, ""
        return held


def _first_match(text: str, sequences: list[str]) -> tuple[int, str | None]:
    """Where the answer ends: at the sequence that is complete first as the text is written
    (the earliest end), as a model stops at the first one it produces; between two that end
    together, the longer."""
    best_end, best_at, found = len(text) + 1, 0, None
    for sequence in sequences:
        at = text.find(sequence, 0, best_end)
        if at == -1:
            continue
        end = at + len(sequence)
        if end < best_end or (end == best_end and at < best_at):
            best_end, best_at, found = end, at, sequence
    return best_at, found


def _partial_tail(text: str, sequences: list[str]) -> int:
    """How many characters at the end of ``text`` could begin a stop sequence.

    Only the places where a sequence holds the text's last character are tried (found by
    ``rfind``, in C), so a long sequence costs little unless it really matches there."""
    if not text:
        return 0
    last = text[-1]
    longest = 0
    for sequence in sequences:
        size = min(len(sequence) - 1, len(text))
        while size > longest:
            size = sequence.rfind(last, 0, size) + 1  # the longest candidate ending in ``last``
            if size <= longest:
                break
            if text.endswith(sequence[:size]):
                longest = size
                break
            size -= 1
    return longest


class TextFilter:
    """The prefill's echo, then the stop sequences, over the answer's text."""

    __slots__ = ("echo", "stops")

    def __init__(self, stop_sequences: list[str], prefill: str = "") -> None:
        self.echo = PrefillEcho(prefill)
        self.stops = StopMatcher(stop_sequences)

    @property
    def matched(self) -> str | None:
        """The stop sequence that ended the answer, if one did."""
        return self.stops.matched

    def feed(self, text: str) -> str:
        return self.stops.feed(self.echo.feed(text))

    def flush(self) -> str:
        return self.stops.feed(self.echo.flush()) + self.stops.flush()

    def whole(self, text: str) -> str:
        """A complete answer's text at once."""
        return self.feed(text) + (self.flush() if self.matched is None else "")


def prefill_of(payload: Mapping[str, Any]) -> str:
    """The assistant prefill a Chat Completions payload ends with ("" if none): the text a
    backend that echoes it will repeat. vLLM continues the final message without repeating
    it (``continue_final_message``), so there is nothing to strip there."""
    messages = payload.get("messages")
    if not messages or payload.get("continue_final_message"):
        return ""
    last = messages[-1]
    if last.get("role") != "assistant" or last.get("tool_calls"):
        return ""
    content = last.get("content")
    return content if isinstance(content, str) else ""
