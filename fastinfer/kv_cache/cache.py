"""Preallocated paged KV-cache tensors, sized from a memory budget."""
from __future__ import annotations

import re

import torch

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: int | str) -> int:
    """``2147483648``, ``"2GiB"``, ``"512MB"`` -> bytes; bad input raises ValueError."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"kv_cache_memory must be bytes or a size like '2GiB', got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    """Bytes of keys and values of all layers for one block."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * elem


class KVCache:
    """Per-layer ``(k_cache, v_cache)``, each ``[num_blocks, block_size, num_kv_heads, head_dim]``,
    views of one preallocated tensor."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self._storage = torch.empty(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                                    dtype=dtype, device=device)
        self.layers = [(self._storage[i, 0], self._storage[i, 1]) for i in range(num_layers)]

    @property
    def nbytes(self) -> int:
        return self._storage.numel() * self._storage.element_size()
