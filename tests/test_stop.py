"""Stop strings: find_stop cuts at the earliest stop overlapping new text; stop_hold_back."""

from __future__ import annotations

import random

import pytest

from fastinfer.sampling.stop import find_stop, stop_hold_back


def test_stop_inside_new_text():
    assert find_stop("Hello world###", 4, ["###"]) == 11


def test_stop_spanning_old_and_new_text():
    # "##" was already there; one new "#" completes "###".
    assert find_stop("abc##", 2, ["###"]) is None
    assert find_stop("abc###", 1, ["###"]) == 3


def test_occurrence_only_in_old_text_is_not_reported():
    assert find_stop("STOP and more", 4, ["STOP"]) is None


def test_earliest_of_several_stops_wins():
    text = "answer: yes\nUser: END"
    assert find_stop(text, 12, ["END", "\nUser:"]) == 11
    assert find_stop("xxABAB", 4, ["AB", "BA"]) == 2


def test_no_new_chars_or_empty_stops():
    assert find_stop("###", 0, ["###"]) is None
    assert find_stop("abc", 3, [""]) is None
    assert find_stop("", 0, ["x"]) is None
    assert find_stop("abc", 10, ["a"]) == 0  # more new chars than text: all of it is new


@pytest.mark.parametrize("seed", range(3))
def test_streaming_matches_whole_text_search(seed):
    """Feeding text in random chunks finds the same cut as searching the whole text once."""
    rng = random.Random(seed)
    stops = ["abc", "cab", "bb"]
    for _ in range(200):
        text = "".join(rng.choice("abcx") for _ in range(rng.randrange(1, 30)))
        expected = min((i for i in (text.find(s) for s in stops) if i != -1), default=None)
        seen, cut = "", None
        while len(seen) < len(text) and cut is None:
            step = rng.randrange(1, 4)
            seen = text[: len(seen) + step]
            cut = find_stop(seen, min(step, len(seen)), stops)
        assert cut == expected, text


def test_stop_hold_back():
    assert stop_hold_back("Hello ##", ["###"]) == 2
    assert stop_hold_back("Hello #", ["###", "#!"]) == 1
    assert stop_hold_back("Hello", ["###"]) == 0
    assert stop_hold_back("say \nUs", ["\nUser:"]) == 3
    assert stop_hold_back("x", []) == 0
    assert stop_hold_back("ab", ["abc", "b"]) == 2  # the longest pending prefix counts
