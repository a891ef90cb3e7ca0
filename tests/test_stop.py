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


# ---------------------------------------------------------------- StopText (the engine's text buffer)
from fastinfer.sampling.stop import StopText  # noqa: E402


def _reference(pieces, stops):
    """The text a stream must end with, by brute force on the whole string."""
    text = ""
    for p in pieces:
        text += p
        hits = [text.find(s) for s in stops if s and s in text]
        if hits:
            return text[:min(hits)], True
    return text, False


@pytest.mark.parametrize("seed", range(40))
def test_stop_text_matches_brute_force_and_never_streams_cut_text(seed):
    rng = random.Random(seed)
    alphabet = "ab#\n "
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(0, 3))]
    pieces = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3))) for _ in range(30)]
    want, stopped = _reference(pieces, stops)
    buf, streamed, matched = StopText(stops), "", None
    for p in pieces:
        matched = buf.add(p)
        if matched is not None:
            break
        streamed += buf.take(final=False)
        assert want.startswith(streamed)  # a delta never shows text that a stop string later cuts
    assert (matched is not None) == stopped
    streamed += buf.take(final=True)
    assert buf.text == want and streamed == want and len(buf) == len(want)
    if stopped:
        assert matched in stops and "".join(pieces).find(matched) >= 0


def test_stop_text_holds_back_a_possible_stop_prefix_then_releases_it():
    buf = StopText(["###"])
    buf.add("Hello #")
    assert buf.take(final=False) == "Hello "
    buf.add("#")
    assert buf.take(final=False) == ""  # "##" may still become "###"
    buf.add(" x")
    assert buf.take(final=False) == "## x"
    assert buf.add("##") is None and buf.add("#!") == "###"
    assert buf.text == "Hello ## x" and buf.take(final=True) == ""


def test_stop_text_cost_is_linear_in_the_stream():
    """Adding and taking a delta keeps O(delta) work: no join of the whole text per step."""
    buf = StopText(["never-appears"])
    joins = 0
    for i in range(20000):
        buf.add("tok ")
        assert buf.take(final=False) in ("tok ", "")
        joins += len(buf._chunks) == 1 and i > 10  # the whole text was never re-joined
    assert joins == 0
    assert len(buf.text) == 80000
