"""The one quantized-weight layout that every quantized kernel reads (issue 11).

A :class:`PackedWeight` stands for a float matrix ``W [N, K]`` (N output channels, K inputs).
Its codes come in groups of ``group_size`` consecutive inputs of one row; each group has a
scale and, optionally, an offset, and the weight a code stands for is

    ``w[n, k] = code[n, k] * scale[n, k // G] + offset[n, k // G]``

(computed with one rounding, as a fused multiply-add, by the kernels; the reference below
rounds twice, which is within one float32 ulp). Three code kinds cover every scheme:

- ``"u4"``: unsigned 4-bit codes 0..15, two a byte (``codes`` uint8 ``[N, K // 2]``). In each
  run of 32 inputs, byte ``j`` holds input ``j`` in its low nibble and input ``j + 16`` in its
  high nibble: GGUF's Q4_0/Q4_1 order. ``group_size`` is a multiple of 32. int4 RTN and AWQ,
  and GGUF Q4_0, Q4_1 and Q4_K, convert into it without loss.
- ``"s8"``: signed 8-bit codes (``codes`` int8 ``[N, K]``); ``group_size`` a multiple of 16, or
  K for per-channel scales. int8 RTN and GGUF Q8_0, Q6_K, Q5_K, Q5_0, Q5_1, Q3_K and Q2_K
  convert into it without loss.
- ``"e4m3"``: fp8 e4m3fn codes (``codes`` float8_e4m3fn ``[N, K]``) with per-channel scales.

Why one layout: one family of kernels (reference, native CPU, Triton) then serves GGUF, RTN
and AWQ alike; the float32 scales and offsets make every GGUF block type's
``d * sub_scale`` products exact, so GGUF blocks are computed on as the file has them.

Scales and offsets are float32, or both float16 where every value is a float16 (the GGUF types
whose block fields are the scale and offset themselves: Q4_0, Q4_1, Q8_0, Q5_0, Q5_1; see
:func:`narrow_scales`). Kernels widen float16 exactly, so both forms compute the same bits; the
float16 form reads fewer bytes (a quarter less for Q4_1 in groups of 32).

``PackedWeight`` is an ``nn.Module`` whose codes, scales and offsets are buffers, so it moves
with its model (``.to(device)``), is counted by ``weight_bytes`` and saves to safetensors.
"""
from __future__ import annotations

import torch
from torch import nn

KINDS = ("u4", "s8", "e4m3")


