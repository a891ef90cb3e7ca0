"""The native block pool and slot mapping (fastinfer._C)."""
import numpy as np
import pytest

from fastinfer._native import native


def test_allocate_and_free_round_trip():
    pool = native.BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert sorted(a + b) == list(range(8))
    assert pool.num_free == 0 and not pool.can_allocate(1)
    with pytest.raises(RuntimeError, match="asked for 1 blocks, 0 free"):
        pool.allocate(1)
    pool.free(a)
    assert pool.num_free == 3
    assert pool.allocate(3) == a  # FIFO: freed blocks come back in order


def test_refcount_keeps_shared_block_until_last_free():
    pool = native.BlockPool(2)
    (blk,) = pool.allocate(1)
    pool.incref([blk])
    assert pool.refcount(blk) == 2
    pool.free([blk])
    assert pool.num_free == 1
    pool.free([blk])
    assert pool.num_free == 2
    with pytest.raises(RuntimeError, match="not allocated"):
        pool.free([blk])
    with pytest.raises(IndexError):
        pool.refcount(7)


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


def test_bad_counts_are_refused_before_anything_changes():
    for n in (0, -1, -3):
        with pytest.raises(ValueError, match="num_blocks must be"):
            native.BlockPool(n)
    pool = native.BlockPool(4)
    with pytest.raises(ValueError, match="can_allocate: n must be >= 0, got -3"):
        pool.can_allocate(-3)
    with pytest.raises(ValueError, match="allocate: n must be >= 0"):
        pool.allocate(-1)
    assert pool.num_free == 4


def test_free_naming_a_block_twice_is_all_or_nothing():
    pool = native.BlockPool(4)
    a, b = pool.allocate(2)
    with pytest.raises(RuntimeError, match=f"block {a} is named 2 times but holds 1"):
        pool.free([b, a, a])
    assert pool.num_free == 2 and pool.refcount(a) == 1 and pool.refcount(b) == 1
    pool.incref([a])
    pool.free([a, a])  # two references, two drops: legal
    assert pool.refcount(a) == 0 and pool.num_free == 3
    with pytest.raises(RuntimeError, match="not allocated"):
        pool.incref([b, a])
    assert pool.refcount(b) == 1  # the refused incref changed nothing
