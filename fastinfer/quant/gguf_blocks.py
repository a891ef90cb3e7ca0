"""GGUF quantized blocks -> fastinfer's packed layout, without building the float matrix.

Each supported block type is decoded into integer codes, a float32 scale per group and, where
the type has one, a float32 offset, such that ``code * scale + offset`` is exactly the float
that ``gguf``'s own dequantization gives (tests/test_gguf_blocks.py checks every type, bit for
bit). The sub-block scale products (``d * sc`` of the K-quants) are formed in float32 exactly as
``gguf`` forms them, which is why the layout's scales are float32; where every scale and offset
is a float16 (the types whose fp16 block fields are the scale and offset: Q4_0, Q4_1, Q8_0, Q5_0,
Q5_1), they are kept as float16, as the file has them (:func:`~fastinfer.common.packed.narrow_scales`).

Type       codes  group  offset          Type   codes  group  offset
Q4_0       u4     32     -8 d            Q5_0   s8     32     (codes q - 16)
Q4_1       u4     32     m               Q5_1   s8     32     m
Q4_K       u4     32     -dmin * m       Q5_K   s8     32     -dmin * m
Q8_0       s8     32     -               Q6_K   s8     16     (codes q - 32)
Q3_K       s8     16     (codes in -4..3) Q2_K  s8     16     -dmin * m
"""
from __future__ import annotations

import numpy as np

from fastinfer.common.packed import PackedWeight, narrow_scales
from fastinfer.quant.pack import from_numpy

