"""Reading a ``create`` body: ``{"requests": [{"custom_id", "params"}, …]}``, up to 256 MB,
item by item as it arrives, each written to the batch's requests file as it is read.

The body is never held whole: ijson parses the input stream a buffer at a time (its C
backend), so the gateway holds one item, the ids seen so far and a buffer, whatever the batch's
size. The envelope is checked here and refused whole with a 400 (an empty list, too many
items, a missing or malformed ``custom_id``, one used twice, ``params`` that is not an
object); what is inside ``params`` is checked when the item runs, and a bad one becomes that
item's ``errored`` result, as Anthropic does.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import ijson  # type: ignore[import-untyped]  # no annotations shipped

from app import jsonc
from app.batches.files import RequestsWriter
from app.errors import InvalidRequest, RequestTooLarge

CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}", re.ASCII)
ITEM_KEYS = frozenset({"custom_id", "params"})
READ_SIZE = 1 << 16


class BoundedInput:
    """The request's input stream as a file for ijson, refused past ``limit`` bytes (a
    chunked body declares no length) or past its Content-Length."""

    def __init__(self, environ: dict[str, Any], limit: int) -> None:
        self.stream = environ["wsgi.input"]
        length = environ.get("CONTENT_LENGTH") or ""
        chunked = bool(environ.get("HTTP_TRANSFER_ENCODING"))
        self.left: int | None = int(length) if length.isdigit() and not chunked else None
        if self.left is not None and self.left > limit:
            raise RequestTooLarge(f"a batch's body is limited to {limit} bytes")
        self.limit = limit
        self.seen = 0

    def read(self, size: int = READ_SIZE) -> bytes:
        if self.left is not None:
            size = min(size, self.left)
            if size <= 0:
                return b""
        try:
            piece: bytes = self.stream.read(size)
        except Exception as exc:  # gunicorn's chunked-framing errors, a reset connection
            raise InvalidRequest(f"the request body could not be read: {exc}") from None
        self.seen += len(piece)
        if self.left is not None:
            self.left -= len(piece)
            if not piece:
                raise InvalidRequest("the request body ended before its Content-Length")
        if self.seen > self.limit:
            raise RequestTooLarge(f"a batch's body is limited to {self.limit} bytes")
        return piece


def read_requests(source: BoundedInput, writer: RequestsWriter, most: int) -> int:
    """Every item of the body into ``writer``; how many there were."""
    seen: set[str] = set()
    for position, item in enumerate(_items(source)):
        if position >= most:
            raise InvalidRequest(f"requests: a batch holds at most {most} requests")
        custom_id = _checked(item, position, seen)
        try:
            line = jsonc.dumps({"custom_id": custom_id, "params": item["params"]})
        except TypeError as exc:  # an integer beyond 64 bits, say
            raise InvalidRequest(f"requests.{position}.params: {exc}") from None
        writer.add(custom_id, line)
    if writer.count == 0:
        raise InvalidRequest("requests: expected a list of at least one request")
    return writer.count


def _items(source: BoundedInput) -> Iterator[Any]:
    try:
        yield from ijson.items(source, "requests.item", use_float=True)
    except ijson.JSONError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {_first_line(exc)}") from None


def _first_line(error: Exception) -> str:
    """The parser's own words, without the excerpt of the body it quotes below them."""
    said = error.args[0] if error.args else ""
    if isinstance(said, bytes):
        said = said.decode("utf-8", "replace")
    return str(said).strip().split("\n", 1)[0]


def _checked(item: Any, position: int, seen: set[str]) -> str:
    where = f"requests.{position}"
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where}: expected an object with custom_id and params")
    extra = set(item) - ITEM_KEYS
    if extra:
        raise InvalidRequest(f"{where}.{sorted(extra)[0]}: Extra inputs are not permitted")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not CUSTOM_ID.fullmatch(custom_id):
        raise InvalidRequest(f"{where}.custom_id: expected 1 to 64 letters, digits, '-' or '_'")
    if custom_id in seen:
        raise InvalidRequest(f"{where}.custom_id: {custom_id!r} is used by another request")
    seen.add(custom_id)
    if not isinstance(item.get("params"), dict):
        raise InvalidRequest(f"{where}.params: expected an object (a Messages request)")
    return custom_id
