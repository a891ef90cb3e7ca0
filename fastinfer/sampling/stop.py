"""Stop strings: find where generated text must be cut, and how much of it a stream must hold back.

Tokens do not respect stop strings: ``"###"`` may arrive as ``"#"`` then ``"##"``. So after each
step the engine asks ``find_stop`` about the text the step appended, looking back far enough to
catch a stop string that began in earlier text, and a streaming front-end holds back the last
``stop_hold_back`` characters, which might still turn out to open a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence


def find_stop(text: str, num_new_chars: int, stops: Sequence[str]) -> int | None:
    """Where to cut ``text`` now that its last ``num_new_chars`` characters are new.

    Returns the index of the earliest occurrence of any of ``stops`` that overlaps the new
    characters (so ``text[:index]`` is the output, the stop string excluded), or None when no
    stop string ends among the new characters. Empty stop strings never match. Occurrences that
    lie wholly in the old text are not reported: they were found when that text was new.
    """
    if num_new_chars <= 0 or not text:
        return None
    old_len = len(text) - min(num_new_chars, len(text))
    best: int | None = None
    for stop in stops:
        if not stop:
            continue
        # The earliest start that still reaches into the new characters.
        start = max(0, old_len - len(stop) + 1)
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best):
            best = index
    return best


def stop_hold_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could be the start of one of ``stops``.

    A streaming front-end should not send those characters yet: the next tokens may complete the
    stop string, and then they must never have been shown. Returns 0 when nothing is pending.
    """
    hold = 0
    for stop in stops:
        # A proper prefix of ``stop`` (a whole one would already have been cut by find_stop).
        for length in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:length]):
                hold = length
                break
    return hold
