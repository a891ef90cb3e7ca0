"""The ``--dataset`` JSONL loader: prompt lines, ShareGPT conversations, and clear errors."""
from __future__ import annotations

import json

import pytest

from fastinfer.bench.dataset import DatasetEntry, DatasetError, load_dataset


class WordTokenizer:
    """One token per whitespace-separated word."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1] * (add_special_tokens + len(text.split()))


def write_lines(tmp_path, *lines: str) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_prompt_lines_with_and_without_max_tokens(tmp_path):
    path = write_lines(tmp_path, json.dumps({"prompt": "Hello", "max_tokens": 7}), "",
                       "   ", json.dumps({"prompt": "Bye"}),
                       json.dumps({"prompt": "Null", "max_tokens": None}))
    assert load_dataset(path) == [DatasetEntry("Hello", 7), DatasetEntry("Bye", None),
                                  DatasetEntry("Null", None)]


def test_sharegpt_prompt_is_first_human_turn_and_reply_sets_max_tokens(tmp_path):
    conv = {"id": "x", "conversations": [
        {"from": "system", "value": "be nice"}, {"from": "human", "value": "Tell me a joke"},
        {"from": "gpt", "value": "why did the chicken cross"}, {"from": "human", "value": "more"}]}
    msgs = {"messages": [{"role": "user", "content": "Hi there"},
                         {"role": "assistant", "content": "hello"}]}
    path = write_lines(tmp_path, json.dumps(conv), json.dumps(msgs))
    assert load_dataset(path, tokenizer=WordTokenizer()) == [
        DatasetEntry("Tell me a joke", 5), DatasetEntry("Hi there", 1)]
    assert load_dataset(path) == [DatasetEntry("Tell me a joke", None),
                                  DatasetEntry("Hi there", None)]


def test_conversation_without_reply_has_no_max_tokens(tmp_path):
    path = write_lines(tmp_path, json.dumps({"conversations": [{"from": "human", "value": "Q"}]}))
    assert load_dataset(path, tokenizer=WordTokenizer()) == [DatasetEntry("Q", None)]


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "a",', "not valid JSON"),
    ('["a", "b"]', "expected a JSON object, got list"),
    ('{"text": "a"}', "expected a 'prompt' string or a 'conversations'/'messages' list"),
    ('{"prompt": 3}', "'prompt' must be a string, got int 3"),
    ('{"prompt": ""}', "'prompt' is empty"),
    ('{"prompt": "\\ud800"}', "'prompt' is not valid Unicode: lone surrogate"),
    ('{"prompt": "a", "max_tokens": "8"}', "'max_tokens' must be an int >= 1, got str '8'"),
    ('{"prompt": "a", "max_tokens": 0}', "'max_tokens' must be an int >= 1, got 0"),
    ('{"prompt": "a", "max_tokens": true}', "'max_tokens' must be an int >= 1, got bool True"),
    ('{"conversations": "hi"}', "'conversations' must be a list"),
    ('{"conversations": [{"from": "gpt", "value": "x"}]}', "no human/user turn"),
    ('{"conversations": [{"from": "human"}]}', "'conversations'[0].value must be a string, got missing"),
    ('{"messages": [{"role": "user", "content": 5}]}', "'messages'[0].content must be a string, got int"),
    ('{"messages": ["user: hi"]}', "'messages'[0] must be an object"),
])
def test_bad_line_names_file_line_and_problem(tmp_path, bad, message):
    path = write_lines(tmp_path, json.dumps({"prompt": "ok"}), "", bad)
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    text = str(info.value)
    assert text.startswith(f"{path}:3: ")
    assert message in text


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DatasetError, match=r"data\.jsonl:2: not valid UTF-8"):
        load_dataset(path)


def test_json_array_file_gets_a_hint(tmp_path):
    path = write_lines(tmp_path, "[", json.dumps({"prompt": "a"}), "]")
    with pytest.raises(DatasetError, match=r":1: .*one object per line"):
        load_dataset(path)


def test_empty_or_missing_file_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="dataset is empty"):
        load_dataset(write_lines(tmp_path, "", "  "))
    with pytest.raises(DatasetError, match=r"nope\.jsonl: cannot read dataset"):
        load_dataset(tmp_path / "nope.jsonl")
