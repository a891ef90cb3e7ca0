"""The quantized KV cache (int8 and fp8 e4m3 codes with a float32 scale per token and kv head).

- Round trip: int8 errs by at most half a step (``scale / 2``); fp8 by at most 2**-4 of the
  value in e4m3's normal range and half a subnormal step (``2**-10 * scale``) below it.
- Writes: the native CPU ``reshape_and_cache`` gives the reference's bytes exactly, for every
  cache type and float32 / bfloat16 / float16 inputs.
- Attention over a quantized cache, every backend, against a dense float64 computation on the
  dequantized keys and values: atol = rtol = 1e-5 (the same as float caches: the dequantized
  values are identical in every backend). Against the unquantized cache the error stays small
  (int8 < 0.03, fp8 < 0.15 absolute on unit-variance inputs).
- Batch invariance of the native kernel on quantized caches, bit for bit; argument errors.
"""
from __future__ import annotations

import pytest
import torch

from fastinfer import ops
from fastinfer.common import kv_format as kv
from fastinfer.ops import reference
from fastinfer.ops.backends import cpu_native

from .native_helpers import isa_cap
from .test_attention_reference import dense_attention
from .test_paged_attention_native import MIXED, make_batch

QTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
native = pytest.mark.skipif(not cpu_native.available(), reason="fastinfer._C_cpu is not built")


