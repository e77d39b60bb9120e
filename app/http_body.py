"""HTTP/1.1 response body framing, decoded incrementally (pure: bytes in, bytes out).

Backend bodies are read straight off the socket (app.backend_http.BodyFraming, for whole
bodies and for the streams app.backends.client.BodyReader relays), so that a read timeout is only a
moment of silence, not a broken reader. This decoder keeps all state itself and survives any
split of the input."""

from __future__ import annotations


class FramingError(ValueError):
    """The body does not follow HTTP/1.1 chunked framing."""


class ChunkedDecoder:
    """``Transfer-Encoding: chunked``: feed raw bytes, get the body bytes they complete."""

    __slots__ = ("_buffer", "_left", "_state", "done")

    def __init__(self) -> None:
        self._buffer = b""
        self._left = 0  # bytes of the current chunk still to come
        self._state = "size"  # size -> data -> crlf -> size ... -> trailers -> done
        self.done = False

    def feed(self, data: bytes) -> bytes:
        if self._state == "size" and not self._buffer:
            body = _one_whole_chunk(data)
            if body is not None:
                return body
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        pos, size = 0, len(buffer)
        while pos < size and not self.done:  # offsets, not re-slicing what is left each time
            if self._state == "data":
                take = min(self._left, size - pos)
                out.append(buffer[pos : pos + take])
                self._left -= take
                pos += take
                if not self._left:
                    self._state = "crlf"
                continue
            if self._state == "crlf" and buffer.startswith(b"\r\n", pos):  # the usual end
                pos += 2
                self._state = "size"
                continue
            end = buffer.find(b"\n", pos)
            if end < 0:
                if size - pos > 4096:
                    raise FramingError("chunk header line too long")
                break
            line = buffer[pos:end].rstrip(b"\r")
            pos = end + 1
            self._line(line)
        self._buffer = buffer[pos:]
        return out[0] if len(out) == 1 else b"".join(out)

    def _line(self, line: bytes) -> None:
        if self._state == "crlf":
            if line:
                raise FramingError("chunk data longer than its declared size")
            self._state = "size"
        elif self._state == "size":
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                size = -1
            if size < 0:
                raise FramingError(f"bad chunk size line {line[:40]!r}")
            self._left = size
            self._state = "data" if size else "trailers"
        elif not line:  # trailers end with an empty line
            self.done = True


def _one_whole_chunk(data: bytes) -> bytes | None:
    """The body of ``data`` if it is exactly one whole chunk, size line to closing CRLF: what
    nearly every read of a streamed backend body is. None for anything else, which the general
    loop then takes (and gives the same answer for this case, at twice the cost)."""
    end = data.find(b"\n", 0, 20)
    if end <= 0:
        return None
    try:
        size = int(data[:end], 16)  # as the general loop parses it, when there is no extension
    except ValueError:
        return None
    start = end + 1
    if size <= 0 or len(data) != start + size + 2 or not data.endswith(b"\r\n"):
        return None
    return data[start : start + size]
