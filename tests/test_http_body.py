"""Chunked transfer decoding on its own: any split of the input, framing errors, the end."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.http_body import ChunkedDecoder, FramingError


def chunked(pieces: list[bytes], trailer: bytes = b"") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p)
    return body + b"0\r\n" + trailer + b"\r\n"


def test_whole_body_decodes_and_ends() -> None:
    decoder = ChunkedDecoder()
    assert (
        decoder.feed(chunked([b"data: a\n\n", b"data: [DONE]\n\n"]))
        == b"data: a\n\ndata: [DONE]\n\n"
    )
    assert decoder.done


def test_extensions_and_trailers_are_skipped() -> None:
    decoder = ChunkedDecoder()
    raw = b"4;name=value\r\nabcd\r\n0\r\nX-Trailer: 1\r\n\r\n"
    assert decoder.feed(raw) == b"abcd" and decoder.done


def test_not_done_until_the_last_chunk() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"3\r\nabc\r\n") == b"abc"
    assert not decoder.done


@pytest.mark.parametrize(
    "raw",
    [b"zz\r\nabc\r\n", b"-1\r\nabc\r\n", b"2\r\nabcd\r\n", b"1" * 5000],
    ids=["not_hex", "negative", "data_longer_than_size", "endless_size_line"],
)
def test_framing_errors_are_reported(raw: bytes) -> None:
    with pytest.raises(FramingError):
        ChunkedDecoder().feed(raw)


@given(
    pieces=st.lists(st.binary(min_size=1, max_size=40), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=20),
)
def test_any_split_of_the_input_gives_the_same_body(pieces: list[bytes], cuts: list[int]) -> None:
    raw = chunked(pieces)
    bounds = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    decoder = ChunkedDecoder()
    out = b"".join(decoder.feed(raw[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
    assert out == b"".join(pieces)
    assert decoder.done
