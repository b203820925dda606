"""String stop sequences: found across token boundaries, at the earliest completing token, incrementally."""

from __future__ import annotations

import pytest

from sampling.decoding.stopping import StopStrings, truncate_at_stop

PIECES = ["def", " f", "():", "\n", "    return", " 1", "\nd", "ef", " g", "():"]
"""A toy vocabulary: token id i is the text PIECES[i]; "\\ndef " is split over ids 6, 7 and 8."""


def detokenize(ids):
    return "".join(PIECES[i] for i in ids)


def stops(*strings):
    return StopStrings(tuple(strings), detokenize)


def test_stop_split_across_tokens_ends_on_the_completing_token():
    tracker = stops("\ndef ").start(1)
    kept = [tracker.extend(0, [token]) for token in range(8)]
    assert kept == [None] * 8  # "...\nd" + "ef": the stop needs the space of token 8
    assert tracker.extend(0, [8]) == 1
    assert truncate_at_stop(detokenize(range(9)), ["\ndef "]) == "def f():\n    return 1"


def test_chunk_keeps_only_the_tokens_up_to_the_earliest_stop():
    tracker = stops("\ndef ", "return").start(2)
    assert tracker.extend(0, [0, 1, 2, 3]) is None
    assert tracker.extend(0, [4, 5, 6, 7, 8]) == 1  # "return" completes with token 4
    assert tracker.tokens[0] == [0, 1, 2, 3, 4]
    assert tracker.extend(1, list(range(10))) == 5  # row 1 is independent of row 0


def test_text_before_the_search_window_is_not_rescanned_but_margin_is():
    calls = []

    def counting(ids):
        calls.append(len(ids))
        return detokenize(ids)

    tracker = StopStrings(("\ndef ",), counting).start(1)
    for token in range(6):
        assert tracker.extend(0, [token]) is None
    assert tracker.searched_chars[0] > 0
    assert tracker.extend(0, [6, 7, 8]) == 3


def test_no_stop_means_none_and_empty_extension_is_harmless():
    tracker = stops("zzz").start(1)
    assert tracker.extend(0, []) is None
    assert tracker.extend(0, list(range(10))) is None


@pytest.mark.parametrize("bad", [(), ("",), ("ok", "")])
def test_empty_stop_strings_are_rejected_except_none_at_all(bad):
    if bad == ():
        assert stops().strings == ()
        return
    with pytest.raises(ValueError, match="stop_strings"):
        stops(*bad)
