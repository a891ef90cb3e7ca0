"""The Triton row ops (fastinfer/kernels/triton/{norm,activation,rotary,cache}.py) against the
torch reference: rms_norm, add_rms_norm, silu_and_mul, rotary_embedding and reshape_and_cache.

On the CPU they run under Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest when no
GPU is present) in float32, float16 and bfloat16 (the kernels compute in float32 and round
bfloat16 with integer ops there, since the interpreter's float32 -> bfloat16 cast truncates);
the tests marked ``gpu`` run the same checks on CUDA in float32, float16 and bfloat16, plus
model-sized shapes. Shapes: rows 1, 7, 33; hidden 64, 576, 577; head dims 64 and 128; GQA with
Hkv 1 and 3 for H 3 and 12; strided rows (slices of a wider tensor, q/k/key/value as slices of
one qkv tensor).

Tolerances (``ulp`` = 2**-10 for float16, 2**-7 for bfloat16, relative):
- rms_norm / add_rms_norm: float32 rtol = atol = 1e-5 (another summation order of the squares);
  16-bit rtol = one ulp, atol = one ulp (the normalized row may round the other way once). The
  residual sum of add_rms_norm is bit-identical.
- silu_and_mul: float32 rtol = atol = 1e-5 (exp differs by a few float32 ulp); 16-bit rtol = atol =
  one ulp (the kernel rounds silu(g) * u once, the reference rounds silu(g) first).
- rotary_embedding: bit-identical (the reference's products and sums, no FMA) on the CPU; on a
  GPU rtol = 1e-6 (float32) / one ulp (16-bit) in case the hardware's products differ.
- reshape_and_cache: bit-identical everywhere: float copies and casts, int8 and fp8 e4m3 codes
  and their float32 scales (ties of x / scale included); padding slots (-1) leave the cache
  untouched. The reference for these runs on the CPU (see :func:`run_both`: torch on CUDA
  divides by a Python number as a product with its float reciprocal).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated
triton = pytest.importorskip("triton")

from fastinfer.common import kv_format as kv  # noqa: E402
from fastinfer.ops import reference  # noqa: E402
from fastinfer.ops.dispatch import forcing, select  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRETING and not torch.cuda.is_available():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from fastinfer.kernels.triton import activation, cache, norm, rotary  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ULP = {F16: 2.0**-10, BF16: 2.0**-7}

_cpu = pytest.mark.skipif(not INTERPRETING, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
_gpu = [pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETING, reason="needs a CUDA GPU")]
CASES = ([pytest.param("cpu", dt, marks=_cpu, id=f"cpu-{str(dt)[6:]}") for dt in (F32, F16, BF16)]
         + [pytest.param("cuda", dt, marks=_gpu, id=f"cuda-{str(dt)[6:]}") for dt in (F32, F16, BF16)])
device_dtype = pytest.mark.parametrize("device,dtype", CASES)


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == F32 else dict(rtol=ULP[dtype], atol=ULP[dtype])


def rows(m, h, dtype, device, seed=0, strided=False):
    """``[m, h]`` rows; ``strided``: a view whose rows are ``2h + 3`` apart."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, 2 * h + 3 if strided else h, generator=g) * 3).to(dtype)
    return x.to(device)[:, :h]


def assert_close(got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), **tol(dtype))


# ----------------------------------------------------------------------------- norms
ROW_SHAPES = [(1, 576), (7, 577), (33, 64), (7, 64)]


@device_dtype
@pytest.mark.parametrize("m,h", ROW_SHAPES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_rms_norm(device, dtype, m, h, strided):
    x = rows(m, h, dtype, device, strided=strided)
    w = (torch.rand(h) + 0.5).to(dtype).to(device)
    got = norm.rms_norm(x, w, 1e-5)
    assert got.is_contiguous()
    assert_close(got, reference.rms_norm(x, w, 1e-5), dtype)


@device_dtype
@pytest.mark.parametrize("m,h", ROW_SHAPES)
def test_add_rms_norm(device, dtype, m, h):
    x = rows(m, h, dtype, device, 1, strided=True)
    r = rows(m, h, dtype, device, 2)
    w = (torch.rand(h) + 0.5).to(dtype).to(device)
    out, s = norm.add_rms_norm(x, r, w, 1e-6)
    want, want_s = reference.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s, want_s)  # the residual sum, rounded to the dtype as torch rounds it
    assert_close(out, want, dtype)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=_cpu), pytest.param("cuda", marks=_gpu)])
