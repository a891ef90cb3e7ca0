"""Triton kernel of ``ops.reshape_and_cache`` (GPU; checked on the CPU under ``TRITON_INTERPRET=1``).

Program ``t`` writes token t's keys and values ``[Hkv, D]`` (one ``[Hkv, D]`` tile each: one read
of the token, one write of its slot) into the paged caches ``[num_blocks, block_size, Hkv, D]``
at flat slot ``slot_mapping[t]``; a negative slot skips the token (padding of CUDA-graph batches)
and leaves the cache untouched. ``key``/``value`` may have any token and head strides (slices
of the qkv tensor); their last dim must be contiguous, the caches contiguous.

- Float caches (float32 / float16 / bfloat16): the rows as they are, or cast to the cache's dtype
  (round to nearest even, as ``Tensor.to``).
- int8 caches: per (token, head) row, as :func:`fastinfer.common.kv_format.quantize`, in the same IEEE
  float32 operations: ``scale = amax / 127``, ``code = round_half_even(clamp(x / scale, ±127))``
  (``x / 1`` for a zero row: scale 0, codes 0); codes and scales bit-identical to the reference.
- fp8 (float8_e4m3fn) caches: ``scale = amax / 448``, ``code = e4m3(clamp(x / scale, ±448))``,
  encoded with integer ops (round to nearest even; subnormals and -0 as torch's cast): exact
  everywhere, no fp8 hardware or interpreter support needed; bit-identical to the reference.

Bytes moved per call (for achieved GB/s), ``T`` tokens, element sizes ``e_in`` (key/value) and
``e_c`` (cache): ``2 * T * Hkv * D * (e_in + e_c)`` ``+ 2 * T * Hkv * 4`` (scales, quantized
caches only) ``+ T * 8`` (slots).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastinfer.kernels.triton.common import FLOAT_DTYPES, interpreting, num_warps, rounded, runs_here
from fastinfer.common import kv_format as kv

_KIND_FLOAT, _KIND_INT8, _KIND_FP8 = 0, 1, 2


@triton.jit
def _e4m3_bits(y):
    """float32 ``y`` with ``|y| <= 448`` -> its float8_e4m3fn byte (int32 0..255), rounded to
    nearest even like torch's cast."""
    b = y.to(tl.uint32, bitcast=True)
    sign = ((b >> 24) & 0x80).to(tl.int32)
    a = tl.abs(y)
    # subnormal range (|y| < 2**-6): the byte is |y| / 2**-9 rounded (8 is the smallest normal)
    sub = ((a * 512.0 + 12582912.0) - 12582912.0).to(tl.int32)
    # normal: round float32's 23 mantissa bits to 3 (ties to even), rebias the exponent 127 -> 7
    ab = b & 0x7FFFFFFF
    norm = (((ab + 0x7FFFF + ((ab >> 20) & 1)) >> 20).to(tl.int32)) - (120 << 3)
    return sign | tl.where(a < 0.015625, sub, norm)


