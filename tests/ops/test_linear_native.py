"""fastinfer._C_cpu linear_f32: accuracy against a float64 reference, batch invariance
(bit-identical rows whatever the batch size, the row's position, the thread count and the SIMD
path), input layouts and error messages."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from fastinfer.ops.backends import cpu_native

from .native_helpers import isa_cap, threads

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="fastinfer._C_cpu is not built")

MODEL_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]  # (K, N)
EPS32 = 2.0**-24


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Rounding-error bound of the kernel's order: K/16 sequential FMAs per lane, 4 tree adds
    and the bias add, each within one float32 ulp (relative 2**-24) of sum |x||w|."""
    k = x.shape[-1]
    steps = (k + 15) // 16 + 6
    absdot = x.abs().double() @ w.abs().double().T
    return steps * EPS32 * absdot * 1.01 + 1e-30




@pytest.mark.parametrize("m", [1, 3, 17, 97, 130])
@pytest.mark.parametrize("k", [16, 17, 576, 1536])
@pytest.mark.parametrize("n", [1, 5, 192, 577])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_float64_reference(m, k, n, with_bias):
    g = _gen(m * 100003 + k * 101 + n)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if with_bias else None
    y = cpu_native.linear_f32(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (m, n) and y.is_contiguous()
    ref = x.double() @ w.double().T
    if b is not None:
        ref = ref + b.double()
    err = (y.double() - ref).abs()
    assert bool((err <= _error_bound(x, w) + (b.double().abs() * EPS32 if b is not None else 0)).all()), (
        f"max err {err.max().item():.3g}"
    )
    # and close to torch's own float32 linear
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5 * k**0.5)


def test_simd_paths_are_bit_identical():
    """AVX-512, AVX2+FMA and scalar paths follow the same order: identical bits."""
    g = _gen(7)
    for m, k, n in [(1, 17, 5), (2, 29, 9), (7, 8, 3), (5, 576, 577), (130, 1536, 33), (3, 1, 2)]:
        x = torch.randn(m, k, generator=g)
        w = torch.randn(n, k, generator=g)
        b = torch.randn(n, generator=g)
        outs = {}
        for cap in (2, 1, 0):
            with isa_cap(cap) as name:
                outs[name] = cpu_native.linear_f32(x, w, b)
        ys = list(outs.values())
        for name, y in outs.items():
            assert torch.equal(y, ys[0]), f"{name} differs from {list(outs)[0]} at {(m, k, n)}"


def test_isa_reports_a_path():
    assert cpu_native.isa() in {"avx512_vnni", "avx512", "avx2", "scalar"}


_BATCHES = list(range(1, 18)) + [31, 32, 33, 63, 64, 65, 96, 97, 127, 128, 129, 130, 200, 255, 256, 257, 300]


@pytest.mark.parametrize("k,n", MODEL_SHAPES[:4])
def test_batch_invariance_model_shapes(k, n):
    g = _gen(k + n)
    rows = 310
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    b = torch.randn(n, generator=g)
    for bias in (None, b):
        single = torch.stack([cpu_native.linear_f32(x[i : i + 1], w, bias)[0] for i in range(rows)])
        for m in _BATCHES:
            y = cpu_native.linear_f32(x[:m], w, bias)
            assert torch.equal(y, single[:m]), f"M={m}: a row differs from its batch-of-one result"
        # rows at other offsets and positions (shifted window, shuffled batch)
        for off, m in [(5, 1), (7, 8), (9, 33), (301, 9), (1, 300)]:
            assert torch.equal(cpu_native.linear_f32(x[off : off + m], w, bias), single[off : off + m])
        perm = torch.randperm(rows, generator=g)[:150]
        assert torch.equal(cpu_native.linear_f32(x[perm], w, bias), single[perm])
        # thread count
        with threads(1):
            y1 = cpu_native.linear_f32(x[:257], w, bias)
        with threads(2):
            y2 = cpu_native.linear_f32(x[:257], w, bias)
        assert torch.equal(y1, single[:257]) and torch.equal(y2, single[:257])


def test_batch_invariance_vocab_shape():
    k, n = MODEL_SHAPES[4]
    g = _gen(49152)
    x = torch.randn(131, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    rows = [0, 1, 2, 6, 32, 129, 130]
    single = {i: cpu_native.linear_f32(x[i : i + 1], w)[0] for i in rows}
    for m in (2, 3, 7, 33, 131):
        y = cpu_native.linear_f32(x[:m], w)
        for i in rows:
            if i < m:
                assert torch.equal(y[i], single[i]), f"M={m}, row {i}"
    with threads(1):
        y1 = cpu_native.linear_f32(x[:33], w)
    assert all(torch.equal(y1[i], single[i]) for i in rows if i < 33)


def test_leading_dims_and_noncontiguous_inputs():
    g = _gen(11)
    k, n = 577, 193
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g)
    x3 = torch.randn(2, 5, k, generator=g)
    y3 = cpu_native.linear_f32(x3, w, b)
    assert y3.shape == (2, 5, n)
    assert torch.equal(y3.reshape(10, n), cpu_native.linear_f32(x3.reshape(10, k), w, b))
    # last dim strided (a copy is made), rows with a padded stride (used in place), transposed
    wide = torch.randn(9, 2 * k, generator=g)
    xs = wide[:, ::2]
    assert not xs.is_contiguous()
    assert torch.equal(cpu_native.linear_f32(xs, w, b), cpu_native.linear_f32(xs.contiguous(), w, b))
    xp = wide[:, :k]
    assert xp.stride(0) == 2 * k
    assert torch.equal(cpu_native.linear_f32(xp, w, b), cpu_native.linear_f32(xp.contiguous(), w, b))
    xt = torch.randn(k, 6, generator=g).T
    assert torch.equal(cpu_native.linear_f32(xt, w), cpu_native.linear_f32(xt.contiguous(), w))
    # non-contiguous weight and bias
    wt = torch.randn(k, n, generator=g).T
    bs = torch.randn(2 * n, generator=g)[::2]
    assert torch.equal(cpu_native.linear_f32(xp, wt, bs),
                       cpu_native.linear_f32(xp, wt.contiguous(), bs.contiguous()))
    # rows placed inside a larger batch give the same bits as alone (layout-independent)
    assert torch.equal(cpu_native.linear_f32(xp, w, b)[3], cpu_native.linear_f32(xp[3:4], w, b)[0])


