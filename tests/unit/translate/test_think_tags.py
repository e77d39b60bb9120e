"""Inline <think> reasoning split into thinking segments, whole and in arbitrary pieces."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.translate.think_tags import ThinkTagSplitter, split_complete


def run(pieces: list[str]) -> tuple[str, str]:
    splitter = ThinkTagSplitter()
    segments = [s for piece in pieces for s in splitter.feed(piece)] + splitter.flush()
    thinking = "".join(t for kind, t in segments if kind == "thinking")
    text = "".join(t for kind, t in segments if kind == "text")
    return thinking, text


@pytest.mark.parametrize(
    ("answer", "thinking", "text"),
    [
        ("<think>plan</think>\n\nAnswer.", "plan", "Answer."),
        ("\n<think>\nplan\n</think>Answer.", "plan", "Answer."),
        ("No tags here.", "", "No tags here."),
        ("Text first <think>not reasoning</think>", "", "Text first <think>not reasoning</think>"),
        ("<think>unfinished", "", "<think>unfinished"),
    ],
    ids=["leading", "whitespace_around", "none", "tag_later_is_content", "unclosed_is_text"],
)
def test_split_complete(answer: str, thinking: str, text: str) -> None:
    assert split_complete(answer) == (thinking, text)


def test_pieces_split_inside_both_tags() -> None:
    assert run(["<thi", "nk>pl", "an</th", "ink>\n", "\nAns", "wer"]) == ("plan", "Answer")


def test_text_that_only_looks_like_a_tag_start_is_released() -> None:
    assert run(["<th", "ese are words>"]) == ("", "<these are words>")


def test_unclosed_thinking_is_flushed_as_thinking() -> None:
    assert run(["<think>still going</thi"]) == ("still going</thi", "")


@given(
    reasoning=st.text(alphabet=st.characters(blacklist_characters="<"), max_size=40),
    answer=st.text(min_size=1, max_size=40).filter(lambda s: s.strip() == s and s),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
)
def test_any_fragmentation_gives_the_same_split(
    reasoning: str, answer: str, cuts: list[int]
) -> None:
    whole = f"<think>{reasoning}</think>\n\n{answer}"
    bounds = sorted({c % (len(whole) + 1) for c in cuts} | {0, len(whole)})
    pieces = [whole[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert run(pieces) == (reasoning, answer)
