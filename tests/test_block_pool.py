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


def test_pack_step_matches_python():
    """A step's host arrays in one call: what the runner's Python packing computed, for prefill,
    decode and verification rows (num_spec), rows without logits, and a slot off the cache."""
    bs = 4
    ids, starts, tables = [[7, 8, 9, 10, 11], [3], [4, 5, 6]], [0, 6, 2], [[5, 2], [1, 0, 9], [3, 6]]
    for needs, spec in (([], []), ([True, False, True], []), ([], [0, 0, 2]), ([False, True, True], [3, 0, 2])):
        out = native.pack_step(ids, starts, tables, needs, spec, bs, 32)
        flat, pos, slots, tab, qsl, ctx, qsl_list, ctx_list, max_len, last = out
        assert flat.tolist() == [t for row in ids for t in row]
        assert pos.tolist() == [p for s, row in zip(starts, ids) for p in range(s, s + len(row))]
        assert slots.tolist() == native.slot_mapping(tables, starts, [s + len(r) for s, r in zip(starts, ids)], bs).tolist()
        assert tab.dtype == np.int64 and tab.tolist() == [[5, 2, 0], [1, 0, 9], [3, 6, 0]]
        assert qsl.tolist() == qsl_list == [0, 5, 6, 9] and ctx.tolist() == ctx_list == [5, 7, 5]
        assert max_len == 5
        wanted = needs or [True] * 3
        ks = spec or [0] * 3
        assert last.tolist() == [r for e, w, k in zip(qsl_list[1:], wanted, ks) if w for r in range(e - 1 - k, e)]
    with pytest.raises(ValueError, match=r"a block table points outside the KV cache \(20 slots\)"):
        native.pack_step(ids, starts, tables, [], [], bs, 20)
    with pytest.raises(ValueError, match="needs 2 blocks, has 1"):
        native.pack_step([[1, 2, 3, 4, 5]], [0], [[1]], [], [], bs, 32)
    with pytest.raises(ValueError, match="one entry per sequence"):
        native.pack_step(ids, starts[:2], tables, [], [], bs, 32)
    for spec in ([0, 1, 0], [0, 0, -1]):  # more drafts than tokens, or a negative count
        with pytest.raises(ValueError, match="wants logits at its last"):
            native.pack_step(ids, starts, tables, [], spec, bs, 32)
    empty = native.pack_step([], [], [], [], [], bs, 32)
    assert [len(a) for a in empty[:3]] == [0, 0, 0] and empty[6] == [0] and empty[8] == 0 and len(empty[9]) == 0
