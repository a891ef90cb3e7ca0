"""``KVCache.apply``: a step's block copies (swap-out, swap-in, copy-on-write) move every layer's
keys, values and (quantized cache) scales, with the result of copying pair by pair in order."""
from __future__ import annotations

import pytest
import torch

from fastinfer.kv_cache.block_manager import COPY, SWAP_IN, SWAP_OUT, BlockOps
from fastinfer.kv_cache.cache import KVCache


def pair_by_pair(dev: list[torch.Tensor], host: list[torch.Tensor], ops: BlockOps) -> None:
    """The reference: each copy on its own, in order (dev ``[L, 2, N, ...]``, host ``[N, L, 2, ...]``)."""
    for kind, pairs in ops.runs:
        for a, b in pairs:
            for d, h in zip(dev, host):
                if kind == SWAP_OUT:
                    h[b] = d[:, :, a]
                elif kind == SWAP_IN:
                    d[:, :, b] = h[a]
                else:
                    d[:, :, b] = d[:, :, a].clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8], ids=str)
def test_copies_match_pair_by_pair_in_order(dtype):
    cache = KVCache(num_layers=2, num_blocks=6, block_size=4, num_kv_heads=2, head_dim=8, dtype=dtype,
                    device=torch.device("cpu"))
    cache.attach_host(5)
    torch.manual_seed(0)
    tensors = [t for t in (cache._storage, cache._scales, cache._host, cache._host_scales) if t is not None]
    for t in tensors:
        t.copy_(torch.randint(-100, 100, t.shape) if dtype == torch.int8 else torch.randn(t.shape))
    ops = BlockOps()
    ops.add(SWAP_OUT, [(0, 1), (3, 2), (4, 1)])  # host block 1 written twice: the later wins
    ops.add(SWAP_IN, [(1, 0), (2, 5)])            # reads what this step's swap-outs wrote
    ops.add(COPY, [(1, 3), (3, 4)])               # a chain: 4 gets 1's content through 3
    dev = [cache._storage.clone()] + ([cache._scales.clone()] if cache._scales is not None else [])
    host = [cache._host.clone()] + ([cache._host_scales.clone()] if cache._host_scales is not None else [])
    pair_by_pair(dev, host, ops)
    cache.apply(ops)
    assert torch.equal(cache._storage, dev[0]) and torch.equal(cache._host, host[0])
    if dtype == torch.int8:
        assert torch.equal(cache._scales, dev[1]) and torch.equal(cache._host_scales, host[1])
    assert cache.layers[0].k.data_ptr() == cache._storage[0, 0].data_ptr()  # views still see it
