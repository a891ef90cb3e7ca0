"""The block manager alone (no model): prefix caching, copy-on-write, the host tier, and a
seeded fuzzer that checks every invariant after each of thousands of random operations."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from fastinfer.kv_cache.block_manager import BlockManager
from fastinfer.kv_cache.block_pool import BlockPool
from fastinfer.kv_cache.events import BlockRemoved, BlockStored, block_hash, partial_block_hash


@dataclass(eq=False)
class Seq:
    seq_id: int
    token_ids: list[int]
    block_hashes: list[int] = field(default_factory=list)
    cache_salt: str | None = None


def admit(bm: BlockManager, seq: Seq, end: int | None = None) -> int:
    """Admits ``seq`` after its cached prefix up to ``end`` (default: all its tokens); returns the
    cached tokens."""
    prefix = bm.cached_prefix(seq)
    assert bm.allocate(seq, prefix, end or len(seq.token_ids))
    return prefix.num_tokens


def test_hash_is_chained_and_salted():
    a = block_hash(None, [1, 2, 3, 4])
    assert a == block_hash(None, [1, 2, 3, 4])  # deterministic (not Python's salted hash)
    assert a != block_hash(None, [1, 2, 3, 5])
    assert block_hash(a, [5, 6, 7, 8]) != block_hash(None, [5, 6, 7, 8])
    assert block_hash(None, [1, 2, 3, 4], "tenant-a") != a


def test_a_repeated_prompt_reuses_its_full_blocks_but_the_last_token():
    bm = BlockManager(16, 4)
    first = Seq(0, list(range(10)))
    assert admit(bm, first) == 0
    assert bm.num_cached == 2  # positions 0..7: two full blocks
    second = Seq(1, list(range(10)))
    assert admit(bm, second) == 8
    assert bm.block_table(1)[:2] == bm.block_table(0)[:2]
    whole = Seq(2, list(range(8)))  # cached whole: its last block is computed again
    assert admit(bm, whole) == 4
    assert bm.prefix_queries == 28 and bm.prefix_hits == 12
    other_salt = Seq(3, list(range(10)), cache_salt="x")
    assert admit(bm, other_salt) == 0
    bm.check()


def test_unreferenced_cached_blocks_are_evicted_lru_first():
    bm = BlockManager(4, 2)
    old, new = Seq(0, [1, 2, 3]), Seq(1, [7, 8, 9])
    admit(bm, old)
    bm.free(0)
    admit(bm, new)
    bm.free(1)
    assert bm.num_free == 4 and bm.num_cached == 2
    big = Seq(2, [5, 5, 5, 5, 5])  # 3 blocks: the 2 uncached free ones and the LRU cached one
    admit(bm, big)
    assert bm.cached_prefix(Seq(3, [1, 2, 3])).num_tokens == 0  # old's block went
    assert bm.cached_prefix(Seq(4, [7, 8, 9])).num_tokens == 2  # new's is still there
    bm.free(2)
    bm.check()


def test_fork_shares_blocks_and_copies_the_shared_block_it_writes():
    bm = BlockManager(8, 4)
    parent, child = Seq(0, list(range(6))), Seq(1, list(range(6)))
    admit(bm, parent)
    bm.take_ops()
    bm.fork(parent, child, 6)
    assert bm.block_table(1) == bm.block_table(0) and bm.pool.ref[bm.block_table(0)[1]] == 2
    assert bm.grow(child, 5, 6)  # rewrites position 5, in the shared partial block
    ops = bm.take_ops()
    assert ops.copies == [(bm.block_table(0)[1], bm.block_table(1)[1])]
    assert bm.block_table(1)[0] == bm.block_table(0)[0]  # the full block stays shared
    parent.token_ids.append(9)
    assert bm.grow(parent, 6, 7)  # the parent's block is its own again: no copy
    assert not bm.take_ops().copies
    bm.check()


def test_grow_is_all_or_nothing():
    bm = BlockManager(2, 2)
    s = Seq(0, [1, 2, 3])
    admit(bm, s)
    assert not bm.grow(s, 3, 6)  # needs a third block
    assert len(bm.block_table(0)) == 2 and bm.num_free == 0
    bm.check()


def test_evicted_blocks_go_to_the_host_tier_and_come_back():
    bm = BlockManager(3, 2, host_blocks=4)
    bm.events.enabled = True
    a = Seq(0, [1, 2, 3, 4, 5])
    admit(bm, a)
    bm.free(0)
    bm.take_ops()
    b = Seq(1, [9, 9, 9, 9, 9, 9])  # takes every device block: a's two cached blocks are evicted
    admit(bm, b)
    ops = bm.take_ops()
    assert len(ops.swap_out) == 2 and bm.host.num_cached == 2
    bm.free(1)
    again = Seq(2, [1, 2, 3, 4, 5])
    prefix = bm.cached_prefix(again)
    assert prefix.num_tokens == 4 and len(prefix.host) == 2
    assert bm.allocate(again, prefix, 5)
    ops = bm.take_ops()
    assert [h for h, _ in ops.swap_in] == prefix.host and bm.host_loads == 2
    kinds = [type(e) for batch in [bm.events.take()] for e in batch.events]
    assert BlockStored in kinds and BlockRemoved in kinds
    bm.check()


def test_swap_out_and_in_keep_the_table_length():
    bm = BlockManager(4, 2, host_blocks=4)
    s = Seq(0, [1, 2, 3])
    admit(bm, s)
    assert bm.swap_out(0) and bm.is_swapped(0) and bm.num_free == 4
    ops = bm.take_ops()
    assert len(ops.swap_out) == 2
    s.token_ids.append(4)
    assert bm.swap_in(s, 3, 4)
    assert len(bm.block_table(0)) == 2 and len(bm.take_ops().swap_in) == 2
    bm.check()


def test_pool_refuses_a_double_release():
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    pool.release(blocks)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(blocks)


class Memory:
    """What the blocks hold: each device and host slot the token whose key it stores. Writes
    are queued like a step's forward pass and land after the step's block copies."""

    def __init__(self, bm: BlockManager) -> None:
        self.bm, bs = bm, bm.block_size
        self.dev = [[None] * bs for _ in range(bm.num_total)]
        self.host = [[None] * bs for _ in range(bm.host_total)]
        self.writes: list[tuple[Seq, int, int]] = []

    def write(self, seq: Seq, start: int, end: int) -> None:
        self.writes.append((seq, start, end))

    def pending(self, seq: Seq) -> bool:
        return any(w[0] is seq for w in self.writes)

    def step(self) -> None:
        """The runner: the step's block copies in order, then the forward pass's writes."""
        for kind, pairs in self.bm.take_ops().runs:
            for a, b in pairs:
                if kind == "swap_out":
                    self.host[b] = list(self.dev[a])
                elif kind == "swap_in":
                    self.dev[b] = list(self.host[a])
                else:
                    self.dev[b] = list(self.dev[a])
        bs = self.bm.block_size
        for seq, start, end in self.writes:
            table = self.bm.block_table(seq.seq_id)
            for pos in range(start, end):
                self.dev[table[pos // bs]][pos % bs] = seq.token_ids[pos]
        self.writes = []

    def check(self, seq: Seq, computed: int) -> None:
        bs, table = self.bm.block_size, self.bm.block_table(seq.seq_id)
        held = [self.dev[table[p // bs]][p % bs] for p in range(computed)]
        assert held == seq.token_ids[:computed], f"sequence {seq.seq_id} reads keys of other tokens"


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_every_invariant(seed):
    """Thousands of random allocate / append / fork / free / evict / swap-out (keeping cached
    prefixes or not) / swap-in steps over a small vocabulary (so prefixes repeat), checking the
    invariants after each and, after each simulated step, that every sequence's blocks hold its
    own tokens' keys and every cached block (device or host) the tokens its hash was made from
    (cache hits, host reloads, copies and swaps included); at the end everything is freed and
    the pools are back where they started. Counts show that each path ran."""
    rng = random.Random(seed)
    bm = BlockManager(24, 4, host_blocks=(16, 32, 16, 32, 0, 24)[seed])
    bm.events.enabled = True
    mem = Memory(bm)
    live: dict[int, tuple[Seq, int]] = {}  # seq id -> (sequence, tokens computed)
    swapped: dict[int, tuple[Seq, int]] = {}
    ids = iter(range(10**9))
    fresh = iter(range(100, 10**9))  # tokens no other sequence has
    known: dict[int, list[int]] = {}  # block hash -> the tokens it was made from
    history: list[list[int]] = []  # the tokens of the last sequences that were freed

    def gone(sid: int) -> None:
        """Frees a sequence whose writes all landed; its partly filled last block may be kept."""
        s, done = live.pop(sid)
        history.append(list(s.token_ids))
        del history[:-40]
        bm.free(sid, s, done)
        i, bs = done // bm.block_size, bm.block_size
        if done % bs and len(s.block_hashes) >= i:
            h = partial_block_hash(s.block_hashes[i - 1] if i else None, s.token_ids[i * bs:done])
            if h in bm.pool.cached:
                known[h] = s.token_ids[i * bs:done]
    seen = {"hit_blocks": 0, "partial_hits": 0, "host_loads": 0, "evictions": 0, "swap_outs": 0, "swap_ins": 0}

    def learn(seq: Seq) -> None:
        bs = bm.block_size
        for i, h in enumerate(seq.block_hashes):
            known[h] = seq.token_ids[i * bs:(i + 1) * bs]

    def new_seq(tokens: list[int] | None = None) -> Seq | None:
        if tokens is None:
            # a few common beginnings, or (half the time) one of a sequence that left: its
            # blocks may still be cached on the device or in the host tier
            base = rng.choice([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [5] * 8, []])
            if history and rng.random() < 0.5:
                base = rng.choice(history)
                base = base[:rng.randint(len(base) // 2, len(base))] + [0] * 8
            tokens = base[:rng.randint(0, len(base))] + [rng.randint(0, 3) for _ in range(rng.randint(1, 9))]
        s = Seq(next(ids), tokens)
        prefix = bm.cached_prefix(s)
        assert prefix.num_tokens < len(s.token_ids)
        end = rng.randint(prefix.num_tokens + 1, len(s.token_ids))  # a first chunk, or all of it
        if not bm.allocate(s, prefix, end):
            return None
        learn(s)
        seen["hit_blocks"] += len(prefix.device) + len(prefix.host)
        seen["partial_hits"] += prefix.partial is not None
        seen["host_loads"] += len(prefix.host)
        live[s.seq_id] = (s, end)
        mem.write(s, prefix.num_tokens, end)
        return s

    def evict() -> None:
        """A throwaway sequence of new tokens, computed and freed: it pushes the least recently
        used cached blocks out of the device pool (into the host tier)."""
        s = new_seq([next(fresh) for _ in range(rng.randint(4, 16))])
        if s is not None:
            mem.step()
            gone(s.seq_id)

    def append() -> None:
        s, done = live[rng.choice(list(live))]
        known_len = len(s.token_ids)  # a prompt admitted in part has tokens past ``done``
        s.token_ids.extend(rng.randint(0, 3) for _ in range(rng.randint(1, 5)))
        if bm.grow(s, done, len(s.token_ids)):
            learn(s)
            live[s.seq_id] = (s, len(s.token_ids))
            mem.write(s, done, len(s.token_ids))
        else:
            del s.token_ids[known_len:]  # a sequence's tokens never change; only new ones go
            del s.block_hashes[known_len // bm.block_size:]

    def fork() -> None:
        parent, done = live[rng.choice(list(live))]
        if mem.pending(parent):  # the engine forks a sample only from a computed prompt
            return
        child = Seq(next(ids), list(parent.token_ids))
        bm.fork(parent, child, done)
        if bm.grow(child, done - 1, done):  # the sample recomputes the last prompt token
            learn(child)
            live[child.seq_id] = (child, done)
            mem.write(child, done - 1, done)
        else:
            bm.free(child.seq_id)

    def leave(sid: int) -> None:
        """Free or swap out: the engine does either only to a sequence not in the step being
        scheduled."""
        if mem.pending(live[sid][0]):
            mem.step()
        if rng.random() < 0.4:
            gone(sid)
        elif bm.swap_out(sid, keep_cached=rng.random() < 0.5):
            swapped[sid] = live.pop(sid)
            seen["swap_outs"] += 1

    def swap_in() -> None:
        sid = rng.choice(list(swapped))
        s, done = swapped[sid]
        if bm.swap_in(s, done, done):
            live[sid] = swapped.pop(sid)
            seen["swap_ins"] += 1

    def check_cached() -> None:
        for h, b in bm.pool.cached.items():  # a kept partial block: its first tokens
            assert mem.dev[b][:len(known[h])] == known[h], f"device block {b} does not hold its hash's tokens"
        if bm.host is not None:
            for h, b in bm.host.cached.items():
                assert mem.host[b] == known[h], f"host block {b} does not hold its hash's tokens"

    for _ in range(2500):
        choices = [new_seq, new_seq] + ([append, append, fork] if live else []) + ([swap_in] if swapped else [])
        r = rng.random()
        if r < 0.01:
            bm.reset_prefix_cache()
        elif r < 0.06:
            evict()
        elif live and (r < 0.25 or (bm.num_free < 6 and r < 0.6)):  # leaves more often when full
            leave(rng.choice(list(live)))
        else:
            rng.choice(choices)()
        if rng.random() < 0.3:
            mem.step()
            batch = bm.events.take()
            seen["evictions"] += sum(isinstance(e, BlockRemoved) and e.medium == "GPU"
                                     for e in (batch.events if batch else []))
            for s, done in live.values():
                mem.check(s, done)
            check_cached()
        bm.check()
    for sid in list(live) + list(swapped):
        bm.free(sid)
    bm.take_ops()
    bm.check()
    assert bm.num_free == bm.num_total and all(r == 0 for r in bm.pool.ref)
    if bm.host is not None:
        assert bm.host.num_free == bm.host.num_total
        assert seen["host_loads"] >= 1 and seen["swap_outs"] >= 50 and seen["swap_ins"] >= 50, seen
    assert seen["hit_blocks"] >= 40 and seen["partial_hits"] >= 5 and seen["evictions"] >= 100, seen


def test_a_kept_partial_block_is_taken_over_even_as_the_last_free_one():
    """The next turn takes the kept block itself (no copy): a first chunk that needs every
    block of the pool still fits."""
    bm = BlockManager(4, 4)
    first = Seq(0, [1, 2, 3, 4, 5, 6, 7])  # 5 prompt tokens + 2 sampled; the last never computed
    admit(bm, first)
    bm.free(0, first, 6)
    assert bm.num_cached == 2  # block 0 (full) and block 1 (tokens 5, 6 kept)
    nxt = Seq(1, first.token_ids + [8] * 8)  # 15 tokens: 4 blocks
    prefix = bm.cached_prefix(nxt)
    assert prefix.device == [0] and prefix.partial is not None and prefix.num_tokens == 6
    assert bm.allocate(nxt, prefix, 15) and not bm.take_ops()  # taken over: nothing to copy
    # it left the cache as a partial block, and is cached again as the full block it becomes
    assert bm.block_table(1)[1] == prefix.partial and bm.pool.hash_of[prefix.partial] == nxt.block_hashes[1]
    assert bm.cached_prefix(Seq(2, first.token_ids[:6] + [9])).partial is None
    bm.check()


def test_sequences_admitted_before_a_reset_cache_nothing_more():
    """After reset_prefix_cache (new weights, a failed step) a running sequence's keys and
    values may be stale or unwritten: neither its partial block nor a full block it completes
    is cached."""
    bm = BlockManager(8, 4)
    s = Seq(0, [1, 2, 3, 4, 5, 6])
    admit(bm, s)
    bm.reset_prefix_cache()
    s.token_ids.extend([7, 8, 9])
    assert bm.grow(s, 6, 9) and bm.num_cached == 0  # completes block 1: not cached
    bm.free(0, s, 9)
    assert bm.num_cached == 0  # nor its partial block 2
    fresh = Seq(1, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    admit(bm, fresh)
    bm.free(1, fresh, 10)
    assert bm.num_cached == 3  # a sequence admitted after the reset caches as usual
    bm.check()


def test_partial_hashes_keep_tokens_and_salt_apart():
    assert partial_block_hash(None, [5, 256]) != partial_block_hash(None, [5], "\x01\x00\x00\x00\x00\x00\x00")
    assert partial_block_hash(None, [5, 6]) != block_hash(None, [5, 6])
