"""Preallocated paged KV-cache tensors, sized from a memory budget."""
from __future__ import annotations

import torch

from fastinfer.common import kv_format as kv
from fastinfer.common.kv_format import CacheLayer


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    """Bytes of keys and values of all layers for one block, in cache element type ``dtype``
    (a quantized type adds its float32 scale per token and kv head)."""
    return 2 * num_layers * block_size * num_kv_heads * kv.bytes_per_token_head(head_dim, dtype)


class KVCache:
    """Per-layer :class:`~fastinfer.common.kv_format.CacheLayer`: ``k``, ``v`` ``[num_blocks, block_size,
    num_kv_heads, head_dim]`` of ``dtype`` (the model's float type, or int8 / float8_e4m3fn
    codes, which add ``k_scale``, ``v_scale`` ``[num_blocks, block_size, num_kv_heads]``
    float32), all views of one preallocated tensor per element type."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self._storage = torch.empty(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                                    dtype=dtype, device=device)
        self._scales = None
        if kv.is_quantized(dtype):
            self._scales = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads,
                                       dtype=kv.SCALE_DTYPE, device=device)
        self.layers = [
            CacheLayer(self._storage[i, 0], self._storage[i, 1],
                       *((self._scales[i, 0], self._scales[i, 1]) if self._scales is not None else ()))
            for i in range(num_layers)
        ]

    @property
    def nbytes(self) -> int:
        scales = 0 if self._scales is None else self._scales.numel() * self._scales.element_size()
        return self._storage.numel() * self._storage.element_size() + scales
