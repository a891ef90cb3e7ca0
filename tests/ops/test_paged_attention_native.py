"""fastinfer._C_cpu paged_attention against the pure-torch reference: mixed batches (prefill,
decode, continuation after cached context), odd lengths, GQA, D in {64, 128}, shuffled blocks,
NaN-filled unwritten cache slots, non-contiguous q, float32 and bfloat16; bit-identical batch
invariance (a sequence alone vs inside a batch, at any position, with any query chunking and
thread count); argument errors.

Tolerances: float32 atol = rtol = 1e-5 against the float32 reference. bfloat16: the kernel
computes in float32 on the (exact) upcast inputs and rounds once, so it is compared with the
float32 reference on the same bf16 inputs within half a bf16 ulp: atol 1e-5, rtol 2**-8.
"""
from __future__ import annotations


import pytest
import torch

from fastinfer.ops import reference
from fastinfer.ops.backends import cpu_native
from fastinfer.common.metadata import AttentionMetadata

from .attention_helpers import paged_batch
from .native_helpers import isa_cap, threads

pytestmark = pytest.mark.skipif(not cpu_native.available(), reason="fastinfer._C_cpu is not built")

BS = 16
MIXED = [(97, 97), (1, 1), (40, 1), (BS + 1, BS + 1), (200, 1), (97, 17), (BS + 1, 3), (64, 33)]


def make_batch(seqs, h, hkv, d, dtype=torch.float32, seed=0, spare_blocks=5, values=None):
    """``seqs``: (context_len, query_len) per sequence. Blocks are shuffled and every slot no
    sequence owns is NaN. ``values`` maps a sequence index to fixed (q, k, v) tensors (used to
    place one sequence into different batches)."""
    return paged_batch(seqs, h, hkv, d, BS, dtype, seed=seed, spare_blocks=spare_blocks, values=values)


def _check(q, k_cache, v_cache, meta, scale):
    out = cpu_native.paged_attention(q, k_cache, v_cache, meta, scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert not out.isnan().any()
    expected = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, scale)
    if q.dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(out.float(), expected, atol=1e-5, rtol=2.0**-8)


