"""A paged batch for attention tests: caches with shuffled blocks, NaN in every slot no
sequence owns, and the matching ``AttentionMetadata``."""
from __future__ import annotations

import torch

from fastinfer.common.metadata import AttentionMetadata


def paged_batch(seqs, h, hkv, d, bs, dtype=torch.float32, device="cpu", seed=0, spare_blocks=3, values=None):
    """``seqs``: (context_len, query_len) per sequence; the queries are the last ``query_len``
    positions. ``values`` maps a sequence index to fixed ``(q, k, v)`` tensors (to place one
    sequence into different batches). Returns ``q [T, h, d], k_cache, v_cache [blocks, bs, hkv,
    d], meta``."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n, _ in seqs]
    nblocks = sum(need) + spare_blocks
    k_cache = torch.full((nblocks, bs, hkv, d), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    free = torch.randperm(nblocks, generator=g).tolist()
    tables = torch.zeros(len(seqs), max(max(need), 1), dtype=torch.int64)
    qs, starts = [], [0]
    for i, (n, L) in enumerate(seqs):
        blocks = [free.pop() for _ in range(need[i])]
        tables[i, : need[i]] = torch.tensor(blocks, dtype=torch.int64)
        slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(n)], dtype=torch.int64)
        if values is not None and i in values:
            q, k, v = values[i]
        else:
            q, k, v = (torch.randn(*shape, d, generator=g).to(dtype) for shape in ((L, h), (n, hkv), (n, hkv)))
        k_cache.view(-1, hkv, d)[slots] = k
        v_cache.view(-1, hkv, d)[slots] = v
        qs.append(q)
        starts.append(starts[-1] + L)
    dev = torch.device(device)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64, device=dev), query_start_loc=starts,
        context_lens=[n for n, _ in seqs], block_tables=tables.to(dev),
        max_query_len=max(L for _, L in seqs))
    return torch.cat(qs).to(dev), k_cache.to(dev), v_cache.to(dev), meta
