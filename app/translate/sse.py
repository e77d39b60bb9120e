"""Server-sent events on bytes: an incremental decoder for backend streams, an encoder for ours.

Decoding works on bytes, not text: ``str.splitlines`` would also split on U+2028 and friends,
which may sit raw inside JSON strings, and a CRLF split across two network reads must not turn
into an extra blank line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from app import jsonc
from app.errors import UpstreamError

DONE = b"[DONE]"


class LineTooLong(UpstreamError):
    """A backend stream line grew past the decoder's limit: the stream cannot go on."""

    backend_fault = True


class SSEDecoder:
    """Feed raw bytes as they arrive; get back the payload of every complete ``data:`` line.

    Each ``data:`` line is taken as one event. OpenAI-style servers put one JSON document on
    one line, and some omit the blank separator line, so dispatching per line is both cheaper
    and more forgiving than waiting for the blank line. Comments, ``event:``, ``id:`` and
    ``retry:`` lines carry nothing the translation needs and are skipped.

    A line that arrives in many reads is kept as a list of its pieces and joined once, when
    it ends, so a long line costs time in proportion to its length (appending to one bytes
    object would copy it again on every read: a 30 MB line took seconds). A line longer than
    ``max_line`` raises ``LineTooLong`` instead of growing further.
    """

    __slots__ = ("_parts", "_size", "_pending_cr", "max_line")

    def __init__(self, max_line: int) -> None:
        self._parts: list[bytes] = []  # the pieces of the line not yet ended
        self._size = 0
        self._pending_cr = False
        self.max_line = max_line

    def feed(self, chunk: bytes) -> list[bytes]:
        if (  # the usual read of a backend stream: one whole ``data:`` line and a blank line
            not self._parts
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
        end = chunk.find(b"\n")
        if end < 0:
            self._keep(chunk)
            return []
        if self._parts:
            self._parts.append(chunk)
            chunk = b"".join(self._parts)
            self._parts = []
            self._size = 0
        lines = chunk.split(b"\n")
        rest = lines.pop()
        if rest:
            self._keep(rest)
        return [_payload(line) for line in lines if line.startswith(b"data:")]

    def _keep(self, piece: bytes) -> None:
        """Hold the start of a line that has not ended yet; refuse it past ``max_line``."""
        self._size += len(piece)
        if self._size > self.max_line:
            self._parts = []
            self._size = 0
            raise LineTooLong(f"backend sent a stream line longer than {self.max_line} bytes")
        if piece:
            self._parts.append(piece)

    def close(self) -> list[bytes]:
        """Whatever complete line the stream ended on without a final newline."""
        line = b"".join(self._parts)
        self._parts, self._size, self._pending_cr = [], 0, False
        return [_payload(line)] if line.startswith(b"data:") else []


def _payload(line: bytes) -> bytes:
    return line[6:] if line[5:6] == b" " else line[5:]


_PREFIXES: dict[str, bytes] = {}


def encode(event: Mapping[str, Any]) -> bytes:
    """One Anthropic SSE event: ``event:`` name equal to the JSON ``type``, then ``data:``."""
    kind = event["type"]
    prefix = _PREFIXES.get(kind)
    if prefix is None:
        prefix = _PREFIXES[kind] = b"event: " + kind.encode() + b"\ndata: "
    return prefix + jsonc.dumps(event) + b"\n\n"


def encode_all(events: Iterable[Mapping[str, Any]]) -> bytes:
    """Several events in one write: fewer syscalls and chunked-encoding frames per chunk."""
    return b"".join(map(encode, events))