BATCHES = {
    "prefill": [(97, 97), (BS + 1, BS + 1), (1, 1), (64, 64)],
    "decode": [(1, 1), (17, 1), (BS + 1, 1), (97, 1), (300, 1)],
    "mixed": MIXED,
}


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("h,hkv", [(4, 4), (9, 3), (8, 2)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(batch, h, hkv, d, dtype):
    q, kc, vc, meta = make_batch(BATCHES[batch], h, hkv, d, dtype, seed=h * 7 + d)
    _check(q, kc, vc, meta, d**-0.5)


@pytest.mark.parametrize("d", [16, 48, 256])
def test_other_head_sizes(d):
    q, kc, vc, meta = make_batch([(97, 17), (BS + 1, 1), (33, 33)], 6, 2, d, seed=d)
    _check(q, kc, vc, meta, 0.3)


@pytest.mark.parametrize("cap", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_code_path(cap, dtype):
    """The portable path (cap 0), the AVX2 path and the AVX-512 path (where the CPU has them)."""
    q, kc, vc, meta = make_batch(MIXED, 9, 3, 64, dtype, seed=3)
    with isa_cap(cap):
        _check(q, kc, vc, meta, 0.125)


@pytest.mark.parametrize("d", [16, 48, 208])  # chunks of 64 values, then of 32 and 16
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_avx2_path_equals_the_portable_one(d, dtype):
    """The AVX2 path does the portable path's operations (the same exp2): the same bits."""
    q, kc, vc, meta = make_batch(MIXED, 6, 2, d, dtype, seed=d)
    outs = []
    for cap in (1, 0):
        with isa_cap(cap):
            outs.append(cpu_native.paged_attention(q, kc, vc, meta, 0.2))
    assert torch.equal(outs[0], outs[1])


def test_noncontiguous_q_and_int32_tables():
    q, kc, vc, meta = make_batch(MIXED, 9, 3, 64, seed=4)
    wide = torch.randn(q.shape[0], 2 * 9, 64 + 16)
    wide[:, ::2, 8:72] = q
    q_view = wide[:, ::2, 8:72]  # strided heads and rows, contiguous last dim
    assert not q_view.is_contiguous()
    expected = cpu_native.paged_attention(q, kc, vc, meta, 0.125)
    torch.testing.assert_close(cpu_native.paged_attention(q_view, kc, vc, meta, 0.125), expected,
                               atol=0, rtol=0)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # strided last dim: copied
    torch.testing.assert_close(cpu_native.paged_attention(q_t, kc, vc, meta, 0.125), expected,
                               atol=0, rtol=0)
    meta32 = AttentionMetadata(meta.slot_mapping, meta.query_start_loc, meta.context_lens,
                               meta.block_tables.int(), meta.max_query_len)
    torch.testing.assert_close(cpu_native.paged_attention(q, kc, vc, meta32, 0.125), expected,
                               atol=0, rtol=0)
    _check(q_view, kc, vc, meta, 0.125)


def test_empty_batch_and_sequences_without_queries():
    q, kc, vc, meta = make_batch([(40, 0), (17, 3), (5, 0)], 4, 2, 64, seed=5)
    assert q.shape[0] == 3
    _check(q, kc, vc, meta, 0.125)
    empty = AttentionMetadata(torch.zeros(0, dtype=torch.int64), [0], [],
                              torch.zeros(0, 1, dtype=torch.int64), 0)
    out = cpu_native.paged_attention(q[:0], kc, vc, empty, 0.125)
    assert out.shape == (0, 4, 64)


# ---------------------------------------------------------------- batch invariance
def _sequence_output(seqs, target, values, h, hkv, d, dtype, seed):
    """Output rows of sequence ``target`` when run inside the batch ``seqs``."""
    q, kc, vc, meta = make_batch(seqs, h, hkv, d, dtype, seed=seed, values={target: values})
    out = cpu_native.paged_attention(q, kc, vc, meta, d**-0.5)
    s = meta.query_start_loc
    return out[s[target]: s[target + 1]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,L", [(1, 1), (97, 1), (300, 1), (97, 97), (130, 17)])
# 9/3: a decode alone runs as one item per kv head; 4/1: alone, split per query head (2 threads)
@pytest.mark.parametrize("h,hkv", [(9, 3), (4, 1)])
def test_sequence_alone_equals_sequence_in_batch(dtype, n, L, h, hkv):
    d = 64
    g = torch.Generator().manual_seed(n * 31 + L)
    values = (torch.randn(L, h, d, generator=g).to(dtype), torch.randn(n, hkv, d, generator=g).to(dtype),
              torch.randn(n, hkv, d, generator=g).to(dtype))
    alone = _sequence_output([(n, L)], 0, values, h, hkv, d, dtype, seed=1)
    others = [(1 + 23 * i % 150, 1 if i % 3 else 1 + 11 * i % 40) for i in range(16)]
    others = [(max(nn, LL), LL) for nn, LL in others]
    for pos in (0, 7, 16):
        seqs = others[:pos] + [(n, L)] + others[pos:]
        assert len(seqs) == 17
        for n_threads in (1, 2):
            with threads(n_threads):
                got = _sequence_output(seqs, pos, values, h, hkv, d, dtype, seed=pos + 10)
            assert torch.equal(got, alone), f"position {pos}, {n_threads} threads"


def test_query_chunking_does_not_change_rows():
    """A prefill split into chunks (prefix cached, then a continuation) gives the same rows as
    the whole prefill, and a decode step the same row as the last query of a prefill."""
    h, hkv, d, n = 9, 3, 64, 150
    g = torch.Generator().manual_seed(11)
    q = torch.randn(n, h, d, generator=g)
    k = torch.randn(n, hkv, d, generator=g)
    v = torch.randn(n, hkv, d, generator=g)
    whole = _sequence_output([(n, n)], 0, (q, k, v), h, hkv, d, torch.float32, seed=2)
    for split in (1, 17, 100, n - 1):
        tail = _sequence_output([(n, n - split)], 0, (q[split:], k, v), h, hkv, d, torch.float32,
                                seed=3)
        assert torch.equal(tail, whole[split:]), f"continuation after {split} cached tokens"
    for n_threads in (1, 2):
        with threads(n_threads):
            again = _sequence_output([(n, n)], 0, (q, k, v), h, hkv, d, torch.float32, seed=4)
        assert torch.equal(again, whole)


# ---------------------------------------------------------------- errors
def _op_args(**over):
    q, kc, vc, meta = make_batch([(20, 3), (5, 1)], 4, 2, 64, seed=6)
    args = dict(q=q, k_cache=kc, v_cache=vc, block_tables=meta.block_tables,
                query_start_loc=torch.tensor(meta.query_start_loc),
                context_lens=torch.tensor(meta.context_lens), scale=0.125)
    args.update(over)
    return args


def _call(args):
    return torch.ops.fastinfer_cpu.paged_attention(
        args["q"], args["k_cache"], args["v_cache"], args["block_tables"],
        args["query_start_loc"], args["context_lens"], args["scale"])


def test_valid_op_args_run():
    assert _call(_op_args()).shape == (4, 4, 64)


@pytest.mark.parametrize("over,exc,match", [
    (lambda a: {"q": a["q"].double()}, TypeError, "q must be float32 or bfloat16"),
    (lambda a: {"k_cache": a["k_cache"].bfloat16()}, TypeError, "k_cache must have q's dtype"),
    (lambda a: {"q": a["q"][:, :, :48]}, ValueError, "k_cache must have D = 48"),
    (lambda a: {"q": a["q"][:, :3]}, ValueError, "multiple of the caches' kv head count"),
    (lambda a: {"q": a["q"][..., :40]}, ValueError, "multiple of 16, got 40"),
    (lambda a: {"q": a["q"].transpose(1, 2).contiguous().transpose(1, 2)}, ValueError, r"q's last dim must be contiguous"),
    (lambda a: {"v_cache": a["v_cache"][:-1]}, ValueError, "v_cache must have k_cache's shape"),
    (lambda a: {"k_cache": a["k_cache"].transpose(1, 2)}, ValueError, "k_cache must be contiguous"),
    (lambda a: {"block_tables": a["block_tables"].float()}, TypeError, "block_tables must be int32"),
    (lambda a: {"block_tables": a["block_tables"][:, :1]}, ValueError, "block_tables has 1 columns"),
    (lambda a: {"block_tables": a["block_tables"] + 100}, ValueError, r"block_tables\[0\]\[0\] = 1"),
    (lambda a: {"query_start_loc": torch.tensor([0, 3])}, ValueError, "query_start_loc must be 1-D of size 3"),
    (lambda a: {"query_start_loc": torch.tensor([0, 3, 5])}, ValueError, "from 0 to q.shape"),
    (lambda a: {"query_start_loc": torch.tensor([0, 3, 4.0])}, TypeError, "query_start_loc must be int32"),
    (lambda a: {"context_lens": torch.tensor([2, 5])}, ValueError, r"context_lens\[0\] = 2 must be >="),
    (lambda a: {"scale": float("inf")}, ValueError, "scale must be finite"),
])
def test_argument_errors(over, exc, match):
    args = _op_args()
    args.update(over(args))
    with pytest.raises(exc, match=match):
        _call(args)


def test_applies():
    q, kc, vc, meta = make_batch([(20, 3)], 4, 2, 64, seed=7)
    assert cpu_native.paged_attention_applies(q, kc, vc, meta, 0.125)
    assert cpu_native.paged_attention_applies(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), meta, 0.125)
    assert not cpu_native.paged_attention_applies(q.double(), kc.double(), vc.double(), meta, 0.125)
    assert not cpu_native.paged_attention_applies(q[..., :40], kc[..., :40], vc[..., :40], meta, 0.125)
    assert not cpu_native.paged_attention_applies(q, kc.bfloat16(), vc, meta, 0.125)
