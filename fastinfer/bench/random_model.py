"""Random-weight Llama model folders of real shapes, built with no download.

The GPU benchmark and the GPU tests need Hugging Face model folders that ``fastinfer`` and
``transformers`` both load, on machines without network and without any model wheel. This
builds one from a ``transformers`` config: random weights (``from_config``; on the GPU when
there is one, which takes seconds even for an 8B shape), saved with ``save_pretrained``
(safetensors), and a small byte-level BPE tokenizer trained on CPython's own
``pydoc_data/topics.py`` text, saved as a ``PreTrainedTokenizerFast`` (``tokenizer.json`` +
``tokenizer_config.json``) with BOS/EOS tokens.

Speed does not depend on weight values when EOS is ignored; correctness is checked against
``transformers`` on the same random weights (see ``BUILD_NOTES.md``).

Shapes (:data:`SHAPES`):

- ``tiny``: 4 layers, hidden 256, 8 heads / 2 KV heads (GQA 4), head_dim 64 (so the attention
  width 512 differs from hidden), intermediate 768, vocabulary = the tokenizer's. A large init
  range makes greedy logits peaked (few near-ties), as ``tests/conftest.py::save_tiny_model``.
- ``tiny-hd128``: 2 layers, hidden 256, 4 heads / 2 KV heads, head_dim 128, Llama-3 rope
  scaling: the other head dim, for kernels that specialise on it.
- ``llama-3.2-1b``: Llama 3.2 1B (16 layers, hidden 2048, 32/8 heads, intermediate 8192,
  vocabulary 128256, tied embeddings, rope_theta 500000 with llama3 scaling factor 32).
- ``llama-3.1-8b``: Llama 3.1 8B (32 layers, hidden 4096, 32/8 heads, intermediate 14336,
  vocabulary 128256, untied, llama3 scaling factor 8).

Usage::

    from fastinfer.bench.random_model import save_random_llama
    folder = save_random_llama("/tmp/tiny", "tiny", torch.float32, seed=0)
    LLM(folder, device="cpu").generate(["Hello"], SamplingParams(max_tokens=8))

or ``python -m fastinfer.bench.random_model DIR --shape llama-3.2-1b``.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from fastinfer.bench.workload import corpus_text

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
TOKENIZER_VOCAB = 4096
"""Entries of the trained tokenizer (BOS = 0, EOS = 1); the real shapes keep their own larger
model vocabulary, so ids past the tokenizer's are valid model outputs that decode to ''."""
STAMP = "random_model.json"

_LLAMA3_ROPE_1B = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
_LLAMA3_ROPE_8B = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, vocab_size=None, max_position_embeddings=2048,
                 rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False, rms_norm_eps=1e-5,
                 initializer_range=0.05),
    "tiny-hd128": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=128, vocab_size=None, max_position_embeddings=2048,
                       rope_theta=500000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
                       tie_word_embeddings=True, rms_norm_eps=1e-5, initializer_range=0.05),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE_1B, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, initializer_range=0.02),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE_8B, tie_word_embeddings=False,
                         rms_norm_eps=1e-5, initializer_range=0.02),
}


def shape_config(shape: str, **overrides: Any):
    """The ``transformers.LlamaConfig`` of ``shape`` (``overrides`` replace its fields, e.g.
    ``num_hidden_layers=1`` for a quick check of a big shape's other dimensions)."""
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    fields = {**SHAPES[shape], **overrides}
    if fields["vocab_size"] is None:
        fields["vocab_size"] = TOKENIZER_VOCAB
    if fields["rope_scaling"] is None:
        fields.pop("rope_scaling")
    # Both spellings: transformers 5 folds rope_theta/rope_scaling into rope_parameters, 4.x
    # keeps them; fastinfer's config reader takes either.
    return LlamaConfig(bos_token_id=0, eos_token_id=1, pad_token_id=None, attention_bias=False, mlp_bias=False,
                       **fields)


def weight_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """Bytes of weights a decode step reads per token: every linear weight (q, k, v, o, gate,
    up, down) and the LM head; a tied LM head is the embedding matrix, counted once; the
    embedding row and the norm vectors are negligible and left out."""
    h, i, hd = config.hidden_size, config.intermediate_size, getattr(config, "head_dim", None)
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    hd = hd or h // nh
    per_layer = h * nh * hd * 2 + h * nkv * hd * 2 + 3 * h * i
    return (config.num_hidden_layers * per_layer + config.vocab_size * h) * dtype_bytes


