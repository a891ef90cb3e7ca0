"""``BlockPool``: the block ids of one memory tier, their reference counts, the free queue in
eviction order, and the prefix cache (hash <-> block) of full blocks.

A block is *free* when no sequence references it. A free block that holds a hashed full block
stays in the prefix cache and can be taken back (:meth:`touch`) until it is *evicted*: reused
for something else when the unhashed free blocks have run out. The free queue is an
``OrderedDict`` (O(1) removal of a cached block taken back, O(1) pop of the next victim):
unhashed blocks at its front (reused first: they hold nothing of value), hashed ones appended
at the back as they are freed, so the least recently used is evicted first.

The same class serves the device pool and the host tier (``BlockManager.host``).
Pure Python: with O(1) operations it stays far below the scheduler's time budget (see
``fastinfer bench sched``), which the native pool of earlier issues did not change.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable


class BlockPool:
    """Blocks ``[0, num_blocks)``. ``on_evict(block, hash)`` is called when a cached block is
    evicted, before it is handed out again (its content is still there)."""

    __slots__ = ("num_total", "ref", "hash_of", "cached", "free", "on_evict")

    def __init__(self, num_blocks: int, on_evict: Callable[[int, int], None] | None = None) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be an int >= 0, got {num_blocks!r}")
        self.num_total = num_blocks
        self.ref = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.on_evict = on_evict

    @property
    def num_free(self) -> int:
        """Blocks no sequence holds (cached ones included: they can be evicted)."""
        return len(self.free)

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    def allocate(self, n: int) -> list[int] | None:
        """``n`` blocks with one reference each, evicting cached ones in LRU order if need
        be; None (and no change) when fewer than ``n`` are free."""
        if n > len(self.free):
            return None
        out = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            h = self.hash_of[block]
            if h is not None:
                self._evict(block, h)
            self.ref[block] = 1
            out.append(block)
        return out

    def _evict(self, block: int, h: int) -> None:
        self.hash_of[block] = None
        del self.cached[h]
        if self.on_evict is not None:
            self.on_evict(block, h)

    def touch(self, blocks: Iterable[int]) -> None:
        """Takes one more reference on each block (a free cached block leaves the free queue)."""
        ref, free = self.ref, self.free
        for b in blocks:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """Drops one reference per block; a block that reaches zero becomes free (at the back
        of the queue when cached, at the front otherwise)."""
        ref, free, hash_of = self.ref, self.free, self.hash_of
        for b in blocks:
            r = ref[b] - 1
            if r < 0:
                raise RuntimeError(f"internal error: block {b} released more often than it was taken")
            ref[b] = r
            if r == 0:
                free[b] = None
                if hash_of[b] is None:
                    free.move_to_end(b, last=False)

    def lookup(self, h: int) -> int | None:
        """The block holding hash ``h``, or None."""
        return self.cached.get(h)

    def register(self, block: int, h: int) -> bool:
        """Puts a full block in the prefix cache; False when the hash is already cached (in
        another block) or the block already carries one."""
        if h in self.cached or self.hash_of[block] is not None:
            return False
        self.cached[h] = block
        self.hash_of[block] = h
        return True

    def uncache(self, block: int) -> None:
        """Takes ``block`` out of the prefix cache (its holder is about to write into it)."""
        h = self.hash_of[block]
        if h is not None:
            self._evict(block, h)

    def evict_all(self) -> list[int]:
        """Forgets every cached hash (blocks in use keep their content); returns the hashes."""
        hashes = list(self.cached)
        for block in self.cached.values():
            self.hash_of[block] = None
            if self.ref[block] == 0:
                self.free.move_to_end(block, last=False)
        self.cached.clear()
        return hashes

    def check(self) -> None:
        """Asserts the pool's invariants (tests; O(num_blocks))."""
        assert all(r >= 0 for r in self.ref), "negative reference count"
        assert set(self.free) == {b for b, r in enumerate(self.ref) if r == 0}, "free queue != unreferenced"
        assert all(self.hash_of[b] == h for h, b in self.cached.items()), "cache map out of step"
        assert sum(h is not None for h in self.hash_of) == len(self.cached), "stray block hash"