def test_rms_norm_weight_of_another_dtype_and_3d(device):
    """A float32 weight with float16 rows gives float32 (torch's promotion), as the reference;
    ``[B, T, h]`` inputs keep their shape."""
    x = rows(6, 64, F16, device, 3).view(2, 3, 64)
    w = (torch.rand(64) + 0.5).to(device)
    assert_close(norm.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), F16)
    r = rows(6, 64, F16, device, 4).view(2, 3, 64)
    out, s = norm.add_rms_norm(x, r, w, 1e-5)
    want, want_s = reference.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(s, want_s)
    assert_close(out, want, F16)


# ----------------------------------------------------------------------------- silu_and_mul
@device_dtype
@pytest.mark.parametrize("m,d", [(1, 576), (7, 577), (33, 64)])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's exp(90)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_silu_and_mul(device, dtype, m, d, strided):
    x = rows(m, 2 * d, dtype, device, 3, strided=strided)
    x[0, :8] = torch.tensor([0.0, -0.0, 90.0, -90.0, 1e-8, -1e-8, 15.0, -15.0]).to(dtype)
    got = activation.silu_and_mul(x)
    assert got.shape == (m, d)
    assert_close(got, reference.silu_and_mul(x), dtype)


@device_dtype
def test_silu_and_mul_leading_dims(device, dtype):
    x = rows(6, 2 * 40, dtype, device, 4).view(2, 3, 80)
    got = activation.silu_and_mul(x)
    assert got.shape == (2, 3, 40)
    assert_close(got, reference.silu_and_mul(x), dtype)


# ----------------------------------------------------------------------------- rotary
def cos_sin_table(d, max_pos, device):
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    f = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv)
    return torch.cat((f.cos(), f.sin()), -1).float().to(device)


