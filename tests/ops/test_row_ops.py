"""The per-token ops of a decoder layer (rms_norm, add_rms_norm, silu_and_mul, rotary_embedding),
every backend against the reference, on odd shapes (1, 7 and 300 rows; widths 64, 576, 577,
3072), float32 and bfloat16, with strided inputs.

Tolerances: float32 rtol = atol = 1e-5 (a different summation order of the squares; silu's
exp within a few ulp); bfloat16 one bf16 ulp (rtol 2**-7, atol 1e-2 near zero: the native op
rounds silu(g) * u once where the reference rounds silu(g) first). The rotary op and the
residual sum are bit-identical to the reference. Native rows are bit-identical alone and in a
batch, on each SIMD path.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from fastinfer import ops
from fastinfer.layers.rotary import RotaryEmbedding
from fastinfer.ops import reference
from fastinfer.ops.backends import cpu_native

from .native_helpers import isa_cap

DTYPES = [torch.float32, torch.bfloat16]


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2.0**-7, atol=1e-2)


def impls(op):
    return pytest.mark.parametrize("impl", ops.implementations(op), ids=lambda i: i.backend)


def rows(m, h, dtype, seed=0, strided=False):
    """``[m, h]`` rows; ``strided``: a view whose rows are 2h apart."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, 2 * h if strided else h, generator=g) * 3).to(dtype)[:, :h]


@impls("rms_norm")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,h", [(1, 576), (7, 577), (300, 64)])
def test_rms_norm(impl, dtype, m, h):
    x, w = rows(m, h, dtype, strided=True), (torch.rand(h) + 0.5).to(dtype)
    if not impl.applies(x, w, 1e-5):
        pytest.skip("does not apply")
    out = impl.fn(x, w, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), reference.rms_norm(x, w, 1e-5).float(), **tol(dtype))


@impls("add_rms_norm")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,h", [(1, 576), (7, 577), (300, 64)])
def test_add_rms_norm(impl, dtype, m, h):
    x, r, w = rows(m, h, dtype, 1), rows(m, h, dtype, 2, strided=True), (torch.rand(h) + 0.5).to(dtype)
    if not impl.applies(x, r, w, 1e-6):
        pytest.skip("does not apply")
    out, s = impl.fn(x, r, w, 1e-6)
    want, want_s = reference.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s, want_s)  # the residual sum, rounded to the dtype as torch rounds it
    torch.testing.assert_close(out.float(), want.float(), **tol(dtype))


@impls("silu_and_mul")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,d", [(1, 1536), (7, 33), (300, 64)])
def test_silu_and_mul(impl, dtype, m, d):
    x = rows(m, 2 * d, dtype, 3)
    x[0, :8] = torch.tensor([0.0, -0.0, 90.0, -90.0, 1e-8, -1e-8, 15.0, -15.0]).to(dtype)
    if not impl.applies(x):
        pytest.skip("does not apply")
    out = impl.fn(x)
    assert out.shape == (m, d) and out.dtype == dtype
    torch.testing.assert_close(out.float(), reference.silu_and_mul(x).float(), **tol(dtype))


@impls("rotary_embedding")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 80, 24])  # halves of 32, 40 and 12: whole and partial vectors
def test_rotary_embedding(impl, dtype, d):
    rot = RotaryEmbedding(d, 4096, 10000.0)
    qkv = torch.randn(7, 9 * d + 2 * 3 * d).to(dtype)
    q, k, v = qkv.split([9 * d, 3 * d, 3 * d], -1)  # strided views, as the attention layer passes them
    q, k = q.view(7, 9, d), k.view(7, 3, d)
    pos = torch.tensor([0, 1, 17, 100, 511, 2048, 4095])
    want_q, want_k = reference.rotary_embedding(pos, q.clone(), k.clone(), rot.cos_sin)
    v_before = v.clone()
    if not impl.applies(pos, q, k, rot.cos_sin):
        pytest.skip("does not apply")
    got_q, got_k = impl.fn(pos, q, k, rot.cos_sin)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    assert torch.equal(v, v_before)  # the values next to q and k are left alone


