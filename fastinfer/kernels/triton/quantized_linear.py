"""Triton kernels of ``ops.quantized_linear`` (GPU; checked on the CPU under ``TRITON_INTERPRET=1``).

``y [M, N] = x [M, K] @ dequantize(W).T + bias`` for a :class:`~fastinfer.common.packed.PackedWeight`
``W``. The weights are dequantized in registers, tile by tile, inside the GEMM/GEMV (one
kernel for every M: a decode step's GEMV is the M <= 16 case of the same tiles); the float
matrix is never built in memory.

- ``u4``: each run of 32 inputs is 16 bytes of codes, input ``j`` in the low nibble of byte
  ``j`` and input ``j + 16`` in its high nibble; the tile multiplies the low halves and the
  high halves as two 16-wide dots. The run lies in one group (groups are multiples of 32).
- ``s8`` / ``e4m3``: one code per byte, groups of any size (per channel included): each
  element's scale is gathered by its group index. e4m3 bytes are decoded with integer ops
  into float32 bits (exact, no fp8 hardware needed).

Math: ``w = code * scale + offset`` in float32; float32 inputs are multiplied in IEEE float32
(``input_precision="ieee"``), float16 / bfloat16 inputs with the weights rounded to their
dtype (the tensor cores' way; under the interpreter, which cannot run 16-bit dots, in float32);
accumulation in float32, output in x's dtype.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastinfer.common.packed import PackedWeight

_KIND = {"u4": 0, "s8": 1, "e4m3": 2}


@triton.jit
def _e4m3_to_f32(b):
    """fp8 e4m3fn bytes (int32 0..255) -> float32, exactly (NaN codes are not expected)."""
    sign = (b >> 7) & 1
    exp = (b >> 3) & 15
    mant = b & 7
    normal = ((sign << 31) | ((exp + 120) << 23) | (mant << 20)).to(tl.float32, bitcast=True)
    sub = mant.to(tl.float32) * 0.001953125  # mant * 2**-9
    sub = tl.where(sign == 1, -sub, sub)
    return tl.where(exp == 0, sub, normal)


@triton.jit
def _dot(a, w, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a.to(tl.float32), tl.trans(w), input_precision="ieee")
    return tl.dot(a, tl.trans(w).to(a.dtype))


@triton.jit
def _qlinear_kernel(x_ptr, codes_ptr, scales_ptr, offsets_ptr, bias_ptr, y_ptr, M, N, K, G,
                    stride_xm, stride_cn, stride_sn, stride_ym,
                    KIND: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mm, mn = rm < M, rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if KIND == 0:  # u4: runs of 32 inputs, 16 bytes each
        j = tl.arange(0, 16)
        for k0 in range(0, K, 32):
            xl = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + j)[None, :], mask=mm[:, None], other=0.0)
            xh = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + 16 + j)[None, :], mask=mm[:, None], other=0.0)
            byte = tl.load(codes_ptr + rn[:, None] * stride_cn + (k0 // 2 + j)[None, :], mask=mn[:, None],
                           other=0).to(tl.int32)
            s = tl.load(scales_ptr + rn * stride_sn + k0 // G, mask=mn, other=0.0).to(tl.float32)[:, None]
            lo = (byte & 15).to(tl.float32) * s
            hi = ((byte >> 4) & 15).to(tl.float32) * s
            if HAS_OFFSET:
                o = tl.load(offsets_ptr + rn * stride_sn + k0 // G, mask=mn, other=0.0).to(tl.float32)[:, None]
                lo += o
                hi += o
            acc += _dot(xl, lo, IEEE)
            acc += _dot(xh, hi, IEEE)
    else:  # s8 / e4m3: 16 inputs a step, each with its own group's scale
        kk = tl.arange(0, 16)
        for k0 in range(0, K, 16):
            ks = k0 + kk
            mk = ks < K
            xt = tl.load(x_ptr + rm[:, None] * stride_xm + ks[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
            wmask = mn[:, None] & mk[None, :]
            if KIND == 1:
                code = tl.load(codes_ptr + rn[:, None] * stride_cn + ks[None, :], mask=wmask, other=0).to(tl.float32)
            else:
                raw = tl.load(codes_ptr + rn[:, None] * stride_cn + ks[None, :], mask=wmask, other=0)
                code = _e4m3_to_f32(raw.to(tl.int32) & 255)
            grp = rn[:, None] * stride_sn + (ks // G)[None, :]
            w = code * tl.load(scales_ptr + grp, mask=wmask, other=0.0).to(tl.float32)
            if HAS_OFFSET:
                w += tl.load(offsets_ptr + grp, mask=wmask, other=0.0).to(tl.float32)
            acc += _dot(xt, w, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


def quantized_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ dequantize(weight).T + bias`` -> ``[..., N]`` in x's dtype (float32,
    float16 or bfloat16), computed by :func:`_qlinear_kernel`."""
    lead, k = x.shape[:-1], x.shape[-1]
    if k != weight.in_features:
        raise ValueError(f"quantized_linear: x has {k} inputs, the weight {weight.in_features}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], weight.out_features
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    codes = weight.codes.view(torch.uint8) if weight.kind == "e4m3" else weight.codes
    bm = 16 if m <= 16 else 32
    bn = 128 if n >= 4096 else 64  # wide outputs (an LM head): fewer, larger column tiles
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    if m > 0:
        _qlinear_kernel[grid](
            x2, codes, weight.scales, weight.offsets if weight.offsets is not None else weight.scales,
            bias if bias is not None else weight.scales, y, m, n, k, weight.group_size,
            x2.stride(0), codes.stride(0), weight.scales.stride(0), y.stride(0),
            KIND=_KIND[weight.kind], HAS_OFFSET=weight.offsets is not None, HAS_BIAS=bias is not None,
            IEEE=x.dtype == torch.float32 or _interpreting(), BM=bm, BN=bn)
    return y.view(*lead, n)


def _interpreting() -> bool:
    """Under ``TRITON_INTERPRET=1`` 16-bit dots are not emulated correctly (Triton 3.x), so
    16-bit inputs are upcast and multiplied in float32 there."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def applies(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> bool:
    """True on a CUDA device for float32 / float16 / bfloat16 inputs and weights on that device."""
    return (x.is_cuda and weight.codes.device == x.device
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16))
