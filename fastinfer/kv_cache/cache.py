"""Preallocated paged KV-cache tensors, sized from a memory budget."""
from __future__ import annotations

import torch

from fastinfer.common import kv_format as kv
from fastinfer.common.kv_format import CacheLayer
from fastinfer.kv_cache.block_manager import SWAP_IN, SWAP_OUT, BlockOps


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
        self._host = self._host_scales = None  # the host tier (attach_host)
        self.host_blocks = 0
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

    def attach_host(self, num_blocks: int) -> None:
        """Allocates the host tier: ``num_blocks`` blocks in host memory (pinned when the cache
        is on a GPU, so that copies run asynchronously), laid out block-major
        (``[block, layer, k/v, ...]``) so that each block is one contiguous chunk there."""
        pin = self._storage.device.type == "cuda"
        shape = (num_blocks, *self._storage.shape[:2], *self._storage.shape[3:])
        self._host = torch.empty(shape, dtype=self.dtype, pin_memory=pin)
        self._host_scales = None
        if self._scales is not None:
            sshape = (num_blocks, *self._scales.shape[:2], *self._scales.shape[3:])
            self._host_scales = torch.zeros(sshape, dtype=self._scales.dtype, pin_memory=pin)
        self.host_blocks = num_blocks

    @property
    def host_nbytes(self) -> int:
        host = self._host
        if host is None:
            return 0
        scales = 0 if self._host_scales is None else self._host_scales.numel() * self._host_scales.element_size()
        return host.numel() * host.element_size() + scales

    def apply(self, ops: BlockOps) -> None:
        """Carries out a step's block copies in their order, each run of one kind at once:
        device -> host (``swap_out``), host -> device (``swap_in``), device -> device
        (``copy``, copy-on-write). On a GPU the host copies are asynchronous on the current
        stream: a gather on the device, then one transfer per run of consecutive host blocks,
        to or from the pinned tier; so they are ordered before the step's kernels and the host
        does not wait for them."""
        for kind, pairs in ops.runs:
            for part in _independent(pairs):
                self._apply(kind, part)

    def _apply(self, kind: str, pairs: list[tuple[int, int]]) -> None:
        """One run of copies that may all happen at once."""
        src, dst = _columns(pairs)
        for dev, host in ((self._storage, self._host), (self._scales, self._host_scales)):
            if dev is None:
                continue
            if kind == SWAP_OUT:
                _to_host(dev, host, src, dst)
            elif kind == SWAP_IN:
                _to_device(host, dev, src, dst)
            else:
                dev.index_copy_(2, _index(dst, dev.device), dev.index_select(2, _index(src, dev.device)))


def _to_host(dev: torch.Tensor, host: torch.Tensor, src: list[int], dst: list[int]) -> None:
    """Device blocks ``src`` (``[layer, k/v, block, ...]``) into host blocks ``dst``
    (``[block, layer, k/v, ...]``: each block one contiguous chunk)."""
    moved = dev.index_select(2, _index(src, dev.device)).movedim(2, 0).contiguous()
    if dev.is_cuda:
        for i, h, n in _runs(dst):
            host[h:h + n].copy_(moved[i:i + n], non_blocking=True)
    else:
        host.index_copy_(0, _index(dst, host.device), moved)


def _to_device(host: torch.Tensor, dev: torch.Tensor, src: list[int], dst: list[int]) -> None:
    """Host blocks ``src`` into device blocks ``dst``."""
    if dev.is_cuda:
        loaded = torch.empty((len(src), *host.shape[1:]), dtype=host.dtype, device=dev.device)
        for i, h, n in _runs(src):
            loaded[i:i + n].copy_(host[h:h + n], non_blocking=True)
    else:
        loaded = host.index_select(0, _index(src, host.device))
    dev.index_copy_(2, _index(dst, dev.device), loaded.movedim(0, 2))


def _independent(pairs: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """``pairs`` cut where a pair writes a block that an earlier pair of the run wrote or
    read, so that each piece may be copied at once (a gather, then a scatter) with the result
    of copying pair by pair in order (e.g. a host block evicted and reused within one step)."""
    pieces: list[list[tuple[int, int]]] = [[]]
    read: set[int] = set()
    written: set[int] = set()
    for a, b in pairs:
        if b in written or b in read or a in written:
            pieces.append([])
            read, written = set(), set()
        pieces[-1].append((a, b))
        read.add(a)
        written.add(b)
    return pieces


def _columns(pairs: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    return [a for a, _ in pairs], [b for _, b in pairs]


def _index(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64).to(device, non_blocking=True)


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """``ids`` cut into runs of consecutive values: (offset in ``ids``, first value, length)."""
    runs: list[tuple[int, int, int]] = []
    for i, v in enumerate(ids):
        if runs and runs[-1][1] + runs[-1][2] == v:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((i, v, 1))
    return runs
