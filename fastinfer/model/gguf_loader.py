"""Reads a GGUF file (``llama`` architecture): metadata, and tensors renamed to Hugging Face
names, either dequantized to float32 or with their quantized blocks kept (converted, without
loss, into fastinfer's packed layout; see ``fastinfer/quant/gguf_blocks.py``).

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
from fastinfer.common.packed import PackedWeight, permute_rows
from fastinfer.quant.gguf_blocks import KEPT_TYPES, to_packed

SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K"}

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
    """Opens ``path`` with ``gguf.GGUFReader``; a missing, truncated or corrupt file raises
    ModelLoadError (a truncated one names the first tensor cut short and its byte counts)."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"GGUF file not found: {path}")
    try:
        return _checked_reader(path)
    except ModelLoadError:
        raise
    except Exception as exc:  # the reader raises many types on damaged input
        raise ModelLoadError(f"cannot read GGUF file {path} ({os.path.getsize(path)} bytes): its header or "
                             f"metadata is truncated or corrupt: {type(exc).__name__}: {exc}") from exc


def _checked_reader(path: str):
    """A ``GGUFReader`` that, before viewing tensor data, checks each tensor lies inside the file."""
    import gguf

    class CheckedReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs: int, fields: list) -> None:
            _check_tensor_extents(path, len(self.data), start_offs, fields)
            super()._build_tensors(start_offs, fields)

    return CheckedReader(path)


def _check_tensor_extents(path: str, file_size: int, start_offs: int, fields: list) -> None:
    """Raises ModelLoadError for the first tensor whose bytes run past the end of the file."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    extents = []  # (name, type, first byte, byte count) per tensor
    for field in fields:
        _, name, _, dims, raw_type, offset = field.parts
        kind = GGMLQuantizationType(int(raw_type[0]))
        block, type_size = GGML_QUANT_SIZES[kind]
        extents.append((bytes(name).decode("utf-8", "replace"), kind.name, start_offs + int(offset[0]),
                        int(np.prod(dims)) * type_size // block))
    needed = max((begin + n for _, _, begin, n in extents), default=0)
    for name, kind, begin, n_bytes in extents:
        if begin + n_bytes > file_size:
            have = max(0, file_size - begin)
            raise ModelLoadError(
                f"GGUF file {path} is truncated or incomplete: it has {file_size} bytes, its tensors need "
                f"{needed}; tensor {name!r} ({kind}) needs {n_bytes} bytes at offset {begin}, and only {have} "
                "are there")


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


def has_quantized_tensors(reader) -> bool:
    """True when some tensor of the file is in a block type that can be kept quantized."""
    return any(t.tensor_type.name in KEPT_TYPES for t in reader.tensors)


def load_gguf_tensors(reader, num_heads: int, num_kv_heads: int,
                      keep_quantized: bool = False) -> dict[str, torch.Tensor | PackedWeight]:
    """Every tensor of the file named the Hugging Face way: float32, or, with
    ``keep_quantized``, a :class:`PackedWeight` for each matrix in a keepable block type."""
    from gguf.quants import dequantize

    out: dict[str, torch.Tensor | PackedWeight] = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise ModelLoadError(f"tensor {t.name!r} has unsupported GGUF type {kind}")
        if keep_quantized and kind in KEPT_TYPES and len(t.shape) == 2:
            out[hf_name(t.name)] = _kept(t, kind, num_heads, num_kv_heads)
            continue
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


def _kept(t, kind: str, num_heads: int, num_kv_heads: int) -> PackedWeight:
    """A quantized GGUF matrix as a packed weight, Q/K rows un-permuted like the float path."""
    rows, cols = (int(d) for d in reversed(t.shape))
    name = hf_name(t.name)
    try:
        packed = to_packed(kind, t.data, rows, cols)
    except ValueError as exc:
        raise ModelLoadError(f"cannot read the {kind} blocks of tensor {t.name!r}: {exc}") from exc
    heads = num_heads if ".self_attn.q_proj." in name else num_kv_heads if ".self_attn.k_proj." in name else 0
    if heads:
        perm = unpermute_rope_rows(np.arange(rows), heads)
        packed = permute_rows(packed, torch.from_numpy(np.ascontiguousarray(perm)))
    return packed