class WeightsVersion:
    """Counts the replacements of one model's weights: a :class:`PackedWeight`'s codes, scales
    or offsets, a ``Linear``'s or ``RMSNorm``'s weight or bias (set or deleted), or any of them
    moved or cast (``_apply``). The model hands its one instance to each such module
    (:func:`share_version`); what it derives from the weights (the native decoder plan) is
    rebuilt when ``value`` changes. In-place updates keep the tensors and need no signal."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def bump(self) -> None:
        self.value += 1


def weights_changed(module: nn.Module) -> None:
    """Tells ``module``'s model (through its :class:`WeightsVersion`, if it has one) that a
    weight of ``module`` was replaced."""
    version = module.__dict__.get("_weights_version")
    if version is not None:
        version.bump()


def share_version(module: nn.Module, version: WeightsVersion) -> None:
    """Makes ``module`` report its weight changes to ``version`` (and a packed weight held as its
    ``weight``, too)."""
    module.__dict__["_weights_version"] = version
    weight = module.__dict__.get("_modules", {}).get("weight")
    if isinstance(weight, PackedWeight):
        weight.__dict__["_weights_version"] = version


_CODE_DTYPES = {"u4": torch.uint8, "s8": torch.int8, "e4m3": torch.float8_e4m3fn}
SCALE_DTYPES = (torch.float32, torch.float16)
_GROUP_MULTIPLE = {"u4": 32, "s8": 16, "e4m3": 16}


class PackedWeight(nn.Module):
    """A quantized ``[out_features, in_features]`` matrix in fastinfer's group-wise layout."""

    def __init__(self, kind: str, out_features: int, in_features: int, group_size: int,
                 codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None = None) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"PackedWeight kind must be one of {list(KINDS)}, got {kind!r}")
        n, k, g = out_features, in_features, group_size
        if k <= 0 or g <= 0 or k % g:
            raise ValueError(f"PackedWeight group_size {g} must divide in_features {k}")
        code_cols = k // 2 if kind == "u4" else k
        if kind == "u4" and g % 32:
            raise ValueError(f"u4 PackedWeight needs a group_size that is a multiple of 32, got {g}")
        if codes.dtype != _CODE_DTYPES[kind] or tuple(codes.shape) != (n, code_cols):
            raise ValueError(f"{kind} codes must be {_CODE_DTYPES[kind]} [{n}, {code_cols}], got "
                             f"{codes.dtype} {list(codes.shape)}")
        for name, t in (("scales", scales), ("offsets", offsets)):
            if t is not None and (t.dtype not in SCALE_DTYPES or tuple(t.shape) != (n, k // g)):
                raise ValueError(f"{name} must be float32 or float16 [{n}, {k // g}], got {t.dtype} "
                                 f"{list(t.shape)}")
        if offsets is not None and offsets.dtype != scales.dtype:
            raise ValueError(f"offsets must have the scales' dtype {scales.dtype}, got {offsets.dtype}")
        self.kind, self.out_features, self.in_features, self.group_size = kind, n, k, g
        # Kernels may quantize the inputs to int8 per block of 32 for exact int8 dot products
        # (llama.cpp's way; see cpu_native.linear_q). False keeps the inputs in float.
        self.quantize_inputs = True
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("offsets", offsets.contiguous() if offsets is not None else None)

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(codes, scales, offsets)``, looked up once (kernels call this on every step; a
        buffer lookup through ``nn.Module`` costs a microsecond each). Moving the module
        (``.to``) refreshes it."""
        t = self.__dict__.get("_tensors")
        if t is None:
            t = self.__dict__["_tensors"] = (self.codes, self.scales, self.offsets)
        return t

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_tensors", None)
        weights_changed(self)
        return super()._apply(fn, recurse)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in ("codes", "scales", "offsets"):
            self.__dict__.pop("_tensors", None)
            weights_changed(self)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, scales and offsets."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def native_applies(self) -> bool:
        """True when the native CPU kernel's group rule holds (it does not handle K tails)."""
        return self.group_size % _GROUP_MULTIPLE[self.kind] == 0

    def unpacked_codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The codes as one float32 value per weight, ``[N or len(rows), K]``."""
        codes = self.codes if rows is None else self.codes.index_select(0, rows)
        if self.kind == "u4":
            runs = codes.reshape(codes.shape[0], -1, 16)
            codes = torch.cat((runs & 15, runs >> 4), dim=-1).reshape(codes.shape[0], -1)
        return codes.float()

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 matrix (or the rows ``rows`` of it) that the codes stand for."""
        codes = self.unpacked_codes(rows)
        scales = self.scales if rows is None else self.scales.index_select(0, rows)
        n, g = codes.shape[0], self.group_size
        w = codes.reshape(n, -1, g) * scales.float()[..., None]
        if self.offsets is not None:
            offsets = self.offsets if rows is None else self.offsets.index_select(0, rows)
            w = w + offsets.float()[..., None]
        return w.reshape(n, self.in_features)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, shape=({self.out_features}, {self.in_features}), "
                f"group_size={self.group_size}, offsets={self.offsets is not None}")


def concat_rows(parts: list[PackedWeight]) -> PackedWeight:
    """Stacks weights with the same K along N (fused QKV, gate/up). Parts of different kinds
    or group sizes are first brought to a common form without loss (u4 codes widen to s8,
    groups split to the smallest group size)."""
    first = parts[0]
    if any(p.in_features != first.in_features for p in parts):
        raise ValueError("concat_rows: every part needs the same in_features")
    same = all(p.kind == first.kind and p.group_size == first.group_size for p in parts)
    with_offsets = any(p.offsets is not None for p in parts)
    if not same:
        if any(p.kind == "e4m3" for p in parts):
            raise ValueError("concat_rows: cannot mix fp8 and integer parts")
        g = min(p.group_size for p in parts)
        parts = [regroup(p, "s8", g) for p in parts]
    if with_offsets:
        parts = [p if p.offsets is not None else _with_zero_offsets(p) for p in parts]
    if len({p.scales.dtype for p in parts}) > 1:
        parts = [widen_scales(p) for p in parts]
    k = first.in_features
    return PackedWeight(
        parts[0].kind, sum(p.out_features for p in parts), k, parts[0].group_size,
        torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
        torch.cat([p.offsets for p in parts]) if with_offsets else None)


def _with_scales(p: PackedWeight, dtype: torch.dtype) -> PackedWeight:
    return PackedWeight(p.kind, p.out_features, p.in_features, p.group_size, p.codes, p.scales.to(dtype),
                        p.offsets.to(dtype) if p.offsets is not None else None)


def widen_scales(p: PackedWeight) -> PackedWeight:
    """``p`` with float32 scales and offsets (``p`` itself if they are); exact."""
    return p if p.scales.dtype == torch.float32 else _with_scales(p, torch.float32)


def narrow_scales(p: PackedWeight) -> PackedWeight:
    """``p`` with float16 scales and offsets where every one of them is a float16 exactly (so
    the weights are unchanged), else ``p`` itself."""
    if p.scales.dtype == torch.float16:
        return p
    parts = [t for t in (p.scales, p.offsets) if t is not None]
    if not all(torch.equal(t.half().float(), t) for t in parts):  # inf marks overflow: unequal
        return p
    return _with_scales(p, torch.float16)


def _with_zero_offsets(p: PackedWeight) -> PackedWeight:
    return PackedWeight(p.kind, p.out_features, p.in_features, p.group_size, p.codes, p.scales,
                        torch.zeros_like(p.scales))


def regroup(p: PackedWeight, kind: str, group_size: int) -> PackedWeight:
    """The same weights with ``kind`` codes and a smaller ``group_size`` (which must divide
    the current one); exact, since codes, scales and offsets are copied, not recomputed."""
    if p.group_size % group_size:
        raise ValueError(f"regroup: {group_size} does not divide the group size {p.group_size}")
    if kind != p.kind and (p.kind, kind) != ("u4", "s8"):
        raise ValueError(f"regroup: cannot turn {p.kind} codes into {kind}")
    codes = p.unpacked_codes().to(torch.int8) if kind != p.kind else p.codes
    rep = p.group_size // group_size
    scales = p.scales.repeat_interleave(rep, dim=1)
    offsets = p.offsets.repeat_interleave(rep, dim=1) if p.offsets is not None else None
    return PackedWeight(kind, p.out_features, p.in_features, group_size, codes, scales, offsets)


def permute_rows(p: PackedWeight, perm: torch.Tensor) -> PackedWeight:
    """``p`` with its output rows reordered: row ``i`` of the result is row ``perm[i]``."""
    pick = (lambda t: t.index_select(0, perm) if t is not None else None)
    return PackedWeight(p.kind, p.out_features, p.in_features, p.group_size, pick(p.codes),
                        pick(p.scales), pick(p.offsets))


def take_rows(p: PackedWeight, start: int, stop: int) -> PackedWeight:
    """Output rows ``[start, stop)`` of ``p`` (a column-parallel shard); always exact."""
    if not 0 <= start < stop <= p.out_features:
        raise ValueError(f"take_rows: [{start}, {stop}) is not a range of {p.out_features} rows")
    cut = (lambda t: t[start:stop] if t is not None else None)
    return PackedWeight(p.kind, stop - start, p.in_features, p.group_size, cut(p.codes), cut(p.scales),
                        cut(p.offsets))


def take_inputs(p: PackedWeight, start: int, stop: int) -> PackedWeight:
    """Input columns ``[start, stop)`` of ``p`` (a row-parallel shard); exact. Both ends must
    fall on group boundaries (u4 codes also on their runs of 32 inputs), except that per-channel
    scales (one group of all K inputs) split anywhere, the shard keeping one group of its own
    inputs; anything else raises ``ValueError`` naming the split point and the group size."""
    k, g = p.in_features, p.group_size
    if not 0 <= start < stop <= k:
        raise ValueError(f"take_inputs: [{start}, {stop}) is not a range of {k} inputs")
    per_channel = g == k
    need = (32 if p.kind == "u4" else 1) if per_channel else g  # a u4 group is a multiple of 32
    bad = next((x for x in (start, stop) if x % need), None)
    if bad is not None:
        raise ValueError(f"cannot split the inputs of a {p.kind} weight at {bad}: its groups are {g} inputs "
                         f"(the split must fall on a multiple of {need})")
    cols = slice(start // 2, stop // 2) if p.kind == "u4" else slice(start, stop)
    groups = slice(0, 1) if per_channel else slice(start // g, stop // g)
    offsets = p.offsets[:, groups].contiguous() if p.offsets is not None else None
    return PackedWeight(p.kind, p.out_features, stop - start, stop - start if per_channel else g,
                        p.codes[:, cols].contiguous(), p.scales[:, groups].contiguous(), offsets)
