"""Triton kernel of ``ops.silu_and_mul`` (GPU; checked on the CPU under ``TRITON_INTERPRET=1``).

``x [..., 2d] -> silu(x[..., :d]) * x[..., d:]`` of ``[..., d]``: program ``(row, j)`` reads
``BLOCK`` gate and ``BLOCK`` up values of one row (contiguous, vectorized loads) and writes
``BLOCK`` outputs; one pass, no atomics. Rows may be strided; the last dim must be contiguous.

Math: ``g / (1 + exp(-g)) * u`` in float32 (IEEE division), rounded once to x's dtype. The
reference rounds ``silu(g)`` to x's dtype before the product, so float16 / bfloat16 results may
differ from it by one ulp (as the native CPU op's do); float32 results differ by exp's few ulp.

Bytes moved per call (for achieved GB/s), ``T`` rows, element size ``e``: ``3 * T * d * e``
(``2d`` read, ``d`` written per row).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastinfer.kernels.triton.common import FLOAT_DTYPES, interpreting, num_warps, rounded, runs_here

_MAX_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_out, INTERP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.div_rn(g, 1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_out + cols, rounded(y, out_ptr, INTERP), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :d]) * x[..., d:]`` for ``x [..., 2d]`` (float32 / float16 / bfloat16) ->
    a new contiguous ``[..., d]`` in x's dtype."""
    two_d = x.shape[-1]
    d = two_d // 2
    x2 = x if x.dim() == 2 else x.reshape(-1, two_d)
    if x2.stride(-1) != 1 and two_d > 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    if out.numel() > 0:
        block = min(triton.next_power_of_2(d), _MAX_BLOCK)
        grid = (x2.shape[0], triton.cdiv(d, block))
        _silu_and_mul_kernel[grid](x2, out, d, x2.stride(0), out.stride(0), INTERP=interpreting(), BLOCK=block,
                                   num_warps=num_warps(block))
    return out.view(*x.shape[:-1], d)


def silu_and_mul_applies(x: torch.Tensor) -> bool:
    """True when :func:`silu_and_mul` takes ``x``: Triton runs here (``runs_here``), x is float32 /
    float16 / bfloat16 with an even, contiguous last dim."""
    return (isinstance(x, torch.Tensor) and runs_here(x) and x.dtype in FLOAT_DTYPES and x.dim() >= 1
            and x.shape[-1] % 2 == 0 and (x.stride(-1) == 1 or x.shape[-1] <= 1))
