"""Round-to-nearest quantization of a weight matrix ``[N, K]`` (N output channels, K inputs):
the reference math of the int8, int4 and fp8 schemes (issue 11).

Codes are returned unpacked (one code per element, in an integer or fp8 tensor); how kernels
pack them (two int4 codes a byte, GGUF-style blocks) is the layout's concern, not this one's.

- int8: symmetric per output channel, ``w ≈ scale[n] * code``, code in [-127, 127]; per group
  (the int4 scheme's embedding and LM head), the scale is a float16 value, as GGUF's Q8_0
  stores it.
- int4: per group of ``group_size`` inputs, with a scale and an offset (as GGUF's Q4_1),
  ``w ≈ scale[n, g] * code + offset[n, g]``, code in [0, 15]. Like Q4_1 (and GPTQ / AWQ
  checkpoints), the scale and the offset are float16 values (held in float32 here; the packed
  weight keeps them as float16, 2 bytes each instead of 4), and the codes are rounded against
  that grid.
- fp8: e4m3 per output channel, ``w ≈ scale[n] * float(code)``, the channel's largest
  magnitude mapped to 448 (e4m3's largest finite value).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastinfer.errors import InvalidArgumentError
from fastinfer.validation import fail

GROUP_SIZES = (32, 64, 128)
FP8_MAX = 448.0


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """Codes and the float32 parameters that map them back: ``scales``/``offsets`` are
    ``[N]`` (per channel) or ``[N, K // group_size]`` (per group); ``offsets`` is None for
    symmetric schemes."""

    scheme: str
    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    group_size: int | None


def check_group_size(group_size: object) -> int | str:
    """``quant_group_size``: 32, 64, 128 or ``"auto"``."""
    valid = group_size == "auto" or (type(group_size) is int and group_size in GROUP_SIZES)
    if not valid:
        fail("quant_group_size", f"one of {list(GROUP_SIZES)} or 'auto'", group_size,
             wrong_type=not isinstance(group_size, (int, str)) or isinstance(group_size, bool))
    return group_size


def resolve_group_size(group_size: int | str, in_features: int) -> int:
    """32, 64 or 128 (which must divide ``in_features``), or ``"auto"``: the largest of those
    that divides it."""
    group_size = check_group_size(group_size)
    if group_size == "auto":
        size = next((g for g in reversed(GROUP_SIZES) if in_features % g == 0), None)
        if size is None:
            raise InvalidArgumentError(f"quant_group_size='auto' needs an input dimension divisible by one of "
                                       f"{list(GROUP_SIZES)}, got {in_features}", "quant_group_size")
        return size
    if in_features % group_size:
        raise InvalidArgumentError(f"quant_group_size {group_size} does not divide the input dimension "
                                   f"{in_features}; use one that does, or 'auto'", "quant_group_size")
    return group_size


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    """Symmetric int8 per output channel, or per group of ``group_size`` inputs when given
    (a zero channel or group gets scale 1 and codes 0)."""
    n, k = w.shape
    g = group_size or k
    groups = w.float().reshape(n, k // g, g)
    scales = groups.abs().amax(dim=2) / 127.0
    if group_size is not None:
        scales = _float16_values(scales)
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(groups / scales[..., None]).clamp_(-127, 127).to(torch.int8).reshape(n, k)
    if group_size is None:
        return QuantizedWeight("int8", codes, scales[:, 0], None, None)
    return QuantizedWeight("int8", codes, scales, None, g)


def quantize_int4(w: torch.Tensor, group_size: int | str = 32) -> QuantizedWeight:
    """Group-wise int4 with a scale and an offset per group of ``group_size`` inputs."""
    n, k = w.shape
    g = resolve_group_size(group_size, k)
    codes, safe, lo = int4_groups(w.float().reshape(n, k // g, g))
    return QuantizedWeight("int4", codes.reshape(n, k).to(torch.uint8), safe, lo, g)


def int4_groups(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4 with a scale and an offset per group, for float32 ``groups [..., G]``: returns
    ``(codes [..., G] as float 0..15, scales [...], offsets [...])``, the scales and offsets
    rounded to float16 values (kept in float32 where beyond float16's range)."""
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales, lo = _float16_values((hi - lo) / 15.0), _float16_values(lo)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # a constant group: codes 0
    codes = torch.round((groups - lo[..., None]) / safe[..., None]).clamp_(0, 15)
    return codes, safe, lo


def _float16_values(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to the nearest float16 values, elements beyond float16's range kept."""
    r = t.half().float()
    return torch.where(torch.isfinite(r), r, t)


def fake_int4_groups(groups: torch.Tensor) -> torch.Tensor:
    """``groups [..., G]`` rounded to int4 (:func:`int4_groups`) and back to float32."""
    codes, scales, offsets = int4_groups(groups)
    return codes * scales[..., None] + offsets[..., None]


def quantize_fp8(w: torch.Tensor) -> QuantizedWeight:
    """e4m3 per output channel, each channel's largest magnitude mapped to 448."""
    w = w.float()
    scales = w.abs().amax(dim=1) / FP8_MAX
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = (w / scales[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return QuantizedWeight("fp8", codes, scales, None, None)


def dequantize(q: QuantizedWeight) -> torch.Tensor:
    """The float32 matrix ``[N, K]`` that ``q`` stands for."""
    codes = q.codes.float()
    if q.group_size is None:
        return codes * q.scales[:, None]
    n, k = codes.shape
    groups = codes.reshape(n, k // q.group_size, q.group_size) * q.scales[..., None]
    if q.offsets is not None:
        groups = groups + q.offsets[..., None]
    return groups.reshape(n, k)


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4, "fp8": quantize_fp8}
