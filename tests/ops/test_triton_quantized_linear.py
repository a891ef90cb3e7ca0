"""The Triton quantized linear (fastinfer/kernels/triton/quantized_linear.py) against the torch
reference, run by Triton's interpreter on the CPU (``TRITON_INTERPRET=1``), on the issue's odd
shapes: K not a multiple of 64 (32, 96, 80, 100), N of 1, 3 and 49152, M of 1, 7, 33 and 300;
every code kind (u4 with offsets, s8 grouped with offsets and per channel, e4m3 per channel),
with and without bias.

Tolerance: float32 rtol = atol = 1e-5 of the output scale (the same dequantized weights; the
kernel sums in another order). bfloat16 inputs: on a GPU the weights are rounded to bf16 for
the dot, as tensor cores take them (under the interpreter, which cannot run 16-bit dots, the
dot is float32); the output is bf16: rtol 2**-7, atol 2**-7 of the output scale.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated
triton = pytest.importorskip("triton")

from fastinfer.ops import reference  # noqa: E402
from fastinfer.quant.pack import pack  # noqa: E402
from fastinfer.quant.rtn import quantize_fp8, quantize_int4, quantize_int8  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from fastinfer.kernels.triton import quantized_linear as tq  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

SCHEMES = {
    "u4-g32": lambda w: quantize_int4(w, 32),
    "s8-g16": lambda w: quantize_int8(w, 16),
    "s8-channel": lambda w: quantize_int8(w),
    "e4m3-channel": quantize_fp8,
}
SHAPES = [  # (M, K, N)
    (1, 96, 3), (7, 32, 1), (33, 96, 49), (300, 32, 3), (1, 32, 49152),
]


def case(scheme, m, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = pack(SCHEMES[scheme](torch.randn(n, k, generator=g))).to(DEVICE)
    x = torch.randn(m, k, generator=g).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE)
    return x, w, bias


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matches_reference(scheme, m, k, n):
    if n == 49152 and scheme not in ("u4-g32", "s8-channel"):
        pytest.skip("one wide shape per code layout keeps the interpreter quick")
    x, w, bias = case(scheme, m, k, n)
    for b in (None, bias):
        got = tq.quantized_linear(x, w, b)
        want = reference.quantized_linear(x, w, b)
        assert got.shape == (m, n) and got.dtype == x.dtype
        scale = float(want.abs().max()) + 1.0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("scheme", ["s8-channel", "e4m3-channel"])
def test_k_tails(scheme):
    """Per-channel codes with K = 80 and 100: the last 16-wide step is partly masked."""
    for k in (80, 100):
        x, w, bias = case(scheme, 7, k, 5, seed=k)
        torch.testing.assert_close(tq.quantized_linear(x, w, bias), reference.quantized_linear(x, w, bias),
                                   rtol=1e-5, atol=1e-4)


def test_bfloat16_inputs_and_leading_dims():
    x, w, bias = case("u4-g32", 12, 64, 40)
    xb = x.to(torch.bfloat16).view(3, 4, 64)
    got = tq.quantized_linear(xb, w, bias)
    assert got.shape == (3, 4, 40) and got.dtype == torch.bfloat16
    want = reference.quantized_linear(xb.float(), w, bias)
    scale = float(want.abs().max())
    torch.testing.assert_close(got.float(), want.view(3, 4, 40), rtol=2.0**-7, atol=2.0**-7 * scale)


def test_every_e4m3_code_decodes_exactly():
    """All 254 finite e4m3 codes (normals and subnormals, both signs) through the kernel."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # drop the two NaN codes
    n = codes.numel()
    from fastinfer.common.packed import PackedWeight

    w = PackedWeight("e4m3", n, 16, 16, codes.view(torch.float8_e4m3fn).repeat_interleave(16).view(n, 16).contiguous(),
                     torch.ones(n, 1)).to(DEVICE)
    x = torch.zeros(1, 16, device=DEVICE)
    x[0, 0] = 1.0
    got = tq.quantized_linear(x, w)[0]
    assert torch.equal(got.cpu(), codes.view(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("scheme", ["u4-g32", "s8-g16", "s8-channel"])
def test_float16_scales_give_the_float32_result(scheme):
    """Scales and offsets that are float16 values, held as float16 (GGUF's Q4_1 / Q8_0 form), give
    the same outputs as the same values held as float32: the kernel widens them exactly."""
    from fastinfer.common.packed import PackedWeight, narrow_scales
    x, w, bias = case(scheme, 7, 96, 49)
    w32 = PackedWeight(w.kind, w.out_features, w.in_features, w.group_size, w.codes, w.scales.half().float(),
                       w.offsets.half().float() if w.offsets is not None else None)
    w16 = narrow_scales(w32)
    assert w16.scales.dtype == torch.float16
    assert torch.equal(tq.quantized_linear(x, w16, bias), tq.quantized_linear(x, w32, bias))