def rows(seed: int = 0) -> torch.Tensor:
    """Rows of varied magnitude, with a zero row and a row holding one large outlier."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 3, 64, generator=g) * torch.logspace(-3, 2, 64).view(64, 1, 1)
    x[5] = 0.0
    x[9, 1, 7] = 1e3
    return x


@pytest.mark.parametrize("name", list(QTYPES))
def test_round_trip_error_bound(name):
    x = rows()
    codes, scales = kv.quantize(x, QTYPES[name])
    assert codes.dtype == QTYPES[name] and codes.shape == x.shape
    assert scales.dtype == torch.float32 and scales.shape == x.shape[:-1]
    back = kv.dequantize(codes, scales)
    err = (back - x).abs()
    s = scales.unsqueeze(-1)
    if name == "int8":
        assert codes.abs().max() <= 127
        bound = s / 2
    else:
        bound = torch.maximum(x.abs() * 2.0**-4, s * 2.0**-10)
    assert bool((err <= bound * (1 + 1e-6) + 1e-30).all())
    assert torch.equal(back[5], torch.zeros_like(back[5])) and bool((scales[5] == 0).all())
    # the row's largest magnitude is representable: it comes back (almost) exactly
    amax = x.abs().amax(-1)
    torch.testing.assert_close(back.abs().amax(-1), amax, rtol=1e-6, atol=0)
    assert err.max() > 0  # it really is quantized


@native
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_write_is_bit_identical_to_the_reference(cache_dtype, in_dtype):
    x = rows(1).to(in_dtype)
    nb, bs = 8, 16
    quantized = kv.is_quantized(cache_dtype)
    caches = []
    for _ in range(2):
        k, v = torch.zeros(nb, bs, 3, 64, dtype=cache_dtype), torch.zeros(nb, bs, 3, 64, dtype=cache_dtype)
        ks, vs = (torch.full((nb, bs, 3), -1.0), torch.full((nb, bs, 3), -1.0)) if quantized else (None, None)
        caches.append((k, v, ks, vs))
    slots = torch.randperm(nb * bs, generator=torch.Generator().manual_seed(2))[:64]
    key, value = x, -x[:, :, ::1] * 0.5
    assert cpu_native.reshape_and_cache_applies(key, value, *caches[1][:2], slots, *caches[1][2:])
    reference.reshape_and_cache(key, value, caches[0][0], caches[0][1], slots, *caches[0][2:])
    cpu_native.reshape_and_cache(key, value, caches[1][0], caches[1][1], slots, *caches[1][2:])
    for a, b in zip(caches[0], caches[1]):
        if a is not None:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    if quantized:  # untouched slots keep their old scale
        assert int((caches[1][2] == -1.0).all(-1).sum()) == nb * bs - 64


def quantized_batch(seqs, name, h=9, hkv=3, d=64, seed=0):
    """A batch whose caches are quantized; also returns the unquantized caches."""
    q, kc, vc, meta = make_batch(seqs, h, hkv, d, seed=seed)
    kc, vc = torch.nan_to_num(kc, nan=0.0), torch.nan_to_num(vc, nan=0.0)
    (kq, ks), (vq, vs) = kv.quantize(kc, QTYPES[name]), kv.quantize(vc, QTYPES[name])
    return q, (kq, vq, ks, vs), (kc, vc), meta


def _sequence_rows(cache, meta, i, bs=16):
    n = meta.context_lens[i]
    blocks = meta.block_tables[i][: -(-n // bs)]
    return cache.index_select(0, blocks).flatten(0, 1)[:n]


@pytest.mark.parametrize("name", list(QTYPES))
@pytest.mark.parametrize("impl", ops.implementations("paged_attention"), ids=lambda i: i.backend)
def test_attention_over_a_quantized_cache(impl, name):
    q, (kq, vq, ks, vs), (kc, vc), meta = quantized_batch(MIXED, name, seed=7)
    args = (q, kq, vq, meta, 0.125, ks, vs)
    if not impl.applies(*args):
        pytest.skip(f"{impl.backend} does not take a quantized cache")
    out = impl.fn(*args)
    kd, vd = kv.dequantize(kq, ks), kv.dequantize(vq, vs)
    exact = reference.paged_attention(q, kc, vc, meta, 0.125)
    for i, n in enumerate(meta.context_lens):
        s, e = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        want = dense_attention(q[s:e], _sequence_rows(kd, meta, i), _sequence_rows(vd, meta, i), 0.125)
        torch.testing.assert_close(out[s:e].double(), want, atol=1e-5, rtol=1e-5)
    assert float((out - exact).abs().max()) < (0.03 if name == "int8" else 0.15)


@native
@pytest.mark.parametrize("name", list(QTYPES))
@pytest.mark.parametrize("cap", [0, 2])
def test_native_quantized_attention_is_batch_invariant(name, cap):
    """A sequence's rows are bit-identical alone and inside a mixed batch, on each code path."""
    q, (kq, vq, ks, vs), _, meta = quantized_batch(MIXED, name, seed=3)
    with isa_cap(cap):
        together = cpu_native.paged_attention(q, kq, vq, meta, 0.125, ks, vs)
        for i in (0, 2, 5):
            s, e = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            alone_meta = type(meta)(meta.slot_mapping[:0], [0, e - s], [meta.context_lens[i]],
                                    meta.block_tables[i:i + 1], e - s)
            alone = cpu_native.paged_attention(q[s:e], kq, vq, alone_meta, 0.125, ks, vs)
            assert torch.equal(alone, together[s:e])


@native
def test_native_argument_errors():
    q, (kq, vq, ks, vs), _, meta = quantized_batch([(17, 1)], "int8")
    assert not cpu_native.paged_attention_applies(q, kq, vq, meta, 0.125)  # no scales: the reference's job
    with pytest.raises(ValueError, match="a Char cache needs k_scale"):
        cpu_native.paged_attention(q, kq, vq, meta, 0.125, None, vs)
    with pytest.raises(ValueError, match=r"v_scale must be contiguous \[num_blocks, block_size, Hkv\]"):
        cpu_native.paged_attention(q, kq, vq, meta, 0.125, ks, vs[:, :, :2])
    with pytest.raises(TypeError, match="v_cache must have k_cache's dtype"):
        cpu_native.paged_attention(q, kq, vq.view(torch.float8_e4m3fn), meta, 0.125, ks, vs)
    with pytest.raises(ValueError, match=r"slot_mapping\[0\] = 9999 is out of range"):
        cpu_native.reshape_and_cache(q[:, :3], q[:, :3], kq, vq, torch.tensor([9999]), ks, vs)
    with pytest.raises(ValueError, match="needs k_scale"):
        cpu_native.reshape_and_cache(q[:, :3], q[:, :3], kq, vq, torch.tensor([0]), None, None)
