"""CUDA kernels from the extension ``fastinfer._C_cuda`` (built only where CUDA is present).

The extension registers ``torch.ops.fastinfer_cuda.*``; this module loads it once. The package
imports fine without it: :func:`available` is then False.
"""
from __future__ import annotations


import torch

from fastinfer._native import extension_built
from fastinfer.common.metadata import AttentionMetadata

__all__ = ["CHECK_SLOTS", "DECODE_HEAD_DIMS", "MAX_DECODE_WIDTH", "available", "built", "paged_attention", "paged_attention_applies",
           "paged_decode_attention", "reshape_and_cache"]

# reshape_and_cache checks on the GPU that every slot lies in [-1, num_blocks * block_size) (one
# reduction and one host sync per call) unless this is False or the current stream is capturing a
# CUDA graph. The kernel itself never writes out of bounds either way (it skips bad slots).
CHECK_SLOTS = True

# Head dims the decode attention kernel is built for.
DECODE_HEAD_DIMS = (64, 128, 256)
MAX_DECODE_WIDTH = 8192
"""Widest block table (in tokens) the decode kernel takes: its grid holds a program per
512-token partition of the table's width, most of which exit at once when a CUDA graph's
tables are as wide as a long ``max_model_len``; the Triton kernel's grid is fixed."""
_DECODE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def built() -> bool:
    """True when ``fastinfer._C_cuda`` was compiled and loads (no GPU needed; importing it
    registers the ops)."""
    return extension_built("_C_cuda")


def available() -> bool:
    """True when the CUDA kernels are built and a GPU is present."""
    return built() and torch.cuda.is_available()


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: None = None,
                      v_scale: None = None, *, check_slots: bool | None = None) -> None:
    """Stores ``key/value [T, Hkv, D]`` (rows contiguous, any token stride) into contiguous
    caches ``[num_blocks, block_size, Hkv, D]`` of the same dtype at flat slots
    ``slot_mapping [T]`` (int64; a negative slot skips the token). CUDA tensors only; float
    caches only (``k_scale, v_scale`` are None: quantized caches take the reference).

    ``check_slots``: check on the GPU that every slot is in ``[-1, num_blocks * block_size)``
    and raise otherwise (one host sync). Default: :data:`CHECK_SLOTS`, and never while the
    current stream is capturing a CUDA graph (a sync would break the capture). Out-of-range
    slots are skipped by the kernel in any case.
    """
    if k_scale is not None or v_scale is not None:
        raise ValueError("fastinfer_cuda.reshape_and_cache takes float caches only (k_scale/v_scale must be None)")
    if check_slots is None:
        check_slots = CHECK_SLOTS and not (key.is_cuda and torch.cuda.is_current_stream_capturing())
    torch.ops.fastinfer_cuda.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, bool(check_slots))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention over the paged cache: one query per sequence.

    Args:
        q: ``[B, H, D]`` CUDA tensor, float32 / float16 / bfloat16, last dim contiguous; D in
            :data:`DECODE_HEAD_DIMS`.
        k_cache, v_cache: contiguous ``[num_blocks, block_size, Hkv, D]`` in q's dtype;
            ``H % Hkv == 0`` (query head h reads kv head ``h // (H // Hkv)``).
        block_tables: ``[B, W]`` int32 or int64 block ids, last dim contiguous.
        context_lens: ``[B]`` int32 or int64: cached tokens of each sequence, the current one
            included (its query attends to positions ``0 .. n-1``). 0 gives zeros (padding rows).
        scale: softmax scale.

    Returns:
        ``[B, H, D]`` contiguous in q's dtype, computed in float32. The launch depends only on
        the shapes (never on the lengths' values), so it can be captured in a CUDA graph and
        replayed with other ``context_lens`` and block tables. Lengths are clamped to
        ``[0, W * block_size]`` and block ids to ``[0, num_blocks)`` on the device: bad metadata
        gives wrong numbers, never an out-of-bounds read.
    """
    return torch.ops.fastinfer_cuda.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, float(scale))


def paged_attention_applies(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
    scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> bool:
    """True when :func:`paged_attention` takes these inputs: a pure decode step (one query per
    sequence) on CUDA tensors, float caches in q's dtype (float32 / float16 / bfloat16),
    contiguous ``[num_blocks, block_size, Hkv, D]`` with D in :data:`DECODE_HEAD_DIMS` and
    ``H % Hkv == 0``, and the extension built."""
    return (
        q.is_cuda and k_scale is None and v_scale is None and meta.max_query_len == 1
        and q.dim() == 3 and q.shape[0] == len(meta.context_lens)
        and q.dtype in _DECODE_DTYPES and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
        and k_cache.is_cuda and v_cache.is_cuda and k_cache.dim() == 4 and k_cache.shape == v_cache.shape
        and k_cache.is_contiguous() and v_cache.is_contiguous()
        and q.shape[2] in DECODE_HEAD_DIMS and k_cache.shape[3] == q.shape[2]
        and q.shape[1] % k_cache.shape[2] == 0
        and meta.block_tables.dim() == 2 and meta.block_tables.dtype in (torch.int32, torch.int64)
        and meta.block_tables.shape[1] * k_cache.shape[1] <= MAX_DECODE_WIDTH
        and built()
    )


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
    scale: float, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`fastinfer.ops.reference.paged_attention` for a decode step (see
    :func:`paged_attention_applies`): ``q [B, H, D]``, one query per sequence, read from
    ``meta.block_tables`` and ``meta.context_lens_tensor`` (device tensors, so a captured CUDA
    graph replays with new contents). Returns ``[B, H, D]`` in q's dtype."""
    if k_scale is not None or v_scale is not None:
        raise ValueError("fastinfer_cuda.paged_attention takes float caches only (k_scale/v_scale must be None)")
    if q.stride(-1) != 1:
        q = q.contiguous()
    ctx = meta.context_lens_tensor
    if ctx.device != q.device:
        ctx = ctx.to(q.device, non_blocking=True)
    tables = meta.block_tables
    if tables.device != q.device:
        tables = tables.to(q.device, non_blocking=True)
    if tables.dim() == 2 and tables.stride(-1) != 1:
        tables = tables.contiguous()
    return torch.ops.fastinfer_cuda.paged_decode_attention(q, k_cache, v_cache, tables, ctx, float(scale))


def _cache_write_applies(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> bool:
    return (key.is_cuda and k_scale is None and key.dtype == k_cache.dtype and value.dtype == v_cache.dtype
            and key.stride(-1) == 1 and value.stride(-1) == 1)


def _cache_write(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
    # The runner checks a step's slots on the host as it builds them (ModelRunner.pack), so no
    # host sync per layer here; the kernel never writes outside the cache whatever the slots.
    reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, check_slots=False)


def register_ops(register) -> None:
    """Registers the CUDA C++ kernels (ahead of Triton where both apply) with the dispatch
    point's ``register`` where they are built and a GPU is present."""
    if not available():
        return
    register("reshape_and_cache", "cuda", _cache_write, _cache_write_applies)
    register("paged_attention", "cuda", paged_attention, paged_attention_applies)
