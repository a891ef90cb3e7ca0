"""The paged KV cache's element formats: float (the model's dtype) or quantized (issue 11).

A quantized cache stores, for every (token, kv head), ``head_dim`` codes and one float32
scale, in a second tensor beside the codes (``[num_blocks, block_size, num_kv_heads]``):

- ``"int8"``: symmetric int8, ``scale = max|x| / 127``, ``code = round(x / scale)`` (ties to
  even), ``x ≈ code * scale``; the error of an element is at most ``scale / 2``.
- ``"fp8"``: fp8 e4m3fn, ``scale = max|x| / 448`` (e4m3's largest finite value),
  ``code = e4m3(x / scale)`` (round to nearest even), ``x ≈ float(code) * scale``; relative
  error at most 2**-4 for normal codes.

A zero row gets scale 0 and codes 0. Every backend (reference, native CPU) quantizes with
these exact float32 operations and dequantizes as ``float(code) * scale`` (one rounding), so
what one backend writes another reads identically.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

KV_CACHE_DTYPES = ("auto", "int8", "fp8")
"""Accepted ``kv_cache_dtype`` values; ``"fp8_e4m3"`` is accepted as an alias of ``"fp8"``."""
KV_ALIASES = {"fp8_e4m3": "fp8"}
_CODE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
SCALE_DTYPE = torch.float32


class CacheLayer(NamedTuple):
    """One layer's cache: ``k``, ``v`` ``[num_blocks, block_size, Hkv, D]`` (the model's dtype,
    or int8 / float8_e4m3fn codes) and, for a quantized cache, ``k_scale``, ``v_scale``
    ``[num_blocks, block_size, Hkv]`` float32 (None otherwise)."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


def code_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache tensors' element type for a ``kv_cache_dtype`` setting."""
    name = KV_ALIASES.get(kv_cache_dtype, kv_cache_dtype)
    return model_dtype if name == "auto" else _CODE_DTYPES[name]


def is_quantized(dtype: torch.dtype) -> bool:
    """True for the cache element types that carry a scale per (token, head)."""
    return dtype in _QMAX


def bytes_per_token_head(head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token's keys (or values) of one kv head take: codes plus the scale."""
    elem = torch.empty((), dtype=dtype).element_size()
    return head_dim * elem + (torch.empty((), dtype=SCALE_DTYPE).element_size() if is_quantized(dtype) else 0)


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` -> ``(codes [..., D] of dtype, scales [...] float32)``, per row of D."""
    qmax = _QMAX[dtype]
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    # Divided by a tensor: torch divides a CUDA tensor by a Python number as a multiplication by
    # its float32 reciprocal, which is sometimes one ulp off the exact quotient.
    scale = amax / torch.full_like(amax, qmax)
    div = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    y = (xf / div).clamp_(-qmax, qmax)
    codes = y.round_().to(dtype) if dtype == torch.int8 else y.to(dtype)
    return codes, scale


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``codes [..., D]``, ``scales [...]`` -> float32 ``[..., D]`` (``float(code) * scale``)."""
    return codes.float() * scales.unsqueeze(-1)
