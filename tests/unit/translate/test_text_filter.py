"""The answer's text filter (pure): a repeated prefill removed, the first stop sequence ending
the answer, the same however the text is split into pieces."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from app.translate.passthrough import PassthroughStream, passthrough_id, passthrough_stop
from app.translate.text_filter import PrefillEcho, StopMatcher, TextFilter, prefill_of


def streamed(text_filter: TextFilter, pieces: list[str]) -> str:
    out = []
    for piece in pieces:
        out.append(text_filter.feed(piece))
        if text_filter.matched is not None:
            return "".join(out)
    return "".join(out) + text_filter.flush()


def cut(text: str, at: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(min(i, len(text)) for i in at)})
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


ALPHABET = st.sampled_from("ab\nHS:. ")


@given(
    text=st.text(ALPHABET, max_size=40),
    stops=st.lists(st.text(ALPHABET, min_size=1, max_size=5), max_size=6),
    prefill=st.text(ALPHABET, max_size=6),
    at=st.lists(st.integers(0, 40), max_size=8),
)
def test_streamed_pieces_give_what_the_whole_text_gives(text, stops, prefill, at) -> None:
    whole = TextFilter(stops, prefill)
    expected = whole.whole(text)
    pieced = TextFilter(stops, prefill)
    assert streamed(pieced, cut(text, at)) == expected
    assert pieced.matched == whole.matched


@given(
    text=st.text(ALPHABET, max_size=40),
    stops=st.lists(st.text(ALPHABET, min_size=1, max_size=5), max_size=6),
)
def test_the_answer_ends_at_the_first_stop_sequence_to_be_complete(text, stops) -> None:
    """As a model stops at the first sequence it produces: the earliest end, and of two that
    end together the longer."""
    matcher = TextFilter(stops)
    out = matcher.whole(text)
    found = [(text.find(s) + len(s), -len(s), s) for s in dict.fromkeys(stops) if s in text]
    if not found:
        assert out == text and matcher.matched is None
    else:
        _end, _longer, sequence = min(found)
        assert matcher.matched == sequence
        assert out == text[: text.find(sequence)]


def test_a_short_sequence_inside_a_longer_one_ends_the_answer_when_it_is_complete() -> None:
    assert TextFilter(["abcd", "bc"]).whole("xabcd") == "xa"
    pieced = TextFilter(["abcd", "bc"])
    assert pieced.feed("xab") == "x" and pieced.feed("c") == "a"
    assert pieced.matched == "bc"


def test_the_held_tail_is_at_most_the_longest_sequence_minus_one() -> None:
    matcher = StopMatcher(["\n\nHuman:", "END"])
    assert matcher.feed("text\n\nHuman") == "text"
    assert matcher.held == "\n\nHuman"
    assert matcher.feed("ity") == "\n\nHumanity"


def test_prefill_echo_with_a_leading_newline_is_still_an_echo() -> None:
    echo = PrefillEcho("Answer:")
    assert echo.feed("\nAnswer") == ""
    assert echo.feed(": 42") == " 42"


def test_a_prefill_echo_cut_short_by_the_end_is_the_models_text() -> None:
    echo = PrefillEcho("1. Red\n2.")
    assert echo.feed("1. Red") == ""
    assert echo.flush() == "1. Red"


def test_prefill_is_read_from_the_payload_unless_the_backend_continues_it() -> None:
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "1."}]
    assert prefill_of({"messages": messages}) == "1."
    assert prefill_of({"messages": messages, "continue_final_message": True}) == ""
    assert prefill_of({"messages": messages[:1]}) == ""


def test_a_passthrough_stop_sequence_called_end_turn_becomes_stop_sequence() -> None:
    assert passthrough_stop({"stop_reason": "end_turn", "stop_sequence": "###"}) == {
        "stop_reason": "stop_sequence"
    }
    assert passthrough_stop({"stop_reason": "end_turn", "stop_sequence": None}) == {}
    stream = PassthroughStream(model="m")
    event = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": "###"},
        "usage": {"output_tokens": 3},
    }
    out = stream.feed_data(json.dumps(event).encode())
    assert out[0]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "###"}
    assert stream.stop_reason == "stop_sequence"


def test_a_passthrough_message_id_not_of_anthropics_form_is_replaced() -> None:
    """vLLM's own /v1/messages names its messages ``chatcmpl-…``; Anthropic's are ``msg_…``."""
    assert passthrough_id({"id": "msg_01abc"}) == {}
    assert passthrough_id({"id": "chatcmpl-req_01abc"})["id"].startswith("msg_01")
    stream = PassthroughStream(model="claude-x")
    [start] = stream.feed_data(
        b'{"type": "message_start", "message": {"id": "chatcmpl-1", "model": "m", "usage": {}}}'
    )
    assert start["message"]["id"].startswith("msg_01") and start["message"]["model"] == "claude-x"
