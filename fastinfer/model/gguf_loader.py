"""Reads a GGUF file (``llama`` architecture): metadata, and tensors dequantized at load and
renamed to Hugging Face names.

llama.cpp's converter permutes the rows of Q and K so that its rotary kernel can rotate
adjacent pairs; we undo that permutation so the rotate-half layout of HF Llama applies.
"""
from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import torch

from fastinfer.errors import ModelLoadError

SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "Q5_0", "Q5_1"}

_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1+: rotary frequency divisors, not a model weight
_BLK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def open_gguf(path: str):
    """Opens ``path`` with ``gguf.GGUFReader``; a missing or corrupt file raises ModelLoadError."""
    import gguf

    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises many types on damaged input
        raise ModelLoadError(f"cannot read GGUF file {path}: {type(exc).__name__}: {exc}") from exc


def read_metadata(reader) -> dict[str, Any]:
    """All key/value fields of the file as plain Python values."""
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception as exc:
            raise ModelLoadError(f"corrupt GGUF metadata field {key!r}: {exc}") from exc
    return out


def hf_name(gguf_name: str) -> str:
    """Hugging Face name of a GGUF tensor name (``blk.3.attn_q.weight`` ->
    ``model.layers.3.self_attn.q_proj.weight``)."""
    if gguf_name in _NAMES:
        return _NAMES[gguf_name]
    if gguf_name == ROPE_FREQS:
        return ROPE_FREQS
    m = _BLK.match(gguf_name)
    if not m or m.group(2) not in _BLOCK:
        raise ModelLoadError(f"unknown GGUF tensor {gguf_name!r}")
    idx, part, kind = m.groups()
    return f"model.layers.{idx}.{_BLOCK[part]}.{kind}"


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation (pairs interleaved -> halves)."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def load_gguf_tensors(reader, num_heads: int, num_kv_heads: int) -> dict[str, torch.Tensor]:
    """Every tensor of the file, dequantized to float32 and named the Hugging Face way."""
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise ModelLoadError(f"tensor {t.name!r} has unsupported GGUF type {kind}")
        try:
            arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as exc:
            raise ModelLoadError(f"cannot dequantize tensor {t.name!r} ({kind}): {exc}") from exc
        shape = tuple(int(d) for d in reversed(t.shape))
        arr = arr.reshape(shape)
        name = hf_name(t.name)
        if ".self_attn.q_proj." in name:
            arr = unpermute_rope_rows(arr, num_heads)
        elif ".self_attn.k_proj." in name:
            arr = unpermute_rope_rows(arr, num_kv_heads)
        out[name] = torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))  # owned, writable
    return out
