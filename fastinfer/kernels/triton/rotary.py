"""Triton kernel of ``ops.rotary_embedding`` (GPU; checked on the CPU under ``TRITON_INTERPRET=1``).

Rotate-half ("neox") layout, in place: program ``t`` loads token t's position, its ``cos`` and
``sin`` halves from ``cos_sin [max_pos, D]`` once, and rotates all ``H`` query heads and ``Hkv``
key heads of the token as ``[heads, D/2]`` tiles (two contiguous half-rows per head). ``q`` and
``k`` may be views with any token and head strides (q and k are slices of one qkv tensor in the
model); the last dim must be contiguous.

Math, the reference's: ``(x1 * cos - x2 * sin, x2 * cos + x1 * sin)`` in float32 with no fused
multiply-add (``enable_fp_fusion=False``), rounded once to the tensor's dtype: bit-identical to
:func:`fastinfer.ops.reference.rotary_embedding` wherever the products and sums are IEEE.

Bytes moved per call (for achieved GB/s), ``T`` tokens, element size ``e``:
``2 * T * (H + Hkv) * D * e`` (q and k read and written) ``+ T * D * 4`` (cos/sin rows)
``+ T * 8`` (positions).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastinfer.kernels.triton.common import FLOAT_DTYPES, interpreting, num_warps, rounded, runs_here


@triton.jit
def _rotate_heads(x_ptr, stride_h, nh, half, cos, sin, INTERP: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    """Rotates the ``nh`` heads at ``x_ptr`` (one token) in place; ``cos``, ``sin`` ``[1, BD]``."""
    h = tl.arange(0, BH)[:, None]
    j = tl.arange(0, BD)[None, :]
    mask = (h < nh) & (j < half)
    p1 = x_ptr + h * stride_h + j
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, rounded(x1 * cos - x2 * sin, x_ptr, INTERP), mask=mask)
    tl.store(p1 + half, rounded(x2 * cos + x1 * sin, x_ptr, INTERP), mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cs_ptr, H, HKV, half,
                   stride_pos, stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
                   INTERP: tl.constexpr, BH: tl.constexpr, BHK: tl.constexpr, BD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t * stride_pos).to(tl.int64)
    j = tl.arange(0, BD)[None, :]
    jm = j < half
    cos = tl.load(cs_ptr + pos * stride_cs + j, mask=jm, other=0.0).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + half + j, mask=jm, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, H, half, cos, sin, INTERP, BH, BD)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, HKV, half, cos, sin, INTERP, BHK, BD)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates ``q [T, H, D]`` and ``k [T, Hkv, D]`` (float32 / float16 / bfloat16, any token and
    head strides) IN PLACE at ``positions [T]`` (int64 or int32) with ``cos_sin [max_pos, D]``
    (cos half, then sin half; float32); returns ``(q, k)``."""
    t, h, d = q.shape
    hkv = k.shape[1]
    if t > 0:
        bh, bhk, bd = triton.next_power_of_2(h), triton.next_power_of_2(hkv), triton.next_power_of_2(d // 2)
        _rotary_kernel[(t,)](
            positions, q, k, cos_sin, h, hkv, d // 2,
            positions.stride(0), q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
            INTERP=interpreting(), BH=bh, BHK=bhk, BD=bd, num_warps=num_warps(2 * max(bh, bhk) * bd),
            enable_fp_fusion=False)
    return q, k


def rotary_embedding_applies(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor) -> bool:
    """True when :func:`rotary_embedding` takes these inputs: Triton runs here (``runs_here``),
    q ``[T, H, D]`` and k ``[T, Hkv, D]`` float32 / float16 / bfloat16 with contiguous last dims
    and D even, ``positions [T]`` int64 / int32, ``cos_sin [max_pos, D]`` float with a contiguous
    last dim."""
    return (all(isinstance(a, torch.Tensor) for a in (positions, q, k, cos_sin)) and runs_here(positions, q, k, cos_sin)
            and q.dim() == 3 and k.dim() == 3 and positions.dim() == 1 and cos_sin.dim() == 2
            and q.dtype in FLOAT_DTYPES and k.dtype in FLOAT_DTYPES and cos_sin.dtype in FLOAT_DTYPES
            and positions.dtype in (torch.int64, torch.int32)
            and q.shape[0] == k.shape[0] == positions.shape[0] and q.shape[2] == k.shape[2] == cos_sin.shape[1]
            and q.shape[2] % 2 == 0 and q.shape[2] > 0
            and q.stride(2) == 1 and k.stride(2) == 1 and cos_sin.stride(1) == 1)
