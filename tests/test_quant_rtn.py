"""Round-to-nearest quantization (the reference math of int8, int4 and fp8 weights): round
trips within each scheme's error bound, on odd shapes, constant and zero channels."""
from __future__ import annotations

import pytest
import torch

from fastinfer import InvalidArgumentError
from fastinfer.quant.pack import pack
from fastinfer.quant.rtn import (FP8_MAX, dequantize, quantize_fp8, quantize_int4, quantize_int8,
                                 resolve_group_size)

SHAPES = [(1, 64), (3, 96), (17, 576), (33, 1536)]


def weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, : k // 2] *= 20  # one channel with outliers, as real weights have
    return w


@pytest.mark.parametrize("n,k", SHAPES)
def test_int8_round_trip_within_half_a_step(n, k):
    w = weights(n, k)
    q = quantize_int8(w)
    assert q.codes.dtype == torch.int8 and q.codes.abs().max() <= 127 and q.scales.shape == (n,)
    err = (dequantize(q) - w).abs()
    assert (err <= q.scales[:, None] / 2 * (1 + 1e-5)).all()
    assert (q.codes.abs().amax(dim=1) == 127).all()  # each channel's largest weight uses the full range


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("group", [32, 64, "auto"])
def test_int4_round_trip_within_half_a_step_per_group(n, k, group):
    if group == 64 and k % 64:
        pytest.skip("group 64 does not divide this K")
    w = weights(n, k)
    q = quantize_int4(w, group)
    g = resolve_group_size(group, k)
    assert q.group_size == g and q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15
    assert q.scales.shape == q.offsets.shape == (n, k // g)
    # scale and offset are float16 values (as Q4_1 stores them): half a step, plus what rounding
    # them moved the grid's ends (2**-11 relative), plus float32 rounding
    assert torch.equal(q.scales.half().float(), q.scales) and torch.equal(q.offsets.half().float(), q.offsets)
    err = (dequantize(q) - w).abs().reshape(n, k // g, g)
    moved = 2.0**-11 * (q.offsets.abs() + 15 * q.scales)
    assert (err <= (q.scales / 2 + moved)[..., None] + 1e-6).all()
    assert pack(q).scales.dtype == torch.float16


def test_int4_represents_a_grid_of_16_levels_exactly():
    # a group that already lies on a 16-level grid of float16 step and base (as a Q4_1 block
    # spanning codes 0..15) is exact
    step, base = torch.tensor(0.01).half().float(), torch.tensor(-0.07).half().float()
    levels = torch.arange(16, dtype=torch.float32) * step + base
    w = levels[torch.randperm(16, generator=torch.Generator().manual_seed(1))].repeat(2).reshape(1, 32)
    torch.testing.assert_close(dequantize(quantize_int4(w, 32)), w, rtol=0, atol=1e-7)


@pytest.mark.parametrize("n,k", SHAPES)
def test_fp8_round_trip_within_e4m3_precision(n, k):
    w = weights(n, k)
    q = quantize_fp8(w)
    assert q.codes.dtype == torch.float8_e4m3fn
    assert torch.allclose(q.codes.float().abs().amax(dim=1), torch.full((n,), FP8_MAX))
    # 3 mantissa bits: relative error <= 2**-4 for normal values; subnormal steps are 2**-9
    bound = torch.maximum(w.abs() * 2**-4, torch.full_like(w, 2**-10) * q.scales[:, None])
    assert ((dequantize(q) - w).abs() <= bound * (1 + 1e-5)).all()


@pytest.mark.parametrize("quantize", [quantize_int8, quantize_fp8, lambda w: quantize_int4(w, 32)])
def test_zero_and_constant_channels_come_back_exactly(quantize):
    w = torch.zeros(3, 64)
    w[1] = 0.25
    torch.testing.assert_close(dequantize(quantize(w)), w, rtol=0, atol=1e-7)


def test_group_size_rules():
    assert resolve_group_size("auto", 576) == 64  # the default model's hidden size: 128 does not divide it
    assert resolve_group_size("auto", 1536) == 128
    assert resolve_group_size(32, 96) == 32
    with pytest.raises(InvalidArgumentError, match="quant_group_size 128 does not divide the input dimension 576"):
        resolve_group_size(128, 576)
    with pytest.raises(InvalidArgumentError, match=r"quant_group_size='auto' needs an input dimension divisible"):
        resolve_group_size("auto", 100)
    for bad in (16, 32.0, True, "64"):
        with pytest.raises(InvalidArgumentError, match=r"quant_group_size must be one of \[32, 64, 128\] or 'auto'"):
            resolve_group_size(bad, 576)


def test_grouped_int8_scales_are_float16_values_like_q8_0():
    """Per group (the int4 scheme's embedding and LM head) the scale is a float16 value, as GGUF's
    Q8_0 holds it, and the packed weight keeps it as float16; per channel it stays float32."""
    w = weights(8, 64)
    q = quantize_int8(w, 32)
    assert torch.equal(q.scales.half().float(), q.scales)
    err = (dequantize(q) - w).abs().reshape(8, 2, 32)
    # half a step, plus what rounding the scale moved the largest code (127 * 2**-11 relative)
    assert (err <= (q.scales / 2 + 127 * 2.0**-11 * q.scales)[..., None] * (1 + 1e-5)).all()
    assert pack(q).scales.dtype == torch.float16 and pack(quantize_int8(w)).scales.dtype == torch.float32