QK_K = 256


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian fp16 fields ``[nb, 2]`` -> float32 ``[nb, 1]``."""
    return raw.copy().view(np.float16).astype(np.float32).reshape(-1, 1)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """``[nb, 16*c]`` bytes of 32-input runs (low nibbles first, then high) -> ``[nb, 32*c]``."""
    runs = qs.reshape(qs.shape[0], -1, 1, 16)
    return np.concatenate((runs & 15, runs >> 4), axis=2).reshape(qs.shape[0], -1)


def _bits(raw: np.ndarray, count: int) -> np.ndarray:
    """Bit ``e`` of the little-endian bytes ``raw [nb, count/8]`` for e < count -> ``[nb, count]``."""
    return np.unpackbits(raw, axis=1, bitorder="little")[:, :count]


def _q8_0(b):
    return "s8", 32, b[:, 2:].view(np.int8), _f16(b[:, :2]), None


def _q4_0(b):
    d = _f16(b[:, :2])
    return "u4", 32, _nibbles_32(b[:, 2:]), d, -8.0 * d


def _q4_1(b):
    return "u4", 32, _nibbles_32(b[:, 4:]), _f16(b[:, :2]), _f16(b[:, 2:4])


def _q5_low_high(qs: np.ndarray, qh: np.ndarray) -> np.ndarray:
    return _nibbles_32(qs) | (_bits(qh, 32) << 4)


def _q5_0(b):
    q = _q5_low_high(b[:, 6:], b[:, 2:6]).astype(np.int8) - np.int8(16)
    return "s8", 32, q, _f16(b[:, :2]), None


def _q5_1(b):
    q = _q5_low_high(b[:, 8:], b[:, 4:8]).astype(np.int8)
    return "s8", 32, q, _f16(b[:, :2]), _f16(b[:, 2:4])


def _k_scale_min(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins packed in the 12 bytes of a Q4_K/Q5_K super-block."""
    lo, mid, top = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scales = np.concatenate((lo & 63, (top & 15) | ((lo >> 6) << 4)), axis=1)
    mins = np.concatenate((mid & 63, (top >> 4) | ((mid >> 6) << 4)), axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K ``qs [nb, 128]``: each 32 bytes hold 64 inputs, low nibbles first."""
    runs = qs.reshape(qs.shape[0], 4, 1, 32)
    return np.concatenate((runs & 15, runs >> 4), axis=2).reshape(qs.shape[0], QK_K)


def _q4_k(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    return "u4", 32, _k_low_nibbles(b[:, 16:]), d * sc, -(dmin * mn)


def _q5_k(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    high = _bits(b[:, 16:48], 256).reshape(-1, 32, 8).transpose(0, 2, 1).reshape(-1, QK_K)
    q = (_k_low_nibbles(b[:, 48:]) | (high << 4)).astype(np.int8)
    return "s8", 32, q, d * sc, -(dmin * mn)


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """``qs [nb, 64]`` of 2-bit fields: input ``h*128 + s*32 + j`` is bits 2s..2s+1 of byte
    ``h*32 + j``."""
    runs = qs.reshape(qs.shape[0], 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((runs >> shifts) & 3).reshape(qs.shape[0], QK_K)


def _q2_k(b):
    sc, d, dmin = b[:, 0:16], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    scales = d * (sc & 15).astype(np.float32)
    mins = dmin * (sc >> 4).astype(np.float32)
    return "s8", 16, _crumbs(b[:, 16:80]).astype(np.int8), scales, -mins


def _q3_k(b):
    hmask, qs, packed, d = b[:, 0:32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = np.concatenate((packed[:, 0:8] & 15, packed[:, 0:8] >> 4), axis=1)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)
    high = ((packed[:, 8:12].reshape(-1, 1, 4) >> shifts) & 3).reshape(-1, 16)
    sc = ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)
    # bit i of hmask[j] belongs to input i*32 + j; a clear bit subtracts 4
    hbit = _bits(hmask, 256).reshape(-1, 32, 8).transpose(0, 2, 1).reshape(-1, QK_K)
    q = _crumbs(qs).astype(np.int8) - ((1 - hbit) << 2).astype(np.int8)
    return "s8", 16, q, d * sc, None


def _q6_k(b):
    ql, qh, sc, d = b[:, 0:128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
    low = np.concatenate((ql.reshape(-1, 2, 1, 64) & 15, ql.reshape(-1, 2, 1, 64) >> 4), axis=2)
    q = (low.reshape(-1, QK_K) | (_crumbs(qh) << 4)).astype(np.int8) - np.int8(32)
    return "s8", 16, q, d * sc.view(np.int8).astype(np.float32), None


_DECODERS = {
    "Q8_0": (34, 32, _q8_0), "Q4_0": (18, 32, _q4_0), "Q4_1": (20, 32, _q4_1),
    "Q5_0": (22, 32, _q5_0), "Q5_1": (24, 32, _q5_1), "Q2_K": (84, QK_K, _q2_k),
    "Q3_K": (110, QK_K, _q3_k), "Q4_K": (144, QK_K, _q4_k), "Q5_K": (176, QK_K, _q5_k),
    "Q6_K": (210, QK_K, _q6_k),
}
KEPT_TYPES = frozenset(_DECODERS)


def to_packed(type_name: str, raw: np.ndarray, rows: int, cols: int) -> PackedWeight:
    """Converts a GGUF tensor's raw blocks (``raw``: its bytes, ``rows * cols`` weights stored
    row by row) into a :class:`PackedWeight` ``[rows, cols]``."""
    block_bytes, block_elems, decode = _DECODERS[type_name]
    if cols % block_elems:
        raise ValueError(f"{type_name} rows of {cols} weights are not whole {block_elems}-weight blocks")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, block_bytes)
    if blocks.shape[0] != rows * cols // block_elems:
        raise ValueError(f"{type_name} data holds {blocks.shape[0]} blocks, expected {rows * cols // block_elems}")
    kind, group, codes, scales, offsets = decode(blocks)
    per_row = cols // group
    return narrow_scales(from_numpy(kind, codes.reshape(rows, cols), scales.reshape(rows, per_row),
                                    offsets.reshape(rows, per_row) if offsets is not None else None, group))
