"""Triton kernels of ``ops.paged_attention``: one op for prefill, chunked prefill and decode.

Flash-style (online softmax) causal attention of packed queries over the paged K/V cache,
with GQA; the semantics are those of :func:`fastinfer.ops.reference.paged_attention`.

- **Prefill and mixed steps** (``max_query_len > 1``): grid ``(B, H, cdiv(max_query_len,
  BLOCK_M))``. A program takes ``BLOCK_M`` queries of one sequence and one head and walks the
  sequence's keys ``BLOCK_N`` at a time, gathering each key's cache slot through the block
  table, up to the causal limit of its last query.
- **Decode** (``max_query_len == 1``): split along the sequence (flash-decoding). Grid
  ``(B, Hkv, S)``: a program takes every query head of one kv head (each K/V row is read once
  for the group) and one of ``S`` equal slices of the context, whose size it computes from the
  sequence's length at run time. The grid depends only on the batch size and the heads, so the
  kernel can be captured in a CUDA graph and replayed with other lengths. A second kernel
  combines the slices' partial results (``max``, ``sum`` and weighted values) per query head.
  A sequence of length 0 (a padded row of a captured batch) gives zeros.

Caches are float (the model's dtype) or int8 codes with a float32 scale per (token, kv head)
(:mod:`fastinfer.common.kv_format`), dequantized as ``float(code) * scale``. Math in float32: float32
inputs are multiplied in IEEE float32; float16 / bfloat16 products use the tensor cores with
float32 accumulation, the probabilities rounded to the value dtype before the ``P @ V`` product
(as FlashAttention does). Under the interpreter 16-bit inputs are upcast to float32 first.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastinfer.kernels.triton.common import FLOAT_DTYPES, interpreting, runs_here
from fastinfer.common.metadata import AttentionMetadata


@triton.jit
def _load_kv(cache_ptr, scale_ptr, slots, kvh, d, mask, Hkv: tl.constexpr, D: tl.constexpr,
             QUANT: tl.constexpr):
    """Rows ``[BLOCK_N, D]`` of one kv head at cache ``slots`` (float32 for a quantized cache)."""
    x = tl.load(cache_ptr + (slots * Hkv + kvh)[:, None] * D + d[None, :], mask=mask[:, None], other=0.0)
    if QUANT:
        s = tl.load(scale_ptr + slots * Hkv + kvh, mask=mask, other=0.0)
        x = x.to(tl.float32) * s[:, None]
    return x


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _online_tile(q, k_ptr, v_ptr, ks_ptr, vs_ptr, tables_ptr, b, stride_tb, kvh, j, n_mask, visible, scale,
                 m_i, l_i, acc, Hkv: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, QUANT: tl.constexpr,
                 F32: tl.constexpr):
    """One tile of keys ``j`` (gathered through sequence ``b``'s block table) folded into the
    online softmax state ``(m_i, l_i, acc)`` of the queries ``q``; ``visible [M, N]`` masks
    the scores (causality, the tile's end)."""
    d = tl.arange(0, D)
    page = tl.load(tables_ptr + b * stride_tb + j // BS, mask=n_mask, other=0)
    slots = page.to(tl.int64) * BS + j % BS
    k = _load_kv(k_ptr, ks_ptr, slots, kvh, d, n_mask, Hkv, D, QUANT)
    v = _load_kv(v_ptr, vs_ptr, slots, kvh, d, n_mask, Hkv, D, QUANT)
    if not F32:
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    s = tl.where(visible, _dot(q, tl.trans(k), F32) * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that sees no key yet
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if F32:
        acc = acc * alpha[:, None] + _dot(p, v, F32)
    else:
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, F32)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, out_ptr, tables_ptr, qsl_ptr, ctx_ptr, scale,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_tb,
                    H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr, F32: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    mb = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if mb * BLOCK_M >= q_len:
        return
    ctx = tl.load(ctx_ptr + b)
    kvh = h // (H // Hkv)
    rm = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    m_mask = rm < q_len
    q = tl.load(q_ptr + (q_start + rm)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=m_mask[:, None], other=0.0)
    if F32:
        q = q.to(tl.float32)
    pos = ctx - q_len + rm  # each query's position; it sees keys 0..pos
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    end = tl.minimum(ctx, ctx - q_len + (mb + 1) * BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    for n0 in range(0, end, BLOCK_N):
        j = n0 + rn
        n_mask = j < end
        visible = (j[None, :] <= pos[:, None]) & n_mask[None, :]
        m_i, l_i, acc = _online_tile(q, k_ptr, v_ptr, ks_ptr, vs_ptr, tables_ptr, b, stride_tb, kvh, j, n_mask, visible,
                                     scale, m_i, l_i, acc, Hkv, D, BS, QUANT, F32)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + (q_start + rm)[:, None] * stride_ot + h * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, out_ptr, part_o_ptr, part_ml_ptr, tables_ptr, ctx_ptr,
                   scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_tb,
                   H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, G: tl.constexpr,
                   GP: tl.constexpr, S: tl.constexpr, BLOCK_N: tl.constexpr, QUANT: tl.constexpr,
                   F32: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    # S slices of whole BLOCK_N tiles: the slice size follows this sequence's length.
    per = tl.cdiv(tl.cdiv(ctx, S), BLOCK_N) * BLOCK_N
    start = sp * per
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    heads = kvh * G + g
    g_mask = g < G
    if start >= ctx:
        if S == 1:  # the only slice of an empty (padded) sequence: zeros
            tl.store(out_ptr + b * stride_ot + heads[:, None] * stride_oh + d[None, :],
                     tl.zeros((GP, D), tl.float32).to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
        return
    stop = tl.minimum(ctx, start + per)
    q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=g_mask[:, None], other=0.0)
    if F32:
        q = q.to(tl.float32)
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, D), tl.float32)
    rn = tl.arange(0, BLOCK_N)
    for n0 in range(start, stop, BLOCK_N):
        j = n0 + rn
        n_mask = j < stop
        visible = n_mask[None, :] & (g >= 0)[:, None]
        m_i, l_i, acc = _online_tile(q, k_ptr, v_ptr, ks_ptr, vs_ptr, tables_ptr, b, stride_tb, kvh, j, n_mask, visible,
                                     scale, m_i, l_i, acc, Hkv, D, BS, QUANT, F32)
    if S == 1:
        tl.store(out_ptr + b * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        # partials: part_o [B, H, S, D] (unnormalised), part_ml [B, H, S, 2] (max, sum)
        row = (b * H + heads) * S + sp
        tl.store(part_o_ptr + row[:, None] * D + d[None, :], acc, mask=g_mask[:, None])
        tl.store(part_ml_ptr + row * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_mask)


@triton.jit
def _combine_kernel(out_ptr, part_o_ptr, part_ml_ptr, ctx_ptr, stride_ot, stride_oh,
                    H: tl.constexpr, D: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(ctx_ptr + b)
    per = tl.cdiv(tl.cdiv(ctx, S), BLOCK_N) * BLOCK_N
    s = tl.arange(0, SP)
    d = tl.arange(0, D)
    valid = (s < S) & (s * per < ctx)
    row = (b * H + h) * S + s
    m = tl.load(part_ml_ptr + row * 2, mask=valid, other=float("-inf"))
    l = tl.load(part_ml_ptr + row * 2 + 1, mask=valid, other=0.0)
    m_all = tl.max(m, 0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.where(valid, tl.exp(m - m_all), 0.0)
    o = tl.load(part_o_ptr + row[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
    num = tl.sum(o * w[:, None], 0)
    den = tl.sum(l * w, 0)
    out = num / tl.where(den == 0.0, 1.0, den)
    tl.store(out_ptr + b * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=8)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_splits(batch: int, num_kv_heads: int, width_tokens: int, device: torch.device, block_n: int) -> int:
    """How many slices a decode step cuts each sequence into: enough programs to fill the GPU
    (about 4 per multiprocessor), at most 16, never more than the widest context has tiles.
    A function of the static shapes only (so a captured graph keeps it)."""
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 4
    want = triton.cdiv(4 * sms, max(1, batch * num_kv_heads))
    return max(1, min(16, want, triton.cdiv(max(1, width_tokens), block_n)))


def paged_attention_applies(q, k_cache, v_cache, meta: AttentionMetadata, scale, k_scale=None, v_scale=None) -> bool:
    """Float caches of q's dtype, or int8 caches with scales; head dims that are powers of two
    from 16 to 256; the metadata's tensors on q's device."""
    tensors = [q, k_cache, v_cache, meta.block_tables, meta.context_lens_tensor, meta.query_start_loc_tensor]
    if not runs_here(*tensors):
        return False
    d = q.shape[-1]
    if d & (d - 1) or not 16 <= d <= 256 or q.dtype not in FLOAT_DTYPES or q.stride(-1) != 1:
        return False
    if interpreting() and q.dtype == torch.bfloat16:
        return False  # the interpreter computes bf16 on raw bits
    if k_scale is not None:
        return k_cache.dtype == torch.int8 and v_cache.dtype == torch.int8 and runs_here(k_scale, v_scale, q)
    return k_cache.dtype == q.dtype and v_cache.dtype == q.dtype


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float, k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``ops.paged_attention`` (see the module docstring): ``q [T, H, D]`` -> ``[T, H, D]``."""
    T, H, D = q.shape
    _, BS, Hkv, _ = k_cache.shape
    B = meta.block_tables.shape[0]
    out = torch.empty_like(q)
    if T == 0 or B == 0:
        return out
    quant = k_scale is not None
    f32 = q.dtype == torch.float32 or interpreting()
    ks, vs = (k_scale, v_scale) if quant else (k_cache, v_cache)  # (unused pointers when float)
    tables, ctx, qsl = meta.block_tables, meta.context_lens_tensor, meta.query_start_loc_tensor
    if meta.max_query_len == 1 and T == B:
        G = H // Hkv
        GP = max(16, triton.next_power_of_2(G))
        block_n = 16 if interpreting() else 64
        S = num_splits(B, Hkv, tables.shape[1] * BS, q.device, block_n)
        if S > 1:
            part_o = torch.empty(B, H, S, D, dtype=torch.float32, device=q.device)
            part_ml = torch.empty(B, H, S, 2, dtype=torch.float32, device=q.device)
        else:
            part_o = part_ml = out
        _decode_kernel[(B, Hkv, S)](
            q, k_cache, v_cache, ks, vs, out, part_o, part_ml, tables, ctx, scale,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
            H=H, Hkv=Hkv, D=D, BS=BS, G=G, GP=GP, S=S, BLOCK_N=block_n, QUANT=quant, F32=f32,
            num_warps=4)
        if S > 1:
            _combine_kernel[(B, H)](out, part_o, part_ml, ctx, out.stride(0), out.stride(1),
                                    H=H, D=D, S=S, SP=triton.next_power_of_2(S), BLOCK_N=block_n, num_warps=1)
        return out
    block_m = 16 if interpreting() else (64 if D <= 128 else 32)
    block_n = 16 if interpreting() else (64 if D <= 128 else 32)
    grid = (B, H, triton.cdiv(meta.max_query_len, block_m))
    _prefill_kernel[grid](
        q, k_cache, v_cache, ks, vs, out, tables, qsl, ctx, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
        H=H, Hkv=Hkv, D=D, BS=BS, BLOCK_M=block_m, BLOCK_N=block_n, QUANT=quant, F32=f32,
        num_warps=4, num_stages=2 if not interpreting() else 1)
    return out
