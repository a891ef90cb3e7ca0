"""The block pool (fastinfer.kv_cache.block_pool) and the native slot mapping (fastinfer._C)."""
import numpy as np
import pytest

from fastinfer._native import native
from fastinfer.kv_cache.block_pool import BlockPool


def test_allocate_and_release_round_trip():
    pool = BlockPool(8)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free == 5 and all(pool.ref[b] == 1 for b in a)
    assert pool.allocate(6) is None and pool.num_free == 5  # all or nothing
    pool.release(a)
    assert pool.num_free == 8
    pool.check()


def test_shared_block_stays_until_its_last_reference_goes():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.touch([b])
    pool.release([b])
    assert pool.ref[b] == 1 and b not in pool.free
    pool.release([b])
    assert pool.ref[b] == 0 and b in pool.free


def test_cached_free_blocks_are_evicted_last_and_lru_first():
    evicted = []
    pool = BlockPool(4, on_evict=lambda b, h: evicted.append(h))
    blocks = pool.allocate(4)
    for b, h in zip(blocks[:2], (11, 22)):
        assert pool.register(b, h)
    assert not pool.register(blocks[2], 11)  # one block per hash
    pool.release([blocks[0], blocks[1], blocks[2], blocks[3]])
    assert pool.lookup(11) == blocks[0] and pool.num_cached == 2
    pool.allocate(2)  # the two unhashed blocks go first
    assert evicted == []
    pool.touch([blocks[1]])  # a cache hit takes hash 22 back out of the free queue (O(1))
    pool.allocate(1)
    assert evicted == [11] and pool.lookup(11) is None and pool.lookup(22) == blocks[1]
    pool.check()


def test_bad_counts_are_refused():
    for n in (-1, 1.5):
        with pytest.raises(ValueError, match="num_blocks"):
            BlockPool(n)


def test_slot_mapping_matches_python():
    bs = 4
    tables = [[5, 2, 7], [1], [3, 0]]
    starts, ends = [0, 2, 6], [9, 3, 7]
    got = native.slot_mapping(tables, starts, ends, bs)
    want = [t[p // bs] * bs + p % bs for t, s, e in zip(tables, starts, ends) for p in range(s, e)]
    assert got.dtype == np.int64 and got.tolist() == want
    with pytest.raises(ValueError, match="needs 3 blocks, has 1"):
        native.slot_mapping([[1]], [0], [9], bs)


def test_pack_block_tables_pads():
    out = native.pack_block_tables([[1, 2, 3], [4]], -1)
    assert out.shape == (2, 3) and out.tolist() == [[1, 2, 3], [4, -1, -1]]