def test_empty_and_degenerate_sizes():
    w = torch.randn(4, 8)
    b = torch.randn(4)
    assert cpu_native.linear_f32(torch.randn(0, 8), w, b).shape == (0, 4)
    assert cpu_native.linear_f32(torch.randn(3, 8), torch.randn(0, 8)).shape == (3, 0)
    y = cpu_native.linear_f32(torch.randn(3, 0), torch.randn(4, 0), b)
    assert torch.equal(y, b.expand(3, 4))
    assert torch.equal(cpu_native.linear_f32(torch.randn(2, 0), torch.randn(4, 0)), torch.zeros(2, 4))


@pytest.mark.parametrize("m,k,n", [(1, 17, 5), (2, 29, 9), (7, 576, 192), (130, 1536, 33), (3, 1, 2)])
def test_bfloat16_weights_are_widened_exactly(m, k, n):
    """bfloat16 weights give the float32 linear's bits on the widened weights, on every SIMD path;
    bfloat16 inputs are widened too and the result rounded back once."""
    g = _gen(m + k + n)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g).bfloat16(), torch.randn(n, generator=g)
    want = cpu_native.linear_f32(x, w.float(), b)
    for cap in (2, 1, 0):
        with isa_cap(cap) as name:
            assert torch.equal(torch.ops.fastinfer_cpu.linear_f32(x, w, b), want), name
    xb, bb = x.bfloat16(), b.bfloat16()
    y = cpu_native.linear_f32(xb, w, bb)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, cpu_native.linear_f32(xb.float(), w.float(), bb.float()).bfloat16())


def test_bfloat16_rows_do_not_depend_on_the_batch():
    """oneDNN's bfloat16 matmul changes a row with the batch (K = 1536 from M = 128): this does not."""
    g = _gen(1536)
    x, w = torch.randn(300, 1536, generator=g).bfloat16(), (torch.randn(576, 1536, generator=g) * 0.05).bfloat16()
    single = torch.cat([cpu_native.linear_f32(x[i:i + 1], w) for i in (0, 5, 299)])
    for m in (7, 128, 300):
        y = cpu_native.linear_f32(x[:m], w)
        assert torch.equal(y[0], single[0]) and torch.equal(y[5], single[1])
    assert torch.equal(cpu_native.linear_f32(x, w)[299], single[2])


def test_errors_name_the_argument():
    x = torch.randn(3, 8)
    w = torch.randn(4, 8)
    with pytest.raises(TypeError, match="x must be float32"):
        cpu_native.linear_f32(x.double(), w)
    with pytest.raises(TypeError, match="weight must be float32 or bfloat16"):
        cpu_native.linear_f32(x, w.half())
    with pytest.raises(TypeError, match="bias must be float32"):
        cpu_native.linear_f32(x, w, torch.zeros(4, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"weight must be \[N, K\] with K = x.shape\[-1\] = 8"):
        cpu_native.linear_f32(x, torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"weight must be 2-D \[N, K\]"):
        cpu_native.linear_f32(x, torch.randn(4, 8, 1))
    with pytest.raises(ValueError, match=r"x must be 2-D \[M, K\]"):
        torch.ops.fastinfer_cpu.linear_f32(torch.randn(2, 3, 8), w)
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \[..., K\]"):
        cpu_native.linear_f32(torch.tensor(1.0), w)
    with pytest.raises(ValueError, match=r"bias must be 1-D \[N\] with N = weight.shape\[0\] = 4"):
        cpu_native.linear_f32(x, w, torch.zeros(5))
    # the raw op checks too
    op = torch.ops.fastinfer_cpu.linear_f32
    with pytest.raises(ValueError, match="x rows must be contiguous"):
        op(torch.randn(8, 3).T, w, None)
    with pytest.raises(ValueError, match="weight rows must be contiguous"):
        op(x, torch.randn(8, 4).T, None)
    with pytest.raises(ValueError, match="bias must be contiguous"):
        op(x, w, torch.randn(8)[::2])
    with pytest.raises(TypeError, match="x must be float32"):
        op(x.half(), w, None)
    with pytest.raises(ValueError, match=r"weight must be \[N, K\]"):
        op(x, torch.randn(4, 9), None)
    with pytest.raises(RuntimeError, match="x must be a CPU tensor"):
        op(x.to("meta"), w, None)
    with pytest.raises(RuntimeError, match="weight must be a CPU tensor"):
        cpu_native.linear_f32(x, w.to("meta"))
