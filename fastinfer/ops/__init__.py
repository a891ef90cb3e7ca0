"""``fastinfer.ops``: THE dispatch point between native CPU, Triton, CUDA and the pure-torch
reference. Layers call these functions and never ask which device they run on.

Shapes and dtypes of every op are documented on its reference in ``ops/reference.py``.
"""
from __future__ import annotations

import os

import torch

from fastinfer.ops import cpu_native, cuda_native, reference
from fastinfer.ops.dispatch import BACKENDS, forced_backend, forcing, implementations, register, select
from fastinfer.ops.metadata import AttentionMetadata
from fastinfer.ops.packed import PackedWeight

_REFERENCE_OPS = (
    "linear", "embedding", "rms_norm", "add_rms_norm", "silu_and_mul", "rotary_embedding",
    "reshape_and_cache", "paged_attention", "quantized_linear", "quantized_embedding", "decoder_layers",
)
for _name in _REFERENCE_OPS:
    register(_name, "reference", getattr(reference, _name))


def _native_f32_linear_applies(x: torch.Tensor, weight: torch.Tensor, bias=None) -> bool:
    # The native kernel has a fixed reduction order per output element, so results do not
    # depend on the batch (BUILD_NOTES.md, Numerics; oneDNN's bfloat16 matmul changes rows with
    # the batch from M = 128 at K = 1536): the default float32 and bfloat16 CPU path.
    return x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)


if cpu_native.available():
    register("linear", "cpu_native", cpu_native.linear_f32, _native_f32_linear_applies)
    # Fixed reduction order per (query, head): batch-invariant, like the reference.
    register("paged_attention", "cpu_native", cpu_native.paged_attention, cpu_native.paged_attention_applies)
    # int8 inputs and exact int8 dot products (VNNI), or weights dequantized in registers; either
    # way a fixed reduction order per output: batch-invariant.
    register("quantized_linear", "cpu_native", cpu_native.linear_q, cpu_native.linear_q_applies)
    # Row-wise, a fixed order per row: batch-invariant.
    for _name in ("rms_norm", "add_rms_norm", "silu_and_mul", "rotary_embedding"):
        register(_name, "cpu_native", getattr(cpu_native, _name), getattr(cpu_native, _name + "_applies"))
    # Same casts and per-row quantization as the reference, bit for bit.
    register("reshape_and_cache", "cpu_native", cpu_native.reshape_and_cache, cpu_native.reshape_and_cache_applies)
    # The layers' native kernels in one call: the same results as the reference's layer loop
    # over the ops above, without ~100 us of Python per layer.
    register("decoder_layers", "cpu_native", cpu_native.decoder_layers, cpu_native.decoder_layers_applies)


def _register_triton() -> None:
    """Triton kernels: on a GPU, and on the CPU under ``TRITON_INTERPRET=1`` (where the tests
    run them, and where they are taken only when the ``triton`` backend is forced)."""
    try:
        from fastinfer.kernels.triton import activation, cache, norm, rotary
        from fastinfer.kernels.triton import attention as triton_attention
        from fastinfer.kernels.triton import quantized_linear as triton_qlinear
    except ImportError:
        return
    # Row-wise ops: one program per row (or a few), one pass over the data.
    register("rms_norm", "triton", norm.rms_norm, norm.rms_norm_applies)
    register("add_rms_norm", "triton", norm.add_rms_norm, norm.add_rms_norm_applies)
    register("silu_and_mul", "triton", activation.silu_and_mul, activation.silu_and_mul_applies)
    register("rotary_embedding", "triton", rotary.rotary_embedding, rotary.rotary_embedding_applies)
    # Float, int8 and fp8 caches; a negative slot (a padded token) is skipped.
    register("reshape_and_cache", "triton", cache.reshape_and_cache, cache.reshape_and_cache_applies)
    # Dequantizes in registers inside the GEMM/GEMV tiles.
    register("quantized_linear", "triton", triton_qlinear.quantized_linear, triton_qlinear.applies)
    # One kernel for prefill and chunked prefill, a split-K one for decode.
    register("paged_attention", "triton", triton_attention.paged_attention, triton_attention.paged_attention_applies)


if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    _register_triton()


def _cuda_cache_write_applies(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> bool:
    return (key.is_cuda and k_scale is None and key.dtype == k_cache.dtype and value.dtype == v_cache.dtype
            and key.stride(-1) == 1 and value.stride(-1) == 1)


def _cuda_cache_write(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    # The runner checks a step's slots on the host as it builds them (ModelRunner.pack), so no
    # host sync per layer here; the kernel never writes outside the cache whatever the slots.
    cuda_native.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, check_slots=False)


# CUDA C++ kernels, ahead of Triton where both apply.
if cuda_native.available():
    register("reshape_and_cache", "cuda", _cuda_cache_write, _cuda_cache_write_applies)
    register("paged_attention", "cuda", cuda_native.paged_attention, cuda_native.paged_attention_applies)


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
                 attn_scale: float, cos_sin: torch.Tensor, norms: list, linears: list):
    """What a fused backend of :func:`decoder_layers` needs from a Llama-family decoder's layers
    (two norm weights and four ``(weight, bias)`` linears per layer: qkv, o, gate_up, down), or
    None when no fused backend takes them. Build it once per set of weights."""
    if not cpu_native.available():
        return None
    return cpu_native.decoder_plan(dtype, num_heads, num_kv_heads, head_dim, eps, attn_scale, cos_sin, norms, linears)


def decoder_layers(layers, plan, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None,
                   kv_caches: list, meta: AttentionMetadata):
    """Runs a decoder's layers (each ``(h, residual) -> (h, residual)``) over the paged cache:
    one fused native call where ``plan`` (from :func:`decoder_plan`) and the inputs allow it,
    else layer by layer. Returns the last ``(h, residual)``."""
    args = (layers, plan, positions, h, residual, kv_caches, meta)
    return select("decoder_layers", *args)(*args)


__all__ = [
    "AttentionMetadata", "BACKENDS", "PackedWeight", "add_rms_norm", "forced_backend", "forcing", "decoder_layers", "decoder_plan", "embedding", "implementations", "linear", "paged_attention",
    "reshape_and_cache", "rms_norm", "rotary_embedding", "silu_and_mul",
]