@triton.jit
def _write_rows(src_ptr, stride_h, cache_ptr, scale_ptr, slot, ok, HKV, D,
                KIND: tl.constexpr, INTERP: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    h = tl.arange(0, BH)[:, None]
    j = tl.arange(0, BD)[None, :]
    mask = (h < HKV) & (j < D) & ok
    dst = cache_ptr + slot * (HKV * D) + h * D + j
    x = tl.load(src_ptr + h * stride_h + j, mask=mask, other=0.0)
    if KIND == 0:
        if x.dtype == cache_ptr.dtype.element_ty:
            tl.store(dst, x, mask=mask)
        else:
            tl.store(dst, rounded(x.to(tl.float32), cache_ptr, INTERP), mask=mask)
    else:
        xf = x.to(tl.float32)
        if KIND == 1:
            qmax = 127.0
        else:
            qmax = 448.0
        scale = tl.div_rn(tl.max(tl.abs(xf), axis=1), qmax)  # [BH]
        div = tl.where(scale > 0, scale, 1.0)
        y = tl.div_rn(xf, div[:, None])
        y = tl.minimum(tl.maximum(y, -qmax), qmax)
        if KIND == 1:
            code = ((y + 12582912.0) - 12582912.0).to(tl.int8)  # round half to even, |y| <= 127
        else:
            code = _e4m3_bits(y).to(tl.uint8)
        tl.store(dst, code, mask=mask)
        hs = tl.arange(0, BH)
        tl.store(scale_ptr + slot * HKV + hs, scale, mask=(hs < HKV) & ok)


@triton.jit
def _reshape_and_cache_kernel(key_ptr, value_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr, HKV, D,
                              stride_slot, stride_kt, stride_kh, stride_vt, stride_vh,
                              KIND: tl.constexpr, INTERP: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t * stride_slot).to(tl.int64)
    ok = slot >= 0
    _write_rows(key_ptr + t * stride_kt, stride_kh, kc_ptr, ks_ptr, slot, ok, HKV, D, KIND, INTERP, BH, BD)
    _write_rows(value_ptr + t * stride_vt, stride_vh, vc_ptr, vs_ptr, slot, ok, HKV, D, KIND, INTERP, BH, BD)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> None:
    """Writes ``key/value [T, Hkv, D]`` into ``k_cache/v_cache [num_blocks, block_size, Hkv, D]``
    at ``slot_mapping [T]`` (int64 / int32; negative: skipped), as
    :func:`fastinfer.ops.reference.reshape_and_cache` does (quantized per (token, head) into
    int8 / float8_e4m3fn codes and ``k_scale/v_scale [num_blocks, block_size, Hkv]`` float32)."""
    t, hkv, d = key.shape
    if t == 0:
        return
    if kv.is_quantized(k_cache.dtype):
        kind = _KIND_INT8 if k_cache.dtype == torch.int8 else _KIND_FP8
        kc, vc = (k_cache, v_cache) if kind == _KIND_INT8 else (k_cache.view(torch.uint8), v_cache.view(torch.uint8))
        ks, vs = k_scale, v_scale
    else:
        kind, kc, vc = _KIND_FLOAT, k_cache, v_cache
        ks = vs = slot_mapping  # unused
    bh, bd = triton.next_power_of_2(hkv), triton.next_power_of_2(d)
    _reshape_and_cache_kernel[(t,)](
        key, value, kc, vc, ks, vs, slot_mapping, hkv, d,
        slot_mapping.stride(0), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        KIND=kind, INTERP=interpreting(), BH=bh, BD=bd, num_warps=num_warps(bh * bd), enable_fp_fusion=False)


def reshape_and_cache_applies(key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> bool:
    """True when :func:`reshape_and_cache` takes these inputs: Triton runs here (``runs_here``),
    key/value ``[T, Hkv, D]`` float32 / float16 / bfloat16 with contiguous last dims, contiguous
    caches ``[num_blocks, block_size, Hkv, D]`` of one dtype, either float (any of the three:
    a cast) without scales, or int8 / float8_e4m3fn with contiguous float32 scales
    ``[num_blocks, block_size, Hkv]``; ``slot_mapping [T]`` int64 / int32."""
    tensors = [key, value, k_cache, v_cache, slot_mapping]
    if not all(isinstance(a, torch.Tensor) for a in tensors):
        return False
    quantized = kv.is_quantized(k_cache.dtype)
    if quantized:
        if not (isinstance(k_scale, torch.Tensor) and isinstance(v_scale, torch.Tensor)):
            return False
        tensors += [k_scale, v_scale]
        if not all(s.dtype == torch.float32 and s.is_contiguous() and tuple(s.shape) == tuple(k_cache.shape[:3])
                   for s in (k_scale, v_scale)):
            return False
    elif k_scale is not None or v_scale is not None or k_cache.dtype not in FLOAT_DTYPES:
        return False
    return (runs_here(*tensors) and key.dim() == 3 and value.dim() == 3 and k_cache.dim() == 4
            and key.dtype in FLOAT_DTYPES and value.dtype in FLOAT_DTYPES and v_cache.dtype == k_cache.dtype
            and key.shape == value.shape and k_cache.shape == v_cache.shape
            and tuple(k_cache.shape[2:]) == tuple(key.shape[1:])
            and slot_mapping.dim() == 1 and slot_mapping.shape[0] == key.shape[0]
            and slot_mapping.dtype in (torch.int64, torch.int32)
            and key.stride(2) == 1 and value.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous())
