"""Incremental detokenization: turn a stream of generated token ids into a stream of text deltas.

Decoding one token alone is wrong twice over: a byte-level token may hold only part of a UTF-8
character, and SentencePiece-style decoders drop the leading space of the first token they see.
So each step decodes a short window — the tokens already emitted since ``prefix_offset`` and the
new ones since ``read_offset`` — and emits the text the new tokens add (vLLM's scheme). A window
whose text ends in U+FFFD holds an incomplete character: nothing is emitted until it completes.
Each step costs O(window), never O(sequence).
"""

from __future__ import annotations

from collections.abc import Sequence

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # sampling sits below model/ (DESIGN.md): the type is only named here
    from fastinfer.model.tokenizer import Tokenizer

# Prompt tokens decoded as context before the first generated token (word boundaries, spaces).
_PROMPT_CONTEXT_TOKENS = 5
# A UTF-8 character spans at most 4 bytes, so a window this far past the last emitted token that
# still ends in U+FFFD holds invalid bytes, not a character in progress: emit it as it is.
_MAX_PENDING_TOKENS = 8
_REPLACEMENT_CHAR = "\ufffd"
# Ids before the window are dropped once this many pile up.
_COMPACT_AFTER = 256


class IncrementalDetokenizer:
    """Detokenizes the tokens of one sequence as they are generated.

    ``add(token_id)`` returns only the new text; the detokenizer keeps no text of its own
    (whoever needs the whole text, the stop-string matcher, joins the deltas once). The deltas
    concatenate to ``tokenizer.decode(generated_ids)`` whenever the generated text does not end
    in an incomplete character (for SentencePiece-style tokenizers the first delta keeps the
    space that separates it from the prompt, as in vLLM).
    """

    __slots__ = ("_tokenizer", "_skip_special", "_ids", "_prefix_offset", "_read_offset", "_num_generated")

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # Only the tail of the prompt is kept: it is all the context a window ever needs.
        self._ids: list[int] = [int(i) for i in prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._num_generated = 0

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes (possibly ``""``)."""
        self._ids.append(int(token_id))
        self._num_generated += 1
        new_text = self._decode(self._prefix_offset, len(self._ids))
        pending = len(self._ids) - self._read_offset
        if new_text.endswith(_REPLACEMENT_CHAR) and pending < _MAX_PENDING_TOKENS:
            return ""  # an incomplete character: wait for the tokens that finish it
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        if new_text.startswith(prefix_text):
            delta = new_text[len(prefix_text):]
        else:  # only after forced emission of invalid bytes: emit what changed at the end
            delta = new_text[_common_prefix_len(prefix_text, new_text):]
        # A token that adds no text (a skipped special token) keeps the window, so the next
        # token still sees the word before it; the pending limit keeps the window bounded.
        if delta or pending >= _MAX_PENDING_TOKENS:
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._compact()
        return delta

    @property
    def num_generated_tokens(self) -> int:
        """How many tokens ``add`` has received."""
        return self._num_generated

    def _decode(self, start: int, stop: int) -> str:
        if start >= stop:
            return ""
        return self._tokenizer.decode(self._ids[start:stop], skip_special_tokens=self._skip_special)

    def _compact(self) -> None:
        """Forget ids before the window, so memory stays bounded like the time per step."""
        if self._prefix_offset >= _COMPACT_AFTER:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
