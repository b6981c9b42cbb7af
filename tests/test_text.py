"""Incremental detokenizing and stop matching, on the real tokenizer and on plain text."""

from __future__ import annotations

import pytest

from llmapi.engine.text import IncrementalDecoder, StopMatcher


@pytest.mark.parametrize(
    "text", ["héllo wörld", "日本語のテキスト", "emoji 🎉🚀 end", "plain ascii text, with commas."]
)
def test_incremental_decoder_never_splits_characters(tokenizer, text):
    decoder = IncrementalDecoder(lambda ids: tokenizer.decode(ids))
    pieces = [decoder.push(token) for token in tokenizer.encode(text)] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_incremental_decoder_flushes_a_partial_character(tokenizer):
    ids = tokenizer.encode("🎉")
    decoder = IncrementalDecoder(lambda i: tokenizer.decode(i))
    pushed = "".join(decoder.push(t) for t in ids[:-1])
    assert pushed == ""
    assert decoder.flush() == tokenizer.decode(ids[:-1])


@pytest.mark.parametrize(
    ("stops", "text", "start", "found"),
    [
        (["END"], "abcEND", 3, (3, "END")),
        (["END"], "abcEN", 3, None),
        (["x", "bc"], "abcx", 0, (1, "bc")),
        (["END"], "aENDbEND", 6, (5, "END")),  # only stops ending in the new text count
        ([], "anything", 0, None),
    ],
)
def test_stop_matcher_finds_the_earliest_stop(stops, text, start, found):
    assert StopMatcher(stops).find(text, start) == found


def test_stop_matcher_holds_back_a_possible_stop_prefix():
    matcher = StopMatcher(["###", "STOP"])
    assert matcher.held_back("hello ST") == 2
    assert matcher.held_back("hello #") == 1
    assert matcher.held_back("hello") == 0
