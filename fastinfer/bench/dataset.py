"""Benchmark prompts from a JSONL file (``--dataset FILE.jsonl``), one JSON object per line:

- ``{"prompt": "...", "max_tokens": 128}`` (``max_tokens`` optional or null), or
- ShareGPT style ``{"conversations": [{"from": "human", "value": "..."},
  {"from": "gpt", "value": "..."}, ...]}``, or the same with ``"messages"`` of
  ``{"role": "user" | "assistant" | "system", "content": "..."}``.

For a conversation the prompt is the first human/user turn; ``max_tokens`` is the token length
of the gpt/assistant reply that directly follows it when a tokenizer is given (None without a
tokenizer, without such a reply, or when the reply is empty), so a benchmark can replay the
real output lengths. Blank lines are skipped. Any bad line raises ``DatasetError`` naming the
file, the 1-based line number and what is wrong.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from fastinfer.errors import InvalidArgumentError
from fastinfer.validation import check_int, check_str

HUMAN_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bard", "bing", "model"})
CONVERSATION_KEYS = {"conversations": ("from", "value"), "messages": ("role", "content")}


class DatasetError(ValueError):
    """A dataset file is missing, empty or has a malformed line (the message names both)."""


@dataclass(frozen=True, slots=True)
class DatasetEntry:
    """One benchmark request: the prompt text and, when the dataset says, how many tokens to
    generate (None: the benchmark's default)."""

    prompt: str
    max_tokens: int | None = None


class _LineError(Exception):
    """What is wrong with one line; ``load_dataset`` adds the file and line number."""


def _parse_prompt_line(obj: dict) -> DatasetEntry:
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None:
        max_tokens = check_int("'max_tokens'", max_tokens, lo=1)
    return DatasetEntry(check_str("'prompt'", obj["prompt"]), max_tokens)


def _turns(obj: dict, key: str) -> list[tuple[str, str]]:
    """(role, text) of every turn, roles lower-cased; raises on a malformed turn."""
    role_key, text_key = CONVERSATION_KEYS[key]
    turns = obj[key]
    if not isinstance(turns, list):
        raise _LineError(f"'{key}' must be a list of turns, got {type(turns).__name__}")
    out = []
    for i, turn in enumerate(turns):
        where = f"'{key}'[{i}]"
        if not isinstance(turn, dict):
            raise _LineError(f"{where} must be an object, got {type(turn).__name__}")
        for k in (role_key, text_key):
            if not isinstance(turn.get(k), str):
                got = "missing" if k not in turn else type(turn[k]).__name__
                raise _LineError(f"{where}.{k} must be a string, got {got}")
        out.append((turn[role_key].lower(), turn[text_key]))
    return out


def _parse_conversation_line(obj: dict, key: str, tokenizer) -> DatasetEntry:
    turns = _turns(obj, key)
    first = next((i for i, (role, _) in enumerate(turns) if role in HUMAN_ROLES), None)
    if first is None:
        raise _LineError(f"'{key}' has no human/user turn to use as the prompt")
    prompt = check_str(f"'{key}'[{first}] (the prompt)", turns[first][1])
    max_tokens = None
    if tokenizer is not None and first + 1 < len(turns) and turns[first + 1][0] in ASSISTANT_ROLES:
        n = len(tokenizer.encode(turns[first + 1][1], add_special_tokens=False))
        max_tokens = n if n > 0 else None
    return DatasetEntry(prompt, max_tokens)


def _parse_line(text: str, tokenizer) -> DatasetEntry:
    try:
        obj: Any = json.loads(text)
    except json.JSONDecodeError as e:
        raise _LineError(f"not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _LineError(f"expected a JSON object, got {type(obj).__name__}")
    try:
        if "prompt" in obj:
            return _parse_prompt_line(obj)
        for key in CONVERSATION_KEYS:
            if key in obj:
                return _parse_conversation_line(obj, key, tokenizer)
    except InvalidArgumentError as e:  # the validation layer's rule and message, placed in the file
        raise _LineError(str(e)) from None
    raise _LineError(f"expected a 'prompt' string or a 'conversations'/'messages' list, "
                     f"found keys {sorted(obj)}")


def load_dataset(path: str | os.PathLike, tokenizer=None) -> list[DatasetEntry]:
    """Every entry of the JSONL file at ``path``, in file order. ``tokenizer`` (anything with
    ``encode(text, add_special_tokens=False)``) measures conversation replies for
    ``max_tokens``. Raises ``DatasetError`` for a missing or empty file or any bad line."""
    try:
        with open(path, "rb") as f:
            raw_lines = f.read().splitlines()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read dataset: {e.strerror or e}") from None
    entries = []
    for lineno, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            if not text.strip():
                continue
            entries.append(_parse_line(text, tokenizer))
        except UnicodeDecodeError as e:
            raise DatasetError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
        except _LineError as e:
            hint = ""
            if lineno == 1 and text.lstrip().startswith("["):
                hint = " (the file looks like one JSON array; write one object per line)"
            raise DatasetError(f"{path}:{lineno}: {e}{hint}") from None
    if not entries:
        raise DatasetError(f"{path}: dataset is empty (no non-blank lines)")
    return entries
