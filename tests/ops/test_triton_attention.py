"""The Triton ``paged_attention`` (prefill, chunked prefill, decode with split-K) against the
pure-torch reference, run on CPU tensors under ``TRITON_INTERPRET=1`` (tests/conftest.py sets
it when there is no GPU), and on a GPU where there is one (``-m gpu``).

Grid: block sizes 16 and 32; head dims 64 and 128; GQA ratios 1, 3 and 4; context lengths 1,
exactly a block, a block + 1 and several hundred; chunked-prefill queries in the middle of a
sequence; float32 and float16 under the interpreter (bfloat16 only on a GPU). Unowned cache
slots hold NaN, so a read past a sequence's end shows.

Tolerances against the float32 reference on the same (rounded) inputs: float32 atol = rtol =
2e-5 (another summation order); float16 atol = rtol = 2e-3 (probabilities rounded to fp16
before P @ V, output rounded to fp16); bfloat16 atol = rtol = 2e-2 (8-bit mantissa).
"""
from __future__ import annotations

import os

import pytest
import torch

from fastinfer.ops import dispatch, reference

from .attention_helpers import paged_batch

triton_attention = pytest.importorskip("fastinfer.kernels.triton.attention")

GPU = torch.cuda.is_available()
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# The CPU cases run the kernels on CPU tensors: only Triton's interpreter can.
pytestmark = pytest.mark.skipif(not INTERPRETING and not GPU, reason="needs a GPU or TRITON_INTERPRET=1")
on_cpu = pytest.mark.skipif(not INTERPRETING, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
GQA = {1: (2, 2), 3: (3, 1), 4: (4, 1)}  # ratio: (heads, kv heads)


def check(seqs, ratio, d, bs, dtype, device="cpu", seed=0):
    h, hkv = GQA[ratio]
    q, kc, vc, meta = paged_batch(seqs, h, hkv, d, bs, dtype, device, seed)
    out = triton_attention.paged_attention(q, kc, vc, meta, d ** -0.5)
    assert out.shape == q.shape and out.dtype == dtype
    assert not out.isnan().any(), "read a slot outside a sequence"
    want = reference.paged_attention(q.float(), kc.float(), vc.float(), meta, d ** -0.5)
    torch.testing.assert_close(out.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


def decode_lengths(bs):
    return [(1, 1), (bs, 1), (bs + 1, 1), (300, 1)]


def mixed_lengths(bs):
    # a whole prompt of a block and one, a decode, a chunk in the middle of a long sequence, a
    # short chunk after a block and four, a whole prompt of exactly a block
    return [(bs + 1, bs + 1), (1, 1), (300, 24), (bs + 4, 3), (bs, bs)]


@on_cpu
# Every block size, head dim and GQA ratio, in pairs rather than the whole product (each
# interpreted launch costs milliseconds per program).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("ratio", [1, 3, 4])
@pytest.mark.parametrize("bs,d", [(16, 64), (32, 128)])
def test_decode_split_k(bs, d, ratio, dtype):
    check(decode_lengths(bs), ratio, d, bs, dtype)


@on_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("bs,d,ratio", [(16, 64, 1), (32, 128, 3), (16, 128, 4), (32, 64, 4)])
def test_prefill_and_chunks(bs, d, ratio, dtype):
    check(mixed_lengths(bs), ratio, d, bs, dtype)


@on_cpu
def test_prefill_of_several_hundred_tokens():
    check([(300, 300), (17, 5)], 3, 64, 16, torch.float32)


@on_cpu
def test_decode_of_a_padded_row_gives_zeros():
    """A captured decode batch pads with sequences of length 0: they must read nothing."""
    q, kc, vc, meta = paged_batch([(20, 1), (1, 1)], 2, 2, 64, 16)
    padded = type(meta)(meta.slot_mapping, [0, 1, 2], [20, 0], meta.block_tables, 1)
    out = triton_attention.paged_attention(q, kc, vc, padded, 0.125)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    want = reference.paged_attention(q[:1], kc, vc, type(meta)(meta.slot_mapping[:1], [0, 1], [20],
                                                                 meta.block_tables[:1], 1), 0.125)
    torch.testing.assert_close(out[:1], want, atol=2e-5, rtol=2e-5)


@on_cpu
def test_int8_cache():
    from fastinfer.common import kv_format as kv

    q, kc, vc, meta = paged_batch([(40, 1), (17, 1), (33, 9)][:2], 4, 1, 64, 16)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    (k8, ks), (v8, vs) = kv.quantize(kc, torch.int8), kv.quantize(vc, torch.int8)
    out = triton_attention.paged_attention(q, k8, v8, meta, 0.125, ks, vs)
    want = reference.paged_attention(q, k8, v8, meta, 0.125, ks, vs)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


def test_applies_only_when_forced_on_the_cpu():
    q, kc, vc, meta = paged_batch([(5, 1)], 2, 2, 64, 16)
    args = (q, kc, vc, meta, 0.125)
    if not GPU:  # the dispatch point takes the interpreter only while the triton backend is forced
        assert dispatch.select("paged_attention", *args, None, None) is not triton_attention.paged_attention
        with dispatch.forcing("triton"):
            assert triton_attention.paged_attention_applies(*args)
            assert dispatch.select("paged_attention", *args, None, None) is triton_attention.paged_attention
    with dispatch.forcing("reference"):
        assert dispatch.select("paged_attention", *args, None, None) is reference.paged_attention


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bs,d,ratio", [(16, 64, 1), (32, 128, 3), (16, 128, 4), (32, 64, 4)])
def test_on_gpu(bs, d, ratio, dtype):
    """Each block size, head dim and GQA ratio in every dtype (pairs, not the whole product:
    each new shape costs a Triton compile on the GPU machine's short lease)."""
    check(decode_lengths(bs) + [(2000, 1)], ratio, d, bs, dtype, "cuda")
    check(mixed_lengths(bs) + [(700, 700)], ratio, d, bs, dtype, "cuda", seed=1)
