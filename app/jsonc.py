"""The JSON codec, in one place so the hot path uses orjson everywhere.

orjson returns bytes from ``dumps``, which is what the relay writes anyway; keeping the codec
behind this module's names lets callers stay unaware of that choice.
"""

from __future__ import annotations

from typing import Any

import orjson

JSONDecodeError = orjson.JSONDecodeError


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON; non-ASCII kept as is."""
    return orjson.dumps(obj)


def dumps_str(obj: Any) -> str:
    return orjson.dumps(obj).decode()


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse JSON; raises JSONDecodeError (a ValueError) on bad input."""
    return orjson.loads(data)
