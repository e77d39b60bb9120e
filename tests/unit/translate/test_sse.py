"""SSE decoding of backend streams and encoding of Anthropic events (app/translate/sse.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.translate.sse import DONE, LineTooLong, SSEDecoder, encode, encode_all

LONG_LINE = 4 << 20  # longer than any line these tests send


def decode(*chunks: bytes) -> list[bytes]:
    """All payloads for a stream delivered in ``chunks``, including what close() flushes."""
    decoder = SSEDecoder(LONG_LINE)
    payloads: list[bytes] = []
    for piece in chunks:
        payloads += decoder.feed(piece)
    return payloads + decoder.close()


# --- decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stream",
    [
        b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n',
        b'data: {"a":1}\r\n\r\ndata: {"b":2}\r\n\r\ndata: [DONE]\r\n\r\n',
        b'data: {"a":1}\r\rdata: {"b":2}\r\rdata: [DONE]\r\r',
        b'data: {"a":1}\ndata: {"b":2}\ndata: [DONE]\n',
        b'data:{"a":1}\n\ndata:{"b":2}\n\ndata:[DONE]\n\n',
        b'\n\n\ndata: {"a":1}\n\n\n\n\ndata: {"b":2}\r\n\n\rdata: [DONE]\n\n',
    ],
    ids=["lf", "crlf", "lone_cr", "no_blank_separator", "no_space_after_colon", "blank_runs"],
)
def test_data_lines_are_decoded_with_any_line_ending(stream: bytes) -> None:
    assert decode(stream) == [b'{"a":1}', b'{"b":2}', DONE]


def test_comments_and_other_fields_are_ignored() -> None:
    stream = (
        b": keep-alive\n\n"
        b": OPENROUTER PROCESSING\n\n"
        b"event: completion\n"
        b"id: 17\n"
        b"retry: 3000\n"
        b'data: {"a":1}\n\n'
        b"data\n"
        b"datum: x\n"
        b"data: [DONE]\n\n"
    )
    assert decode(stream) == [b'{"a":1}', DONE]


def test_only_one_space_after_the_colon_is_removed() -> None:
    assert decode(b"data:  padded\n", b"data:\n") == [b" padded", b""]


def test_crlf_split_across_feeds_does_not_add_a_line() -> None:
    decoder = SSEDecoder(LONG_LINE)
    first = decoder.feed(b'data: {"a":1}\r')
    second = decoder.feed(b'\ndata: {"b":2}\r')
    third = decoder.feed(b"\n\r\n")
    assert first + second + third == [b'{"a":1}', b'{"b":2}']
    assert decoder.close() == []


def test_lone_cr_at_the_end_of_a_feed_still_ends_the_line() -> None:
    decoder = SSEDecoder(LONG_LINE)
    payloads = decoder.feed(b"data: one\r") + decoder.feed(b"data: two\r")
    assert payloads + decoder.close() == [b"one", b"two"]


def test_a_line_split_over_many_feeds_is_reassembled() -> None:
    line = b'data: {"choices":[{"delta":{"content":"Hello world"}}]}\n'
    decoder = SSEDecoder(LONG_LINE)
    collected = []
    for i in range(len(line)):
        collected += decoder.feed(line[i : i + 1])
    assert collected == [line[6:-1]]


def test_a_line_longer_than_the_limit_ends_the_stream() -> None:
    decoder = SSEDecoder(max_line=1000)
    assert decoder.feed(b"data: " + b"x" * 500) == []
    with pytest.raises(LineTooLong, match="longer than 1000 bytes"):
        for _ in range(10):
            decoder.feed(b"x" * 100)
    assert LineTooLong.status == 500  # an UpstreamError: the client gets an api_error event


def test_a_line_at_the_limit_in_many_pieces_is_whole() -> None:
    decoder = SSEDecoder(max_line=1000)
    pieces = [b"data: "] + [b"y" * 10] * 99
    assert all(decoder.feed(p) == [] for p in pieces)
    assert decoder.feed(b"\n\n") == [b"y" * 990]
    assert decoder.feed(b"data: next\n") == [b"next"]  # the limit is per line


def test_a_long_line_is_joined_once_not_on_every_feed() -> None:
    """Held pieces are kept as they came; only the end of the line joins them. (Joining on
    every feed copies the line again each time: quadratic, and a 30 MB line took seconds.)"""
    decoder = SSEDecoder(LONG_LINE)
    piece = b"z" * 65536
    decoder.feed(b"data: ")
    for _ in range(16):
        decoder.feed(piece)
    assert [len(p) for p in decoder._parts] == [6] + [65536] * 16
    assert decoder.feed(b"\n") == [piece * 16]


def test_empty_feeds_change_nothing() -> None:
    assert decode(b"", b"data: x", b"", b"\r", b"", b"\n", b"") == [b"x"]


def test_close_flushes_a_final_unterminated_data_line() -> None:
    decoder = SSEDecoder(LONG_LINE)
    assert decoder.feed(b'data: {"a":1}\n\ndata: {"tail":true}') == [b'{"a":1}']
    assert decoder.close() == [b'{"tail":true}']
    assert decoder.close() == []


def test_close_ignores_an_unterminated_comment() -> None:
    decoder = SSEDecoder(LONG_LINE)
    decoder.feed(b": keep-al")
    assert decoder.close() == []


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c"])
def test_unicode_line_separators_inside_json_do_not_split_the_line(separator: str) -> None:
    payload = json.dumps({"content": f"a{separator}b"}, ensure_ascii=False).encode()
    [decoded] = decode(b"data: " + payload + b"\n\n")
    assert json.loads(decoded) == {"content": f"a{separator}b"}


# Payloads never contain CR or LF; anything else (including U+2028) may appear.
PAYLOADS = st.text(
    alphabet=st.characters(exclude_characters="\r\n", exclude_categories=("Cs",)), max_size=30
)
ENDINGS = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def sse_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    """A byte stream of data lines, comments and blank lines, with the payloads it carries."""
    out = b""
    expected: list[bytes] = []
    for payload in draw(st.lists(PAYLOADS, max_size=8)):
        for _ in range(draw(st.integers(0, 2))):
            out += draw(st.sampled_from([b": keep-alive", b"event: x", b"id: 3", b""]))
            out += draw(ENDINGS)
        data = payload.encode()
        out += (
            draw(st.sampled_from([b"data: ", b"data:"])) if not data.startswith(b" ") else b"data: "
        )
        out += data + draw(ENDINGS)
        expected.append(data)
    return out, expected


@settings(max_examples=200, deadline=None)
@given(stream=sse_streams(), cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_any_split_of_a_stream_yields_the_same_payloads(
    stream: tuple[bytes, list[bytes]], cuts: list[int]
) -> None:
    raw, expected = stream
    points = sorted({c % (len(raw) + 1) for c in cuts})
    bounds = [0, *points, len(raw)]
    pieces = [raw[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert decode(raw) == expected
    assert decode(*pieces) == expected


@settings(max_examples=300, deadline=None)
@given(
    raw=st.lists(
        st.sampled_from([b"data:", b"data: ", b" ", b"x", b"{}", b"\n", b"\r", b"\r\n", b": c"]),
        max_size=10,
    ).map(b"".join),
    before=st.sampled_from([b"", b"data: a", b"\r"]),
)
def test_a_read_yields_what_the_same_bytes_yield_one_at_a_time(raw: bytes, before: bytes) -> None:
    """Whole, a read may take the one-whole-line fast path; a byte at a time it cannot."""
    whole, bytewise = SSEDecoder(LONG_LINE), SSEDecoder(LONG_LINE)
    whole.feed(before)  # a decoder part-way through a line, or after a CR
    bytewise.feed(before)
    assert whole.feed(raw) == [p for i in range(len(raw)) for p in bytewise.feed(raw[i : i + 1])]
    assert whole.close() == bytewise.close()


# --- encoding --------------------------------------------------------------------------------


def test_encode_names_the_event_after_its_type() -> None:
    event = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "Hi"},
    }
    assert encode(event) == (
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"Hi"}}\n\n'
    )


@pytest.mark.parametrize(
    "event",
    [
        {"type": "ping"},
        {"type": "message_stop"},
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        {
            "type": "content_block_delta",
            "index": 3,
            "delta": {"type": "text_delta", "text": "line1\nline2\r\u2028 é 😀"},
        },
    ],
    ids=["ping", "message_stop", "error", "newlines_and_unicode_in_text"],
)
def test_encoded_event_is_one_event_line_one_data_line_and_a_blank_line(event: dict) -> None:
    encoded = encode(event)
    assert encoded.endswith(b"\n\n")
    lines = encoded[:-2].split(b"\n")
    assert len(lines) == 2 and b"\r" not in encoded
    assert lines[0] == b"event: " + event["type"].encode()
    assert lines[1].startswith(b"data: ")
    assert json.loads(lines[1][6:]) == event


def test_encode_all_concatenates_events_in_order() -> None:
    events = [{"type": "message_stop"}, {"type": "ping"}, {"type": "message_stop"}]
    assert encode_all(events) == b"".join(encode(e) for e in events)
    assert encode_all([]) == b""


def test_encoded_events_decode_back_to_their_json() -> None:
    events = [
        {"type": "ping"},
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "a\u2028b"},
        },
    ]
    assert [json.loads(p) for p in decode(encode_all(events))] == events
