"""``fastinfer.ops``: THE dispatch point between native CPU, Triton, CUDA and the pure-torch
reference. Layers call these functions and never ask which device they run on.

Shapes and dtypes of every op are documented on its reference in ``ops/reference.py``.
"""
from __future__ import annotations

import torch

from fastinfer.common.metadata import AttentionMetadata
from fastinfer.common.packed import PackedWeight
from fastinfer.ops import reference
from fastinfer.ops.backends import cpu_native, cuda_native, triton
from fastinfer.ops.dispatch import BACKENDS, forcing, implementations, register, select

_REFERENCE_OPS = (
    "linear", "embedding", "rms_norm", "add_rms_norm", "silu_and_mul", "rotary_embedding",
    "reshape_and_cache", "paged_attention", "quantized_linear", "quantized_embedding", "decoder_layers",
    "decoder_model", "argmax",
)
for _name in _REFERENCE_OPS:
    register(_name, "reference", getattr(reference, _name))
# Later registrations are preferred: the CUDA C++ kernels ahead of Triton where both apply.
cpu_native.register_ops(register)
triton.register_ops(register)
cuda_native.register_ops(register)


def linear(x: torch.Tensor, weight: torch.Tensor | PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ weight[N, K].T (+ bias)`` -> ``[..., N]`` in x's dtype; ``weight`` is a dense
    tensor or a quantized :class:`PackedWeight`."""
    if isinstance(weight, PackedWeight):
        return select("quantized_linear", x, weight, bias)(x, weight, bias)
    return select("linear", x, weight, bias)(x, weight, bias)


def embedding(token_ids: torch.Tensor, weight: torch.Tensor | PackedWeight) -> torch.Tensor:
    """Embedding lookup ``[T]`` -> ``[T, H]`` (float32 rows for a quantized table)."""
    if isinstance(weight, PackedWeight):
        return select("quantized_embedding", token_ids, weight)(token_ids, weight)
    return select("embedding", token_ids, weight)(token_ids, weight)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` of logits rows ``[M, V]`` -> ``[M]`` int64: the first maximal index (the
    lowest id wins a tie; NaN counts as the greatest)."""
    return select("argmax", x)(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim."""
    return select("rms_norm", x, weight, eps)(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + residual``; returns ``(rms_norm(r), r)``."""
    return select("add_rms_norm", x, residual, weight, eps)(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation of a fused gate/up projection ``[..., 2d]`` -> ``[..., d]``."""
    return select("silu_and_mul", x)(x)


def rotary_embedding(positions, q, k, cos_sin):
    """Rotary position embedding of q and k; returns (q, k) (may rotate them in place)."""
    return select("rotary_embedding", positions, q, k, cos_sin)(positions, q, k, cos_sin)


def reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Stores this step's keys and values in the paged cache (quantizing them per token and
    head when the cache is int8 or fp8 and ``k_scale, v_scale`` are given)."""
    args = (key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    select("reshape_and_cache", *args)(*args)


def paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                    k_scale=None, v_scale=None) -> torch.Tensor:
    """Causal attention of packed queries over the paged cache (float, or int8 / fp8 codes
    with per token and head ``k_scale, v_scale``)."""
    args = (q, k_cache, v_cache, meta, scale, k_scale, v_scale)
    return select("paged_attention", *args)(*args)


def decoder_plan(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, eps: float,
                 attn_scale: float, cos_sin: torch.Tensor, norms: list, linears: list,
                 embed: torch.Tensor | PackedWeight | None = None, final_norm: torch.Tensor | None = None):
    """What a fused backend of :func:`decoder_layers` needs from a Llama-family decoder's layers
    (two norm weights and four ``(weight, bias)`` linears per layer: qkv, o, gate_up, down), or
    None when no fused backend takes them; with the model's token table ``embed`` and last norm
    weight ``final_norm``, also what :func:`decoder_model`'s needs. Build it once per set of weights."""
    if not cpu_native.available():
        return None
    return cpu_native.decoder_plan(dtype, num_heads, num_kv_heads, head_dim, eps, attn_scale, cos_sin, norms,
                                   linears, embed, final_norm)


def decoder_layers(layers, plan, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None,
                   kv_caches: list, meta: AttentionMetadata):
    """Runs a decoder's layers (each ``(h, residual) -> (h, residual)``) over the paged cache:
    one fused native call where ``plan`` (from :func:`decoder_plan`) and the inputs allow it,
    else layer by layer. Returns the last ``(h, residual)``."""
    args = (layers, plan, positions, h, residual, kv_caches, meta)
    return select("decoder_layers", *args)(*args)


def decoder_model(model, plan, token_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                  meta: AttentionMetadata) -> torch.Tensor:
    """A decoder model's final hidden states ``[T, hidden]`` for ``token_ids [T]``: its embedding,
    layers and final norm in one fused native call where ``plan`` and the inputs allow it, else
    ``model.forward_parts`` (each part through its own op)."""
    args = (model, plan, token_ids, positions, kv_caches, meta)
    return select("decoder_model", *args)(*args)


__all__ = [
    "AttentionMetadata", "BACKENDS", "PackedWeight", "add_rms_norm", "argmax", "forcing", "decoder_layers", "decoder_model", "decoder_plan", "embedding", "implementations", "linear", "paged_attention",
    "reshape_and_cache", "rms_norm", "rotary_embedding", "silu_and_mul",
]