def qkv_views(t, h, hkv, d, dtype, device, seed=0):
    """q, k, v as views of one ``[t, (h + 2 hkv) d]`` tensor (token stride (h + 2 hkv) d)."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(t, (h + 2 * hkv) * d, generator=g) * 2).to(dtype).to(device)
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], -1)
    return qkv, q.view(t, h, d), k.view(t, hkv, d), v.view(t, hkv, d)


@device_dtype
@pytest.mark.parametrize("t,h,hkv,d", [(1, 3, 1, 64), (7, 12, 3, 128), (33, 3, 3, 64), (7, 12, 1, 64)])
def test_rotary_embedding_in_place(device, dtype, t, h, hkv, d):
    cs = cos_sin_table(d, 4096, device)
    _, q, k, v = qkv_views(t, h, hkv, d, dtype, device, seed=t)
    pos = torch.randint(0, 4096, (t,), generator=torch.Generator().manual_seed(t)).to(device)
    pos[0] = 4095
    want_q, want_k = reference.rotary_embedding(pos, q.clone(), k.clone(), cs)
    v_before = v.clone()
    got_q, got_k = rotary.rotary_embedding(pos, q, k, cs)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()  # in place
    assert torch.equal(v, v_before)  # the values next to q and k are left alone
    if device == "cpu":
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
    else:
        t_ = dict(rtol=1e-6, atol=1e-6) if dtype == F32 else tol(dtype)
        torch.testing.assert_close(got_q, want_q, **t_)
        torch.testing.assert_close(got_k, want_k, **t_)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=_cpu), pytest.param("cuda", marks=_gpu)])
def test_rotary_contiguous_int32_positions(device):
    cs = cos_sin_table(64, 64, device)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(5, 4, 64, generator=g).to(device)
    k = torch.randn(5, 2, 64, generator=g).to(device)
    pos = torch.tensor([0, 3, 63, 7, 1], dtype=torch.int32, device=device)
    want_q, want_k = reference.rotary_embedding(pos, q.clone(), k.clone(), cs)
    got_q, got_k = rotary.rotary_embedding(pos, q, k, cs)
    torch.testing.assert_close(got_q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_k, want_k, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- reshape_and_cache
def make_cache(nb, bs, hkv, d, dtype, device, seed):
    """Caches filled with junk (so untouched slots are visible) and, quantized, junk scales."""
    g = torch.Generator().manual_seed(seed)
    junk = lambda: (torch.randn(nb, bs, hkv, d, generator=g) * 9).to(dtype).to(device)  # noqa: E731
    if kv.is_quantized(dtype):
        scales = lambda: torch.rand(nb, bs, hkv, generator=g).to(device)  # noqa: E731
        return [junk(), junk(), scales(), scales()]
    return [junk(), junk(), None, None]


def as_bits(x):
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


def run_both(key, value, slots, cache_dtype, nb=5, bs=4):
    """Writes with the kernel and with the reference (on the non-padding tokens) into caches with
    the same junk; asserts the results are bit-identical.

    The reference runs on the CPU: on CUDA tensors torch computes ``amax / 127`` (a tensor divided
    by a Python number) as ``amax * float(1 / 127)``, which is sometimes one ulp off the IEEE
    quotient that ``common/kv_format.py`` specifies and the CPU backends compute; the kernel computes the
    quotient."""
    t, hkv, d = key.shape
    got = make_cache(nb, bs, hkv, d, cache_dtype, key.device, 7)
    want = [c.cpu().clone() if c is not None else None for c in got]
    before = [c.clone() if c is not None else None for c in got]
    cache.reshape_and_cache(key, value, *got[:2], slots, *got[2:])
    keep = slots >= 0
    reference.reshape_and_cache(key[keep].cpu(), value[keep].cpu(), *want[:2], slots[keep].cpu(), *want[2:])
    for a, b in zip(got, want):
        if a is not None:
            assert torch.equal(as_bits(a.cpu()), as_bits(b))
    return got, before


CACHE_DTYPES = ["same", "float16", "int8", "fp8"]


@device_dtype
@pytest.mark.parametrize("t,hkv,d,bs", [(1, 1, 64, 16), (7, 3, 128, 32), (17, 3, 64, 16)])
@pytest.mark.parametrize("cache_kind", CACHE_DTYPES)
def test_reshape_and_cache(device, dtype, t, hkv, d, bs, cache_kind):
    cache_dtype = {"same": dtype, "float16": F16, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[cache_kind]
    _, _, key, value = qkv_views(t, 2, hkv, d, dtype, device, seed=t + d)  # strided slices of qkv
    key[0, 0] = 0  # a zero row: scale 0, codes 0
    if t > 1:
        key[1, 0, :3] = -0.0
    nb = 3
    perm = torch.randperm(nb * bs, generator=torch.Generator().manual_seed(t))[:t]
    slots = perm.clone()
    if t > 2:
        slots[2] = -1  # padding
    got, before = run_both(key, value, slots.to(device), cache_dtype, nb, bs)
    # every slot not written keeps its junk
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    untouched = untouched.to(device)
    for a, b in zip(got, before):
        if a is not None:
            flat_a, flat_b = as_bits(a).flatten(0, 1), as_bits(b).flatten(0, 1)
            assert torch.equal(flat_a[untouched], flat_b[untouched])


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=_cpu), pytest.param("cuda", marks=_gpu)])
def test_reshape_and_cache_all_padding(device):
    key = torch.randn(3, 2, 64, device=device)
    for dtype in (F32, torch.int8):
        got = make_cache(2, 4, 2, 64, dtype, device, 1)
        before = [c.clone() if c is not None else None for c in got]
        cache.reshape_and_cache(key, key, *got[:2], torch.full((3,), -1, device=device), *got[2:])
        assert all(torch.equal(a, b) for a, b in zip(got, before) if a is not None)


def tie_rows(qmax, d=128):
    """Rows whose amax is ``qmax`` (so scale = 1 and x / scale = x exactly) filled with rounding
    ties, their float32 neighbours and, for fp8, every code, its ties and subnormals."""
    if qmax == 127.0:
        base = torch.arange(-127, 127, dtype=torch.float64) + 0.5  # every half-integer tie
    else:
        codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).double()  # 0 .. 448
        mids = (codes[1:] + codes[:-1]) / 2  # ties, subnormal ones included
        base = torch.cat((codes, mids, -codes, -mids, torch.tensor([2.0**-10, 2.0**-11, 3 * 2.0**-11, 1e-30])))
    b32 = base.float()
    up = torch.nextafter(b32, torch.tensor(float("inf")))
    down = torch.nextafter(b32, torch.tensor(float("-inf")))
    vals = torch.cat((b32, up, down)).clamp(-qmax, qmax)
    per = d - 1
    n = (vals.numel() + per - 1) // per
    vals = torch.cat((vals, torch.zeros(n * per - vals.numel())))
    x = torch.cat((torch.full((n, 1), qmax), vals.view(n, per)), 1)
    x[1::2, 0] = -qmax  # amax from a negative value too
    return x


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=_cpu), pytest.param("cuda", marks=_gpu)])
@pytest.mark.parametrize("cache_kind", ["int8", "fp8"])
def test_quantized_cache_ties_bit_identical(device, cache_kind):
    """Codes of every rounding tie and its float32 neighbours, as the reference (x / scale = x)."""
    cache_dtype, qmax = (torch.int8, 127.0) if cache_kind == "int8" else (torch.float8_e4m3fn, 448.0)
    x = tie_rows(qmax)
    hkv = 2
    t = (x.shape[0] + hkv - 1) // hkv
    x = torch.cat((x, torch.zeros(t * hkv - x.shape[0], x.shape[1]))).view(t, hkv, -1).to(device)
    y = torch.randn(x.shape).to(device)
    run_both(x, y, torch.arange(t, device=device), cache_dtype, nb=(t + 3) // 4, bs=4)


@device_dtype
def test_quantized_cache_random_bit_identical(device, dtype):
    """Random rows over a wide range of magnitudes: int8 and fp8 codes and scales bit for bit."""
    g = torch.Generator().manual_seed(11)
    t, hkv, d = 16, 4, 64
    x = (torch.randn(t, hkv, d, generator=g) * torch.logspace(-6, 4, t * hkv).view(t, hkv, 1)).to(dtype).to(device)
    for cache_dtype in (torch.int8, torch.float8_e4m3fn):
        run_both(x, x.flip(0), torch.arange(t, device=device).flip(0), cache_dtype, nb=4, bs=4)


# ----------------------------------------------------------------------------- large shapes (GPU)
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETING, reason="needs a CUDA GPU")
def test_model_sized_shapes_gpu(dtype):
    """Llama-8B-sized rows: hidden 4096, intermediate 14336, 32 / 8 heads of 128, 300 tokens."""
    dev = "cuda"
    x, r = rows(300, 4096, dtype, dev, 1), rows(300, 4096, dtype, dev, 2, strided=True)
    w = (torch.rand(4096) + 0.5).to(dtype).to(dev)
    out, s = norm.add_rms_norm(x, r, w, 1e-5)
    want, want_s = reference.add_rms_norm(x, r, w, 1e-5)
    assert torch.equal(s, want_s)
    assert_close(out, want, dtype)
    g = rows(300, 2 * 14336, dtype, dev, 3)
    assert_close(activation.silu_and_mul(g), reference.silu_and_mul(g), dtype)
    _, q, k, v = qkv_views(300, 32, 8, 128, dtype, dev)
    cs = cos_sin_table(128, 8192, dev)
    pos = torch.arange(300, device=dev) * 27
    want_q, want_k = reference.rotary_embedding(pos, q.clone(), k.clone(), cs)
    got_q, got_k = rotary.rotary_embedding(pos, q, k, cs)
    torch.testing.assert_close(got_q, want_q, **tol(dtype))
    torch.testing.assert_close(got_k, want_k, **tol(dtype))
    slots = torch.randperm(64 * 16, device=dev)[:300]
    slots[::7] = -1
    for cache_dtype in (dtype, torch.int8, torch.float8_e4m3fn):
        run_both(k, v, slots, cache_dtype, nb=64, bs=16)


# ----------------------------------------------------------------------------- applies
def test_applies_predicates():
    """The predicates take what the kernels handle and only where Triton runs (on the CPU: the
    interpreter with the triton backend forced); no kernel is launched here."""
    dev = "cuda" if torch.cuda.is_available() and not INTERPRETING else "cpu"
    x, w = torch.randn(3, 64, device=dev), torch.ones(64, device=dev)
    q, k = torch.randn(2, 4, 64, device=dev), torch.randn(2, 2, 64, device=dev)
    pos, cs = torch.tensor([0, 1], device=dev), cos_sin_table(64, 8, dev)
    kc = torch.zeros(2, 4, 2, 64, device=dev)
    kq = torch.zeros(2, 4, 2, 64, dtype=torch.int8, device=dev)
    kf8 = torch.zeros(2, 4, 2, 64, dtype=torch.float8_e4m3fn, device=dev)
    sc = torch.zeros(2, 4, 2, device=dev)
    slots = torch.tensor([0, 5], device=dev)
    good = [
        (norm.rms_norm_applies, (x, w, 1e-5)),
        (norm.rms_norm_applies, (x.half()[:, :32], w.half()[:32], 1e-5)),
        (norm.add_rms_norm_applies, (x, x, w, 1e-5)),
        (activation.silu_and_mul_applies, (x.bfloat16(),)),
        (rotary.rotary_embedding_applies, (pos, q, k, cs)),
        (cache.reshape_and_cache_applies, (k, k, kc, kc, slots)),
        (cache.reshape_and_cache_applies, (k.half(), k.half(), kc.bfloat16(), kc.bfloat16(), slots)),
        (cache.reshape_and_cache_applies, (k, k, kq, kq, slots, sc, sc)),
        (cache.reshape_and_cache_applies, (k, k, kf8, kf8, slots, sc, sc)),
    ]
    bad = [
        (norm.rms_norm_applies, (x.double(), w.double(), 1e-5)),
        (norm.rms_norm_applies, (x.t(), w[:3], 1e-5)),  # last dim not contiguous
        (norm.rms_norm_applies, (x, w[:32], 1e-5)),
        (norm.add_rms_norm_applies, (x, x[:2], w, 1e-5)),
        (activation.silu_and_mul_applies, (x[:, :63],)),
        (rotary.rotary_embedding_applies, (pos, q, k, cs[:, :32])),
        (rotary.rotary_embedding_applies, (pos.float(), q, k, cs)),
        (cache.reshape_and_cache_applies, (k, k, kq, kq, slots)),  # quantized without scales
        (cache.reshape_and_cache_applies, (k, k, kc, kc, slots, sc, sc)),  # float with scales
        (cache.reshape_and_cache_applies, (k, k, kc, kq, slots)),
    ]
    with forcing("triton"):
        for fn, args in good:
            assert fn(*args), fn.__name__
        for fn, args in bad:
            assert not fn(*args), fn.__name__
    if dev == "cpu":  # the dispatch point takes the interpreter only while the triton backend is forced
        for fn, args in good:
            op = fn.__name__.removesuffix("_applies")
            kernel = getattr(sys.modules[fn.__module__], op)
            with forcing("triton"):
                assert select(op, *args) is kernel, op
            for other in ("reference", None):
                with forcing(other):
                    assert select(op, *args) is not kernel, (op, other)
