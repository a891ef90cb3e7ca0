"""The paged-attention op (every registered backend) against a dense float64 computation.

Batches mix a prefill (query = whole sequence), decodes (one query) and a continuation (a few
queries after cached context), with GQA, odd lengths (1, 17, block + 1) and shuffled blocks.
Tolerance: float32 atol/rtol 1e-5.
"""
from __future__ import annotations

import os

import math

import pytest
import torch

from fastinfer import ops
from fastinfer.common.metadata import AttentionMetadata

H, HKV, D, BS, NUM_BLOCKS = 6, 2, 16, 16, 40


def dense_attention(q, k, v, scale):
    """q [L, H, D] as the last L of n positions; k, v [n, HKV, D]; float64."""
    L, n = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(rep, dim=1)
    v = v.double().repeat_interleave(rep, dim=1)
    scores = torch.einsum("lhd,nhd->hln", q.double(), k) * scale
    pos_q = torch.arange(n - L, n).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(n).unsqueeze(0) > pos_q, -math.inf)
    return torch.einsum("hln,nhd->lhd", scores.softmax(-1), v)


def build_case(seqs: list[tuple[int, int]], seed: int = 0):
    """``seqs``: (context_len, query_len) per sequence. Returns inputs and dense expectations."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.full((NUM_BLOCKS, BS, HKV, D), float("nan"))  # unwritten slots must not be read
    v_cache = k_cache.clone()
    free = torch.randperm(NUM_BLOCKS, generator=g).tolist()
    tables, qs, expected, starts = [], [], [], [0]
    for n, L in seqs:
        blocks = [free.pop() for _ in range(-(-n // BS))]
        tables.append(blocks)
        k = torch.randn(n, HKV, D, generator=g)
        v = torch.randn(n, HKV, D, generator=g)
        slots = torch.tensor([blocks[p // BS] * BS + p % BS for p in range(n)])
        ops.reference.reshape_and_cache(k, v, k_cache, v_cache, slots)
        q = torch.randn(L, H, D, generator=g)
        qs.append(q)
        expected.append(dense_attention(q, k, v, D ** -0.5))
        starts.append(starts[-1] + L)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long), query_start_loc=starts,
        context_lens=[n for n, _ in seqs],
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        max_query_len=max(L for _, L in seqs))
    return torch.cat(qs), k_cache, v_cache, meta, torch.cat(expected)


CASES = {
    "prefill_only": [(17, 17)],
    "decode_only": [(1, 1), (BS, 1), (BS + 1, 1), (97, 1)],
    "mixed": [(33, 33), (BS + 1, 1), (40, 5), (1, 1), (97, 1)],
}


@pytest.mark.parametrize("impl", ops.implementations("paged_attention"), ids=lambda i: i.backend)
@pytest.mark.parametrize("case", sorted(CASES))
def test_paged_attention_matches_dense(impl, case):
    if impl.backend == "cuda" or (impl.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("a GPU backend: these cases are CPU tensors")
    q, k_cache, v_cache, meta, expected = build_case(CASES[case])
    out = impl.fn(q, k_cache, v_cache, meta, D ** -0.5)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_a_sequence_does_not_depend_on_its_batch():
    q, k_cache, v_cache, meta, _ = build_case(CASES["mixed"])
    batched = ops.paged_attention(q, k_cache, v_cache, meta, D ** -0.5)
    s, e = meta.query_start_loc[2], meta.query_start_loc[3]
    alone_meta = AttentionMetadata(meta.slot_mapping, [0, e - s], [meta.context_lens[2]],
                                   meta.block_tables[2:3], e - s)
    alone = ops.paged_attention(q[s:e], k_cache, v_cache, alone_meta, D ** -0.5)
    assert torch.equal(alone, batched[s:e])


@pytest.mark.parametrize("impl", ops.implementations("reshape_and_cache"), ids=lambda i: i.backend)
def test_cache_write_touches_only_its_slots(impl):
    dev = "cuda" if impl.backend == "cuda" else "cpu"
    k_cache = torch.zeros(4, BS, HKV, D, device=dev)
    v_cache = torch.zeros(4, BS, HKV, D, device=dev)
    key, value = torch.randn(3, HKV, D, device=dev), torch.randn(3, HKV, D, device=dev)
    slots = torch.tensor([5, BS + 1, 3 * BS + 15], device=dev)
    impl.fn(key, value, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, HKV, D), v_cache.view(-1, HKV, D)
    assert torch.equal(flat_k[slots], key) and torch.equal(flat_v[slots], value)
    untouched = torch.ones(4 * BS, dtype=torch.bool, device=dev)
    untouched[slots] = False
    assert not flat_k[untouched].any() and not flat_v[untouched].any()
