"""Server-sent events on bytes: an incremental decoder for backend streams, an encoder for ours.

Decoding works on bytes, not text: ``str.splitlines`` would also split on U+2028 and friends,
which may sit raw inside JSON strings, and a CRLF split across two network reads must not turn
into an extra blank line.
"""

from __future__ import annotations

from typing import Any

from app import jsonc

DONE = b"[DONE]"


class SSEDecoder:
    """Feed raw bytes as they arrive; get back the payload of every complete ``data:`` line.

    Each ``data:`` line is taken as one event. OpenAI-style servers put one JSON document on
    one line, and some omit the blank separator line, so dispatching per line is both cheaper
    and more forgiving than waiting for the blank line. Comments, ``event:``, ``id:`` and
    ``retry:`` lines carry nothing the translation needs and are skipped.
    """

    __slots__ = ("_buffer", "_pending_cr")

    def __init__(self) -> None:
        self._buffer = b""
        self._pending_cr = False

    def feed(self, chunk: bytes) -> list[bytes]:
        if (  # the usual read of a backend stream: one whole ``data:`` line and a blank line
            not self._buffer
            and not self._pending_cr
            and chunk.startswith(b"data:")
            and chunk.find(b"\n") == len(chunk) - 2
            and chunk.endswith(b"\n\n")
            and b"\r" not in chunk
        ):
            return [_payload(chunk[:-2])]
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):  # may be the first half of a CRLF
                chunk = chunk[:-1]
                self._pending_cr = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = (self._buffer + chunk).split(b"\n") if self._buffer else chunk.split(b"\n")
        self._buffer = lines.pop()
        return [_payload(line) for line in lines if line.startswith(b"data:")]

    def close(self) -> list[bytes]:
        """Whatever complete line the stream ended on without a final newline."""
        line, self._buffer, self._pending_cr = self._buffer, b"", False
        return [_payload(line)] if line.startswith(b"data:") else []


def _payload(line: bytes) -> bytes:
    return line[6:] if line[5:6] == b" " else line[5:]


_PREFIXES: dict[str, bytes] = {}


def encode(event: dict[str, Any]) -> bytes:
    """One Anthropic SSE event: ``event:`` name equal to the JSON ``type``, then ``data:``."""
    kind = event["type"]
    prefix = _PREFIXES.get(kind)
    if prefix is None:
        prefix = _PREFIXES[kind] = b"event: " + kind.encode() + b"\ndata: "
    return prefix + jsonc.dumps(event) + b"\n\n"


def encode_all(events: list[dict[str, Any]]) -> bytes:
    """Several events in one write: fewer syscalls and chunked-encoding frames per chunk."""
    return b"".join(map(encode, events))
