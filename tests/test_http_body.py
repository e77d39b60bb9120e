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


def _outcome(decoder: ChunkedDecoder, pieces: list[bytes]) -> tuple[bytes, bool] | str:
    try:
        return b"".join(decoder.feed(piece) for piece in pieces), decoder.done
    except FramingError:
        return "FramingError"


@given(
    raw=st.lists(
        st.sampled_from([b"0", b"3", b"a", b"-", b"x", b";", b" ", b"\r", b"\n", b"\r\n", b"abc"]),
        max_size=14,
    ).map(b"".join)
)
def test_a_read_decodes_as_the_same_bytes_fed_one_at_a_time(raw: bytes) -> None:
    """Whole, a read may take the one-whole-chunk fast path; a byte at a time it cannot."""
    whole = _outcome(ChunkedDecoder(), [raw])
    bytewise = _outcome(ChunkedDecoder(), [raw[i : i + 1] for i in range(len(raw))])
    assert whole == bytewise


@pytest.mark.parametrize(
    "raw", [b"5\r\nhello\r\n", b"5\nhello\r\n", b"A\r\n0123456789\r\n", b" 5 \r\nhello\r\n"]
)
def test_one_whole_chunk_in_one_read_is_its_body(raw: bytes) -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(raw) == raw[raw.index(b"\n") + 1 : -2]
    assert not decoder.done
    assert decoder.feed(b"2\r\nok\r\n0\r\n\r\n") == b"ok" and decoder.done