@pytest.mark.skipif(not cpu_native.available(), reason="fastinfer._C_cpu is not built")
@pytest.mark.parametrize("cap", [0, 2])
def test_native_rows_are_batch_invariant(cap):
    x, r = rows(33, 576, torch.float32, 4), rows(33, 576, torch.float32, 5)
    w = torch.rand(576) + 0.5
    g = rows(33, 3072, torch.float32, 6)
    with isa_cap(cap):
        full = cpu_native.add_rms_norm(x, r, w, 1e-5)[0], cpu_native.silu_and_mul(g), cpu_native.rms_norm(x, w, 1e-5)
        for i in (0, 17, 32):
            alone = (cpu_native.add_rms_norm(x[i:i + 1], r[i:i + 1], w, 1e-5)[0], cpu_native.silu_and_mul(g[i:i + 1]),
                     cpu_native.rms_norm(x[i:i + 1], w, 1e-5))
            for a, b in zip(alone, full):
                assert torch.equal(a[0], b[i])


@pytest.mark.skipif(not cpu_native.available(), reason="fastinfer._C_cpu is not built")
def test_native_argument_errors():
    rot = RotaryEmbedding(64, 16, 10000.0)
    q, k = torch.randn(2, 4, 64), torch.randn(2, 2, 64)
    with pytest.raises(ValueError, match=r"positions\[1\] = 16 is out of range \[0, 16\)"):
        cpu_native.rotary_embedding(torch.tensor([0, 16]), q, k, rot.cos_sin)
    with pytest.raises(TypeError, match=r"weight must be a contiguous \[64\] CPU tensor of x's dtype"):
        cpu_native.rms_norm(torch.randn(3, 64), torch.ones(64, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="last dim must be even"):
        torch.ops.fastinfer_cpu.silu_and_mul(torch.randn(2, 7))


@impls("argmax")
@pytest.mark.parametrize("cap", [0, 2])
def test_argmax_is_torchs(impl, cap):
    """Every backend gives torch.argmax's index: the first maximum (repeats of the maximum, a
    maximum in a row's tail past the last 16 lanes, -0.0 beside +0.0), the first NaN where a row
    has NaNs, and rows of -inf; on the scalar and AVX-512 paths, for one row and many."""
    g = torch.Generator().manual_seed(3)
    for m, v in ((1, 49152), (6, 49152), (5, 1000), (40, 37), (3, 1)):
        x = torch.randn(m, v, generator=g)
        if v > 1 and m >= 5:
            x[0, v - 1] = 50.0                         # the maximum in the tail
            x[1, [v // 3, v // 2]] = 60.0              # a tie: the lower index wins
            x[2, :] = -float("inf")                    # all -inf: index 0
            x[3, [7, v - 2]] = float("nan")            # NaN counts as the greatest: the first one
            x[4, :] = -1.0
            x[4, [9, 11]] = torch.tensor([-0.0, 0.0])  # -0.0 == +0.0: the first
        with isa_cap(cap) if impl.backend == "cpu_native" else contextlib.nullcontext():
            got = impl.fn(x)
            assert torch.equal(got, x.argmax(-1)), (m, v)
            assert torch.equal(impl.fn(x[:, : max(1, v - 3)]), x[:, : max(1, v - 3)].argmax(-1))  # strided rows
    if impl.backend == "cpu_native":
        with pytest.raises(TypeError, match="x must be float32"):
            impl.fn(torch.zeros(2, 4, dtype=torch.float64))
        with pytest.raises(ValueError, match="V >= 1"):
            torch.ops.fastinfer_cpu.argmax_rows(torch.zeros(2, 0))


@pytest.mark.skipif(not cpu_native.available() or cpu_native.isa() not in ("avx512", "avx512_vnni"),
                    reason="needs fastinfer._C_cpu and an AVX-512 CPU (two paths to compare)")
@pytest.mark.parametrize("m,h", [(1, 576), (3, 77), (40, 1536)])
def test_native_norms_same_bits_on_every_path(m, h):
    """float32 norms: the AVX-512 rows (in place, no buffer) and the scalar rows give the same
    bits, with and without the residual add."""
    x, r = rows(m, h, torch.float32, 7), rows(m, h, torch.float32, 8, strided=True)
    w = torch.rand(h) + 0.5
    outs = []
    for cap in (0, 2):
        with isa_cap(cap) as path:
            assert path == ("scalar", "avx512")[cap // 2]
            outs.append((*cpu_native.add_rms_norm(x, r, w, 1e-5), cpu_native.rms_norm(r, w, 1e-6)))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert torch.equal(outs[0][1], x + r)
