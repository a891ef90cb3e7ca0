"""Builds :class:`~fastinfer.common.packed.PackedWeight` objects from unpacked codes: the one
place that knows how codes are packed into the kernels' layout."""
from __future__ import annotations

import numpy as np
import torch

from fastinfer.common.packed import PackedWeight, narrow_scales
from fastinfer.quant.rtn import QuantizedWeight


def pack_codes(kind: str, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
               group_size: int) -> PackedWeight:
    """Packs one code per weight (``codes [N, K]``: 0..15 for u4, -128..127 for s8, fp8 for
    e4m3) with float32 ``scales``/``offsets [N, K // group_size]``."""
    n, k = codes.shape
    if kind == "u4":
        if k % 32:
            raise ValueError(f"u4 packing needs K divisible by 32, got {k}")
        runs = codes.to(torch.uint8).reshape(n, k // 32, 2, 16)
        codes = (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(n, k // 2)
    elif kind == "s8":
        codes = codes.to(torch.int8)
    scales = scales.float().reshape(n, k // group_size)
    offsets = offsets.float().reshape(n, k // group_size) if offsets is not None else None
    return PackedWeight(kind, n, k, group_size, codes, scales, offsets)


def pack(q: QuantizedWeight) -> PackedWeight:
    """The kernels' layout of a round-to-nearest (or AWQ) result from :mod:`fastinfer.quant.rtn`."""
    n, k = q.codes.shape
    if q.scheme == "int4":  # float16 scale and offset values (rtn.int4_groups): kept as float16
        return narrow_scales(pack_codes("u4", q.codes, q.scales, q.offsets, q.group_size))
    kind = {"int8": "s8", "fp8": "e4m3"}[q.scheme]
    packed = pack_codes(kind, q.codes, q.scales, q.offsets, q.group_size or k)
    return narrow_scales(packed) if q.group_size else packed  # grouped int8: float16 values


def from_numpy(kind: str, codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None,
               group_size: int) -> PackedWeight:
    """:func:`pack_codes` for numpy arrays (the GGUF converter's output)."""
    to_t = (lambda a: torch.from_numpy(np.ascontiguousarray(a)) if a is not None else None)
    return pack_codes(kind, to_t(codes), to_t(scales.astype(np.float32)),
                      to_t(offsets.astype(np.float32)) if offsets is not None else None, group_size)
