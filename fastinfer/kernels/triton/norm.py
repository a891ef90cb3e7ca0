"""Triton kernels of ``ops.rms_norm`` and ``ops.add_rms_norm`` (GPU; checked on the CPU under
``TRITON_INTERPRET=1``).

One program per row, the whole row in registers (``BLOCK = next_power_of_2(hidden)``): one
read of each input and one write of each output, no second pass. Rows may be strided (``x[:, :h]``
of a wider tensor); the last dim must be contiguous.

Math, in the reference's order (``ops/reference.py``): ``r = x + residual`` rounded to r's dtype
(add_rms_norm only; the norm is taken of the rounded ``r``), then in float32
``n = r * (1 / sqrt(sum(r * r) / hidden + eps))`` (IEEE division and square root), ``n``
rounded to x's dtype, ``out = weight * n`` rounded to the output dtype (``weight`` and ``x``'s
promoted dtype). float32 results differ from the reference only by the summation order of the
squares (~1e-7 relative); 16-bit results by at most one ulp.

Bytes moved per call (for achieved GB/s), ``T`` rows of ``h``, element sizes ``e``:
rms_norm ``T*h*(e_x + e_out) + h*e_w``; add_rms_norm ``T*h*(e_x + e_res + e_r + e_out) + h*e_w``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastinfer.kernels.triton.common import FLOAT_DTYPES, interpreting, num_warps, rounded, runs_here

MAX_HIDDEN = 32768
"""Widest row one program holds in registers (16 warps: 64 float32 values a thread)."""


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, r_ptr, out_ptr, H, h_float, eps,
                     stride_x, stride_res, stride_w, stride_r, stride_out,
                     HAS_RES: tl.constexpr, INTERP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        res = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        r = rounded(x + res, r_ptr, INTERP)
        tl.store(r_ptr + row * stride_r + cols, r, mask=mask)
        x = r.to(tl.float32)
    ms = tl.div_rn(tl.sum(x * x, axis=0), h_float)
    inv = tl.div_rn(1.0, tl.sqrt_rn(ms + eps))
    if HAS_RES:  # the norm's input is r, rounded to r's dtype
        n = rounded(x * inv, r_ptr, INTERP).to(tl.float32)
    else:
        n = rounded(x * inv, x_ptr, INTERP).to(tl.float32)
    w = tl.load(w_ptr + cols * stride_w, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, rounded(w * n, out_ptr, INTERP), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as 2-D rows with a contiguous last dim (a view where possible)."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] <= 1 else x2.contiguous()


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    h = x.shape[-1]
    x2 = _rows(x)
    r2 = out = None
    if residual is not None:
        res2 = _rows(residual)
        r_dtype = torch.promote_types(x.dtype, residual.dtype)
        r2 = torch.empty(x2.shape, dtype=r_dtype, device=x.device)
        out_dtype = torch.promote_types(weight.dtype, r_dtype)
    else:
        res2 = x2
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    t = x2.shape[0]
    if t > 0 and h > 0:
        block = triton.next_power_of_2(h)
        _rms_norm_kernel[(t,)](
            x2, res2, weight, r2 if r2 is not None else out, out, h, float(h), float(eps),
            x2.stride(0), res2.stride(0), weight.stride(0), out.stride(0) if r2 is None else r2.stride(0),
            out.stride(0), HAS_RES=residual is not None, INTERP=interpreting(), BLOCK=block,
            num_warps=num_warps(block), enable_fp_fusion=False)
    return out.view(x.shape), (r2.view(x.shape) if r2 is not None else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row of ``x [..., h]`` (float32 / float16 / bfloat16, rows may be strided)
    with ``weight [h]``, as :func:`fastinfer.ops.reference.rms_norm`; a new contiguous tensor in
    the promoted dtype of ``weight`` and ``x``."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``r = x + residual`` (rounded to their dtype), then ``(rms_norm(r, weight, eps), r)``, in one
    kernel: as :func:`fastinfer.ops.reference.add_rms_norm`, both outputs new tensors."""
    return _launch(x, residual, weight, eps)


def rms_norm_applies(x: torch.Tensor, weight: torch.Tensor, eps: float) -> bool:
    """True when :func:`rms_norm` takes these inputs: Triton runs here (``runs_here``), x and
    weight float32 / float16 / bfloat16, x's last dim contiguous and at most ``MAX_HIDDEN``,
    weight ``[h]``."""
    return (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and runs_here(x, weight)
            and x.dtype in FLOAT_DTYPES and weight.dtype in FLOAT_DTYPES and x.dim() >= 1
            and 0 < x.shape[-1] <= MAX_HIDDEN and tuple(weight.shape) == (x.shape[-1],)
            and (x.stride(-1) == 1 or x.shape[-1] == 1))


def add_rms_norm_applies(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> bool:
    """:func:`rms_norm_applies`, and ``residual`` of x's shape, float, on the same device, with a
    contiguous last dim."""
    return (isinstance(residual, torch.Tensor) and rms_norm_applies(x, weight, eps) and runs_here(x, residual)
            and residual.dtype in FLOAT_DTYPES and residual.shape == x.shape
            and (residual.stride(-1) == 1 or x.shape[-1] == 1))
