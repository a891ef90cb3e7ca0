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


class StopText:
    """The text of one generated sequence, checked against stop strings as it grows, in time
    linear in its length.

    ``add(delta)`` appends a detokenized delta and reports the stop string it completes (the
    text is then cut before it). Only a tail of ``longest stop - 1`` characters is kept for
    matching, so a step costs O(delta + stops), never O(text). ``take(final)`` returns the text
    not handed out yet, holding back a tail that may still open a stop string unless ``final``;
    ``text`` is everything so far (joined once per call: O(text), for cumulative outputs).
    """

    __slots__ = ("_stops", "_keep", "_chunks", "_length", "_tail", "_sent", "_cache")

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self._stops = [s for s in stops if s]
        self._keep = max((len(s) for s in self._stops), default=1) - 1
        self._chunks: list[str] = []
        self._length = 0  # characters of text
        self._tail = ""  # its last ``_keep`` characters
        self._sent = 0  # characters handed out by ``take``
        self._cache: str | None = ""

    def __len__(self) -> int:
        return self._length

    def add(self, delta: str) -> str | None:
        """Appends ``delta``; returns the stop string it completes (the text is cut at its
        start), else None."""
        if not delta:
            return None
        window = self._tail + delta
        cut = find_stop(window, len(delta), self._stops) if self._stops else None
        if cut is None:
            self._chunks.append(delta)
            self._length += len(delta)
            self._tail = window[len(window) - self._keep:] if self._keep else ""
            self._cache = None
            return None
        matched = next(s for s in self._stops if window.startswith(s, cut))
        keep = len(window) - cut  # characters of the window that go, the stop string included
        text = self.text + delta
        self._set(text[:len(text) - keep])
        return matched

    def _set(self, text: str) -> None:
        self._chunks, self._length, self._cache = [text], len(text), text
        self._sent = min(self._sent, self._length)  # never past a cut (held-back text is not sent)
        self._tail = text[len(text) - self._keep:] if self._keep else ""

    @property
    def text(self) -> str:
        if self._cache is None:
            self._cache = "".join(self._chunks)
            self._chunks = [self._cache]
        return self._cache

    def visible(self, final: bool) -> int:
        """How many characters may be shown: all when ``final``, else all but a tail that
        may still open a stop string."""
        if final or not self._stops:
            return self._length
        return self._length - stop_hold_back(self._tail, self._stops)

    def take(self, final: bool) -> str:
        """The visible text not handed out by an earlier ``take`` (a stream's delta). The
        unsent part is at most the last few chunks, so this is O(delta)."""
        end = self.visible(final)
        if end <= self._sent:
            return ""
        # Walk back over chunks until the unsent start is covered.
        parts, pos = [], self._length
        for chunk in reversed(self._chunks):
            parts.append(chunk)
            pos -= len(chunk)
            if pos <= self._sent:
                break
        joined = "".join(reversed(parts))
        start = self._sent - pos
        out = joined[start:start + end - self._sent]
        self._sent = end
        return out
