"""The quantized linear op: every backend against the pure-torch reference on odd shapes (the
native kernel in both its modes: weights dequantized in registers, and inputs quantized to int8
per block of 32 for exact int8 dot products), the native kernel's SIMD paths bit for bit, batch
invariance, fp8 decoding and error messages."""
from __future__ import annotations

import pytest
import torch

from fastinfer import ops
from fastinfer.ops import reference
from fastinfer.ops.backends import cpu_native
from fastinfer.common.packed import PackedWeight, concat_rows, narrow_scales, regroup, widen_scales
from fastinfer.quant.pack import pack, pack_codes
from fastinfer.quant.rtn import quantize_fp8, quantize_int4, quantize_int8

from .native_helpers import isa_cap, threads

EPS32 = 2.0**-24
native = pytest.mark.skipif(not cpu_native.available(), reason="fastinfer._C_cpu is not built")
# (kind, group size (None = per channel), offsets); s8 per channel without offsets is int8 RTN's
# layout, which the native kernel computes with its own (per-channel) tiles
LAYOUTS = [("u4", 32, True), ("u4", 64, True), ("s8", 16, True), ("s8", None, True), ("s8", None, False),
           ("e4m3", None, False)]


def random_packed(kind: str, n: int, k: int, group: int | None, seed: int, offsets: bool = True) -> PackedWeight:
    """Random codes over their whole range, random scales (and offsets for integer kinds)."""
    g = torch.Generator().manual_seed(seed)
    group = group or k
    if kind == "u4":
        codes = torch.randint(0, 16, (n, k), generator=g)
    elif kind == "s8":
        codes = torch.randint(-128, 128, (n, k), generator=g)
    else:
        codes = (torch.randn(n, k, generator=g) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)
        offsets = False
    scales = torch.rand(n, k // group, generator=g) * 0.02 + 1e-3
    offs = torch.randn(n, k // group, generator=g) * 0.05 if offsets else None
    return pack_codes(kind, codes, scales, offs, group)


def scale_forms(w: PackedWeight) -> tuple[PackedWeight, PackedWeight]:
    """``w`` with its scales and offsets rounded to float16 values: as float32, and as float16."""
    w32 = PackedWeight(w.kind, w.out_features, w.in_features, w.group_size, w.codes, w.scales.half().float(),
                       w.offsets.half().float() if w.offsets is not None else None)
    w16 = narrow_scales(w32)
    assert w16.scales.dtype == torch.float16 and w16.nbytes < w32.nbytes
    return w32, w16


def error_bound(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """Each weight is one fma (within an ulp of |code*scale| + |offset|), then the float32
    linear's order: K/16 FMAs per lane, 4 tree adds and the bias add."""
    codes = w.unpacked_codes().double()
    n, k, gs = codes.shape[0], w.in_features, w.group_size
    mag = (codes.reshape(n, -1, gs).abs() * w.scales.double()[..., None])
    if w.offsets is not None:
        mag = mag + w.offsets.double().abs()[..., None]
    absdot = x.abs().double() @ mag.reshape(n, k).T
    return ((k + 15) // 16 + 8) * EPS32 * absdot * 1.01 + 1e-30


def input_quantization_bound(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """With inputs quantized per block of 32 (step dx = max|x| / 127, rounding error <= dx / 2
    per input), plus float32 rounding: sum_k |w[n, k]| * dx(k) / 2, and :func:`error_bound`
    over inputs up to |x| + dx / 2."""
    m, k = x.shape
    dx = (x.abs().double().reshape(m, k // 32, 32).amax(-1) / 127).repeat_interleave(32, dim=1)
    wabs = dequantized64(w).abs()
    return (dx / 2) @ wabs.T * 1.001 + error_bound(x.abs() + dx.float(), w) * 2


def dequantized64(w: PackedWeight) -> torch.Tensor:
    codes = w.unpacked_codes().double()
    n, gs = codes.shape[0], w.group_size
    wd = codes.reshape(n, -1, gs) * w.scales.double()[..., None]
    if w.offsets is not None:
        wd = wd + w.offsets.double()[..., None]
    return wd.reshape(n, -1)


def native_modes(x: torch.Tensor, w: PackedWeight) -> list[bool]:
    """The native kernel's modes that apply: float always, int8 inputs for integer codes on whole blocks."""
    return [False] + ([True] if w.kind != "e4m3" and x.shape[-1] % 32 == 0 else [])


def float64_reference(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    codes = w.unpacked_codes().double()
    n, gs = codes.shape[0], w.group_size
    wd = codes.reshape(n, -1, gs) * w.scales.double()[..., None]
    if w.offsets is not None:
        wd = wd + w.offsets.double()[..., None]
    return x.double() @ wd.reshape(n, -1).T


def test_reference_is_registered_and_native_when_built():
    backends = [i.backend for i in ops.implementations("quantized_linear")]
    assert backends[-1] == "reference"
    assert ("cpu_native" in backends) == cpu_native.available()


@pytest.mark.parametrize("kind,group,offs", LAYOUTS)
@pytest.mark.parametrize("k", [96, 160, 576])
@pytest.mark.parametrize("n", [1, 3, 49])
@pytest.mark.parametrize("m", [1, 7, 33, 300])
def test_every_backend_matches_the_reference(kind, group, offs, k, n, m):
    if group is not None and k % group:
        pytest.skip("group does not divide K")
    w = random_packed(kind, n, k, group, seed=k * 31 + n, offsets=offs)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    want = float64_reference(x, w)
    bound = error_bound(x, w)
    ref = reference.quantized_linear(x, w)
    assert ref.shape == (m, n) and ref.dtype == torch.float32
    err = (ref.double() - want).abs()
    assert bool((err <= bound).all()), f"reference: max err {err.max().item():.3g}"
    if not cpu_native.linear_q_applies(x, w):
        return
    for quantize_inputs in native_modes(x, w):
        y = cpu_native.linear_q(x, w, quantize_inputs=quantize_inputs)
        assert y.shape == (m, n) and y.dtype == torch.float32
        limit = input_quantization_bound(x, w) if quantize_inputs else bound
        err = (y.double() - want).abs()
        assert bool((err <= limit).all()), f"quantize_inputs={quantize_inputs}: max err {err.max().item():.3g}"


@native
@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("kind,group,offs", [("u4", 32, True), ("s8", 32, True), ("s8", None, False),
                                             ("e4m3", None, False)])
def test_native_wide_output_lm_head_shape(kind, group, offs, m):
    """N = 49152 (the default model's vocabulary) and K = 576."""
    w = random_packed(kind, 49152, 576, group, seed=5, offsets=offs)
    x = torch.randn(m, 576, generator=torch.Generator().manual_seed(3))
    want = float64_reference(x, w)
    for quantize_inputs in native_modes(x, w):
        y = cpu_native.linear_q(x, w, quantize_inputs=quantize_inputs)
        limit = input_quantization_bound(x, w) if quantize_inputs else error_bound(x, w)
        assert bool(((y.double() - want).abs() <= limit).all()), f"quantize_inputs={quantize_inputs}"


@native
@pytest.mark.parametrize("kind,group,offs", LAYOUTS)
# 160: a last chunk of 32 inputs; 96: of 96 (the AVX2 tiles' second half chunk partly filled);
# 70 rows: more than one row block; 1-6 rows: the VNNI tiles of one block's height. Scales and
# offsets are float16 values, held as float32 and as float16: both forms give the same bits.
@pytest.mark.parametrize("m,k", [(9, 192), (3, 160), (2, 576), (5, 96), (70, 224), (1, 160), (4, 576), (6, 160)])
def test_native_simd_paths_bit_identical(kind, group, offs, m, k):
    if group is not None and k % group:
        pytest.skip("group does not divide K")
    forms = scale_forms(random_packed(kind, 37, k, group, seed=11, offsets=offs))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    for quantize_inputs in native_modes(x, forms[0]):
        outs = []
        for cap in (3, 2, 1, 0):
            with isa_cap(cap):
                outs += [cpu_native.linear_q(x, w, quantize_inputs=quantize_inputs) for w in forms]
        assert all(torch.equal(outs[0], o) for o in outs[1:]), f"quantize_inputs={quantize_inputs}"


@native
@pytest.mark.parametrize("kind,group,offs", LAYOUTS)
def test_native_rows_do_not_depend_on_the_batch(kind, group, offs):
    """A row's output is bit-identical alone, at any position of any batch, with 1 or 2 threads."""
    w = random_packed(kind, 201, 576, group, seed=13, offsets=offs)
    batch = torch.randn(300, 576, generator=torch.Generator().manual_seed(4))
    for q in native_modes(batch, w):
        with threads(1):
            alone = [cpu_native.linear_q(batch[i:i + 1], w, quantize_inputs=q) for i in (0, 5, 299)]
        for nthreads in (1, 2):
            with threads(nthreads):
                for size in (7, 33, 300):
                    full = cpu_native.linear_q(batch[:size], w, quantize_inputs=q)
                    assert torch.equal(full[0:1], alone[0]) and torch.equal(full[5:6], alone[1])
                assert torch.equal(cpu_native.linear_q(batch, w, quantize_inputs=q)[299:300], alone[2])


@native
def test_native_bias_strides_and_16_bit_activations():
    w = random_packed("u4", 48, 128, 32, seed=1)
    bias = torch.randn(48)
    x = torch.randn(4, 6, 256)[..., ::2]  # strided last dim, 3-D
    y = cpu_native.linear_q(x, w, bias, quantize_inputs=False)
    assert y.shape == (4, 6, 48)
    torch.testing.assert_close(y, reference.quantized_linear(x, w, bias), rtol=1e-5, atol=1e-5)
    xb = x.to(torch.bfloat16)
    yb = ops.linear(xb, w, bias)  # the default mode: int8 inputs
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, reference.quantized_linear(xb, w, bias), rtol=3e-2, atol=3e-2)


def test_fp8_codes_decode_exactly():
    """Every finite e4m3 code (subnormals included) times a one-hot input gives its float value."""
    bits = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    codes = bits.view(torch.float8_e4m3fn).reshape(-1, 1).repeat(1, 16)
    w = PackedWeight("e4m3", codes.shape[0], 16, 16, codes, torch.ones(codes.shape[0], 1))
    x = torch.zeros(1, 16)
    x[0, 3] = 1.0
    want = bits.view(torch.float8_e4m3fn).float()
    for impl in ops.implementations("quantized_linear"):
        if impl.applies(x, w, None):
            assert torch.equal(impl.fn(x, w, None)[0], want), impl.backend


def test_rtn_schemes_pack_into_the_layout():
    w = torch.randn(40, 128)
    for q, kind in ((quantize_int8(w), "s8"), (quantize_int4(w, 64), "u4"), (quantize_fp8(w), "e4m3"),
                    (quantize_int8(w, 32), "s8")):
        p = pack(q)
        assert p.kind == kind and p.shape == (40, 128)
        from fastinfer.quant.rtn import dequantize
        torch.testing.assert_close(p.dequantize(), dequantize(q), rtol=0, atol=0)


def test_concat_and_regroup_are_exact():
    a = random_packed("u4", 8, 64, 32, seed=1)
    b = random_packed("s8", 4, 64, 16, seed=2, offsets=False)
    fused = concat_rows([a, b])
    assert fused.kind == "s8" and fused.group_size == 16 and fused.shape == (12, 64)
    torch.testing.assert_close(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()]), rtol=0, atol=0)
    same = concat_rows([a, a])
    assert same.kind == "u4" and same.group_size == 32
    torch.testing.assert_close(regroup(a, "s8", 16).dequantize(), a.dequantize(), rtol=0, atol=0)


def test_float16_scales_narrow_only_when_exact():
    w = random_packed("u4", 8, 64, 32, seed=3)
    assert narrow_scales(w) is w  # random float32 scales are not float16 values
    w32, w16 = scale_forms(w)
    assert w16.offsets.dtype == torch.float16 and torch.equal(w16.dequantize(), w32.dequantize())
    assert widen_scales(w16).scales.dtype == torch.float32 and widen_scales(w32) is w32
    big = PackedWeight("s8", 1, 16, 16, torch.ones(1, 16, dtype=torch.int8), torch.full((1, 1), 1e6))
    assert narrow_scales(big) is big  # beyond float16's range
    fused = concat_rows([w16, w32, w16])  # mixed forms widen, exactly
    assert fused.scales.dtype == torch.float32
    assert torch.equal(fused.dequantize(), torch.cat([w32.dequantize()] * 3))
    assert concat_rows([w16, w16]).scales.dtype == torch.float16


def test_packed_weight_checks_its_parts():
    with pytest.raises(ValueError, match="u4 codes must be torch.uint8 \\[2, 32\\]"):
        PackedWeight("u4", 2, 64, 32, torch.zeros(2, 64, dtype=torch.uint8), torch.ones(2, 2))
    with pytest.raises(ValueError, match="group_size 48 must divide in_features 64"):
        PackedWeight("s8", 2, 64, 48, torch.zeros(2, 64, dtype=torch.int8), torch.ones(2, 1))
    with pytest.raises(ValueError, match="kind must be one of"):
        PackedWeight("u3", 2, 64, 32, torch.zeros(2, 64, dtype=torch.int8), torch.ones(2, 2))
    with pytest.raises(ValueError, match="scales must be float32 or float16"):
        PackedWeight("s8", 2, 64, 32, torch.zeros(2, 64, dtype=torch.int8), torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="offsets must have the scales' dtype torch.float16"):
        PackedWeight("s8", 2, 64, 32, torch.zeros(2, 64, dtype=torch.int8), torch.ones(2, 2).half(), torch.ones(2, 2))


@native
def test_native_op_errors_name_the_problem():
    op = torch.ops.fastinfer_cpu.linear_q
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match="codes of kind 1 must be Char"):
        op(x, torch.zeros(3, 64, dtype=torch.uint8), torch.ones(3, 4), None, 1, 16)
    with pytest.raises(ValueError, match="group_size must divide K = 64 and be a multiple of 32"):
        op(x, torch.zeros(3, 32, dtype=torch.uint8), torch.ones(3, 4), None, 0, 16)
    with pytest.raises(TypeError, match="x must be float32"):
        op(x.double(), torch.zeros(3, 64, dtype=torch.int8), torch.ones(3, 4), None, 1, 16)
    with pytest.raises(TypeError, match="scales must be float32 or float16, got Double"):
        op(x, torch.zeros(3, 64, dtype=torch.int8), torch.ones(3, 4).double(), None, 1, 16)
    with pytest.raises(TypeError, match="offsets must have the scales' dtype Half, got Float"):
        op(x, torch.zeros(3, 64, dtype=torch.int8), torch.ones(3, 4).half(), torch.ones(3, 4), 1, 16)


@native
def test_default_input_mode_follows_the_code_path():
    """int8 inputs by default wherever a SIMD path has int8 tiles (AVX2 and up), float inputs
    on the scalar path; the default is the same bits as asking for the mode."""
    w = random_packed("u4", 40, 256, 32, seed=5)
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(6))
    int8_inputs = cpu_native.linear_q(x, w, quantize_inputs=True)
    float_inputs = cpu_native.linear_q(x, w, quantize_inputs=False)
    assert not torch.equal(int8_inputs, float_inputs)
    with isa_cap(1) as path:
        if path == "avx2":
            assert torch.equal(cpu_native.linear_q(x, w), int8_inputs)
    with isa_cap(0):
        assert torch.equal(cpu_native.linear_q(x, w), float_inputs)


@native
def test_isa_cap_by_name_and_from_the_environment():
    import os
    import subprocess
    import sys

    with pytest.raises(ValueError, match="FASTINFER_CPU_ISA must be one of"):
        cpu_native.set_isa_cap("avx9", source="FASTINFER_CPU_ISA")
    with pytest.raises(ValueError, match="one of"):
        cpu_native.set_isa_cap(7)
    with isa_cap("scalar") as path:
        assert path == "scalar" and cpu_native.isa() == "scalar"
    code = "from fastinfer.ops.backends import cpu_native; print(cpu_native.available(), cpu_native.isa())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FASTINFER_CPU_ISA": "scalar"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "scalar"]


@native
@pytest.mark.parametrize("kind,group,offs", LAYOUTS)
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_native_embedding_rows_equal_the_reference(kind, group, offs, rows):
    """embedding_q gives the reference's dequantized rows bit for bit (code * scale, then +
    offset), with float32 and float16 scales, for one id, a few and a prefill's many (the
    parallel path), repeats included; ids of any shape; an id off the table raises IndexError."""
    w = random_packed(kind, 97, 576 if kind != "u4" else 640, group, seed=rows, offsets=offs)
    ids = torch.randint(0, 97, (rows,), generator=torch.Generator().manual_seed(rows))
    ids[0] = 96
    for form in (w, *scale_forms(w)):
        assert ops.implementations("quantized_embedding")[0].backend == "cpu_native"
        assert cpu_native.embedding_q_applies(ids, form)  # so ops.embedding picks it
        want = reference.quantized_embedding(ids, form)
        got = cpu_native.embedding_q(ids, form)
        assert got.dtype == torch.float32 and torch.equal(got, want) and torch.equal(ops.embedding(ids, form), want)
        # -0.0 products stay -0.0 without offsets (no "+ 0.0"): compare the bits too
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    grid = torch.tensor([[5, 0], [96, 5]])
    assert torch.equal(cpu_native.embedding_q(grid, w), reference.quantized_embedding(grid.view(-1), w).view(2, 2, -1))
    with pytest.raises(IndexError, match="id 97 is out of range for a table of 97 rows"):
        cpu_native.embedding_q(torch.tensor([3, 97]), w)
    with pytest.raises(IndexError, match="id -1 is out of range"):
        cpu_native.embedding_q(torch.tensor([-1]), w)
    with pytest.raises(TypeError, match="ids must be int64"):
        torch.ops.fastinfer_cpu.embedding_q(ids.int(), *w.tensors, 0 if kind == "u4" else 1, w.group_size)
