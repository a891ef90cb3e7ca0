"""``BlockManager``: which KV-cache blocks each sequence holds. Knows nothing of tensors.

The free list and reference counts live in the native ``BlockPool`` (csrc/block_pool.cpp);
this class keeps the per-sequence block tables and answers the scheduler's questions.
"""
from __future__ import annotations

from fastinfer._native import native


class BlockManager:
    """Block tables of sequences (keyed by sequence id) over a pool of ``num_blocks`` blocks
    of ``block_size`` token slots each."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self._pool = native.BlockPool(num_blocks)
        self._tables: dict[int, list[int]] = {}

    @property
    def num_total(self) -> int:
        return self._pool.num_total

    @property
    def num_free(self) -> int:
        return self._pool.num_free

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, seq_id: int, num_tokens: int) -> int:
        """Blocks ``seq_id`` must add so that its table holds ``num_tokens`` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self._tables.get(seq_id, ())))

    def can_grow(self, seq_id: int, num_tokens: int) -> bool:
        """Whether enough blocks are free for ``seq_id`` to hold ``num_tokens`` tokens."""
        return self._pool.can_allocate(self.extra_blocks(seq_id, num_tokens))

    def grow(self, seq_id: int, num_tokens: int) -> None:
        """Allocates the blocks ``seq_id`` needs to hold ``num_tokens`` tokens (all or none)."""
        extra = self.extra_blocks(seq_id, num_tokens)
        if extra:
            self._tables.setdefault(seq_id, []).extend(self._pool.allocate(extra))
        else:
            self._tables.setdefault(seq_id, [])

    def free(self, seq_id: int) -> None:
        """Returns every block of ``seq_id`` to the pool (no-op for an unknown id)."""
        blocks = self._tables.pop(seq_id, None)
        if blocks:
            self._pool.free(blocks)

    def block_table(self, seq_id: int) -> list[int]:
        """The blocks of ``seq_id`` in position order."""
        return self._tables[seq_id]