def build_tokenizer(vocab_size: int = TOKENIZER_VOCAB):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained (deterministically, ~0.2 s) on
    :func:`~fastinfer.bench.workload.corpus_text`, BOS id 0 and EOS id 1, BOS prepended by its post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = corpus_text()
    tok.train_from_iterator([text[i:i + 4096] for i in range(0, len(text), 4096)], trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, 0), (EOS, 1)])
    return tok


def save_tokenizer(path: str | os.PathLike, vocab_size: int = TOKENIZER_VOCAB) -> int:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (a ``PreTrainedTokenizerFast``
    with BOS/EOS) to ``path``; returns the vocabulary size."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tok = build_tokenizer(vocab_size)
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": 131072, "padding_side": "left",
              "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                                "single_word": False, "special": True}
                                       for i, t in enumerate((BOS, EOS))}}
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS}, f, indent=2)
    return tok.get_vocab_size()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_random_llama(shape: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                       device: str | torch.device | None = None, **overrides: Any):
    """A ``transformers.LlamaForCausalLM`` of ``shape`` with random weights (normal with the
    shape's init range, norms at 1), built directly on ``device`` (default: the GPU when there
    is one) in ``dtype``; ``eval()`` mode."""
    from transformers import LlamaForCausalLM

    config = shape_config(shape, **overrides)
    device = torch.device(device) if device is not None else default_device()
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)  # parameters are created (and initialised) in dtype
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    _float32_rotary(model, config, device)
    model.requires_grad_(False)
    _reinit(model, config.initializer_range, seed)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens (EOS ignored)
    return model.eval()


def _float32_rotary(model, config, device: torch.device) -> None:
    """Rebuilds the rotary modules (built above under a 16-bit default dtype) so that their
    frequency tables are float32, as ``from_pretrained`` leaves them."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                with device:  # (the constructor's signature varies across versions: config only)
                    setattr(parent, name, type(child)(config))


@torch.no_grad()
def _reinit(model, std: float, seed: int) -> None:
    """Draws every weight again under ``seed`` (whatever transformers' version does at
    construction): matrices normal(0, ``std``), norm weights 1. Same seed, same device: same
    weights."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if p.data_ptr() in seen:  # a tied LM head
            continue
        seen.add(p.data_ptr())
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)


def write_folder(model, path: str | os.PathLike, shape: str, seed: int) -> str:
    """Saves ``model`` (``save_pretrained``, safetensors) and the tokenizer to ``path``, and a
    stamp naming shape, dtype and seed (:func:`is_built` reads it)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    stamp = os.path.join(path, STAMP)
    if os.path.exists(stamp):
        os.remove(stamp)  # a half-written folder must not look complete
    model.save_pretrained(path, safe_serialization=True)
    save_tokenizer(path)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    with open(stamp, "w") as f:
        json.dump({"shape": shape, "dtype": dtype, "seed": seed,
                   "num_hidden_layers": model.config.num_hidden_layers}, f)
    return path


def is_built(path: str | os.PathLike, shape: str, dtype: torch.dtype, seed: int) -> bool:
    """True when ``path`` holds a complete folder written by :func:`save_random_llama` for
    the same shape (full depth), dtype and seed."""
    try:
        with open(os.path.join(os.fspath(path), STAMP)) as f:
            stamp = json.load(f)
    except (OSError, ValueError):
        return False
    return (stamp.get("shape") == shape and stamp.get("dtype") == str(dtype).removeprefix("torch.")
            and stamp.get("seed") == seed and stamp.get("num_hidden_layers") == SHAPES[shape]["num_hidden_layers"])


def save_random_llama(path: str | os.PathLike, shape: str = "tiny", dtype: torch.dtype = torch.bfloat16,
                      seed: int = 0, device: str | torch.device | None = None, overwrite: bool = False,
                      **overrides: Any) -> str:
    """Builds (see :func:`build_random_llama`) and saves a random-weight Llama folder of
    ``shape`` with its tokenizer at ``path``; returns ``path``. A folder already built for the
    same shape, dtype and seed is kept unless ``overwrite`` (or ``overrides`` are given)."""
    path = os.fspath(path)
    if not overwrite and not overrides and is_built(path, shape, dtype, seed):
        return path
    model = build_random_llama(shape, dtype, seed, device, **overrides)
    try:
        write_folder(model, path, shape, seed)
        if overrides:  # not the shape's full definition: never reused as such
            os.remove(os.path.join(path, STAMP))
    finally:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path")
    p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    print(save_random_llama(args.path, args.shape, getattr(torch, args.dtype), args.seed, args.device,
                            overwrite=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
