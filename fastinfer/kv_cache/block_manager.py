"""``BlockManager``: the whole life of KV-cache blocks, by sequence. Knows nothing of tensors.

- **Prefix caching.** A full block is known by :func:`~fastinfer.kv_cache.events.block_hash`,
  chained over its parent's hash, its token ids and the sequence's ``cache_salt``. A sequence
  being admitted reuses the blocks of its longest cached prefix (:meth:`cached_prefix`, then
  :meth:`allocate`) and computes the rest; a prompt cached whole still computes its last block,
  so that there are logits to sample from and no shared block is ever written. Blocks become
  cached as soon as a step is scheduled to fill them (the step writes every layer's keys before
  any of its sequences attends, so a sequence admitted in the same step may already read them).
- **Copy-on-write.** :meth:`fork` shares a sequence's blocks with another (the ``n`` samples of a
  request); a sequence about to write into a block it shares gets a copy first (:meth:`grow`).
- **A host tier** (``host_blocks > 0``): a cached block evicted from the device pool is copied
  to host memory (LRU there too), and a later hit loads it back instead of recomputing it;
  :meth:`swap_out` / :meth:`swap_in` move a preempted sequence's blocks there and back.
- **The step's copies** (swap-outs, swap-ins, copy-on-write copies) are collected, in the order
  they were decided, while a step is scheduled and handed over by :meth:`take_ops`; the runner
  carries them out in that order before the step's forward pass.

Every operation is all-or-nothing: one that cannot get the blocks it needs returns None or
False and changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from fastinfer.kv_cache.block_pool import BlockPool
from fastinfer.kv_cache.events import DEVICE, HOST, EventLog, block_hash, partial_block_hash


class CachedSeq(Protocol):
    """What the block manager reads of a sequence (``fastinfer.scheduler.sequence.Sequence``):
    its token ids (a negative id is a token not known yet), the hashes of its full blocks
    computed so far (the manager extends the list) and the extra key of its hashes."""

    seq_id: int
    token_ids: list[int]
    block_hashes: list[int]
    cache_salt: str | None


SWAP_OUT, SWAP_IN, COPY = "swap_out", "swap_in", "copy"


@dataclass(slots=True)
class BlockOps:
    """Block copies a step needs before its forward pass, in the order they were decided (the
    order that is always right: a block evicted and reused in one step is read before it is
    overwritten), as runs of one kind: ``(kind, [(source, destination), ...])`` with kind
    ``"swap_out"`` (device -> host), ``"swap_in"`` (host -> device) or ``"copy"`` (device ->
    device, copy-on-write)."""

    runs: list[tuple[str, list[tuple[int, int]]]] = field(default_factory=list)

    def add(self, kind: str, pairs) -> None:
        if self.runs and self.runs[-1][0] == kind:
            self.runs[-1][1].extend(pairs)
        else:
            self.runs.append((kind, list(pairs)))

    def of(self, kind: str) -> list[tuple[int, int]]:
        """Every pair of one kind, in order."""
        return [p for k, pairs in self.runs if k == kind for p in pairs]

    @property
    def swap_out(self) -> list[tuple[int, int]]:
        return self.of(SWAP_OUT)

    @property
    def swap_in(self) -> list[tuple[int, int]]:
        return self.of(SWAP_IN)

    @property
    def copies(self) -> list[tuple[int, int]]:
        return self.of(COPY)

    def __bool__(self) -> bool:
        return bool(self.runs)


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    """The longest cached prefix of a sequence: device blocks, then host blocks to load back,
    then (after device blocks only) the first ``partial_tokens`` tokens of the kept, partly
    filled block ``partial``, which the sequence takes over as its next block."""

    device: list[int]
    host: list[int]
    block_size: int
    partial: int | None = None
    partial_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return (len(self.device) + len(self.host)) * self.block_size + self.partial_tokens


class BlockManager:
    """Block tables of sequences over a device pool of ``num_blocks`` blocks of ``block_size``
    token slots, with the prefix cache (``enable_caching``) and a host tier of ``host_blocks``
    blocks (0: none)."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True, host_blocks: int = 0) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.caching = enable_caching
        self.events = EventLog()
        self.pool = BlockPool(num_blocks, on_evict=self._offload)
        self.host = BlockPool(host_blocks, on_evict=self._host_evicted) if host_blocks > 0 else None
        self._tables: dict[int, list[int]] = {}
        self._registered: dict[int, int] = {}  # seq id -> leading blocks already offered to the cache
        self._swapped: dict[int, list[int]] = {}  # seq id -> the host blocks holding its keys and values
        self._ops = BlockOps()
        self._host_held: list[int] = []  # host blocks read by this step's swap-ins (freed by take_ops)
        self.prefix_queries = self.prefix_hits = 0  # tokens looked up at admission, and found
        self.host_loads = self.host_stores = 0  # blocks copied back from / out to the host tier
        # Partly filled last blocks of freed sequences, kept (free, in the LRU queue) under a
        # partial hash: hash -> (parent hash, salt); and how many are kept under each of those.
        self._partial: dict[int, tuple[int | None, str | None]] = {}
        self._partial_parents: dict[tuple[int | None, str | None], int] = {}
        # Bumped by reset_prefix_cache: a sequence admitted before holds keys and values that
        # may be stale (old weights) or unwritten (a failed step); it caches nothing more.
        self._epoch = 0
        self._seq_epoch: dict[int, int] = {}

    # ------------------------------------------------------------------ sizes
    @property
    def num_total(self) -> int:
        return self.pool.num_total

    @property
    def num_free(self) -> int:
        """Device blocks no sequence holds (cached ones included)."""
        return self.pool.num_free

    @property
    def num_cached(self) -> int:
        return self.pool.num_cached

    @property
    def host_total(self) -> int:
        return 0 if self.host is None else self.host.num_total

    @property
    def host_used(self) -> int:
        """Host blocks holding something: cached prefixes and swapped-out sequences."""
        return 0 if self.host is None else self.host.num_total - self.host.num_free + self.host.num_cached

    @property
    def num_swapped(self) -> int:
        return len(self._swapped)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: int) -> list[int]:
        """The blocks of ``seq_id`` in position order."""
        return self._tables[seq_id]

    def holds(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def is_swapped(self, seq_id: int) -> bool:
        return seq_id in self._swapped

    # ------------------------------------------------------------------ admission
    def cached_prefix(self, seq: CachedSeq) -> CachedPrefix:
        """The cached full blocks at the start of ``seq``, leaving at least its last token to
        compute."""
        if not self.caching:
            return CachedPrefix([], [], self.block_size)
        limit = (len(seq.token_ids) - 1) // self.block_size
        hashes = self._hashes(seq, limit)
        device, host = [], []
        cached = self.pool.cached
        for h in hashes[:limit]:
            b = cached.get(h)
            if b is None:
                break
            device.append(b)
        if self.host is not None:
            cached = self.host.cached
            for h in hashes[len(device):limit]:
                b = cached.get(h)
                if b is None:
                    break
                host.append(b)
        if host or not self._partial:
            return CachedPrefix(device, host, self.block_size)
        return self._partial_prefix(seq, device)

    def _partial_prefix(self, seq: CachedSeq, device: list[int]) -> CachedPrefix:
        """``device`` and, after it, the longest kept partly filled block that the next tokens of
        ``seq`` begin with (leaving its last token to compute)."""
        bs, i = self.block_size, len(device)
        parent = seq.block_hashes[i - 1] if i else None
        if (parent, seq.cache_salt) in self._partial_parents:
            tokens = seq.token_ids[i * bs:i * bs + bs - 1]
            for k in range(min(len(tokens), len(seq.token_ids) - 1 - i * bs), 0, -1):
                b = self.pool.cached.get(partial_block_hash(parent, tokens[:k], seq.cache_salt))
                if b is not None:
                    return CachedPrefix(device, [], bs, b, k)
        return CachedPrefix(device, [], bs)

    def allocate(self, seq: CachedSeq, prefix: CachedPrefix, num_tokens: int) -> bool:
        """Gives ``seq`` (holding no blocks) the blocks of ``prefix`` (from :meth:`cached_prefix`,
        this step) and fresh ones up to ``num_tokens`` tokens; the host blocks of the prefix are
        loaded back into fresh blocks. False (and no change) when too few blocks are free."""
        sid = seq.seq_id
        if sid in self._tables or sid in self._swapped:
            raise RuntimeError(f"internal error: sequence {sid} already holds blocks")
        pool, dev, host, part = self.pool, prefix.device, prefix.host, prefix.partial
        fresh = self.blocks_for(num_tokens) - len(dev)  # a kept partial block is one of them
        idle_hits = sum(1 for b in dev if pool.ref[b] == 0)  # free now, but not for fresh use
        if fresh + idle_hits > pool.num_free:
            return False
        pool.touch(dev)
        if part is not None:  # free; it leaves the cache: this sequence writes past its tokens
            pool.touch((part,))
            pool.uncache(part)
            fresh -= 1
        if host:
            self.host.touch(host)  # held until copied: an eviction in this step may not reuse them
            self._host_held.extend(host)
        new = ([] if part is None else [part]) + pool.allocate(fresh)
        table = dev + new
        self._seq_epoch[sid] = self._epoch
        self._tables[sid] = table
        if host:
            self._load(seq, host, new, len(dev))
        self._registered[sid] = len(dev) + len(host)
        self.prefix_queries += len(seq.token_ids)
        self.prefix_hits += prefix.num_tokens
        if self.caching:
            self._register(seq, num_tokens)
        return True

    def _load(self, seq: CachedSeq, host: list[int], dest: list[int], first: int) -> None:
        """Copies cached host blocks back into the device blocks ``dest`` (positions from
        ``first``) and caches them on the device again."""
        self._ops.add(SWAP_IN, zip(host, dest))
        self.host_loads += len(host)
        hashes = seq.block_hashes[first:first + len(host)]
        # each hash missed on the device at lookup, so each registers (reported as stored)
        stored = [i for i, (b, h) in enumerate(zip(dest, hashes)) if self.pool.register(b, h)]
        if self.events.enabled and len(stored) == len(hashes):
            bs = self.block_size
            self.events.stored(hashes, seq.block_hashes[first - 1] if first else None,
                               seq.token_ids[first * bs:(first + len(host)) * bs], bs)

    def reserve(self, seq_id: int, num_tokens: int) -> list[int]:
        """Blocks for ``num_tokens`` tokens of a private sequence outside the scheduler
        (perplexity windows, tests), never cached; raises when too few are free. Carry out
        :meth:`take_ops` before writing them (taking them may have evicted cached blocks to the
        host tier)."""
        if seq_id in self._tables or seq_id in self._swapped:
            raise RuntimeError(f"internal error: sequence {seq_id} already holds blocks")
        blocks = self.pool.allocate(self.blocks_for(num_tokens))
        if blocks is None:
            raise RuntimeError(f"cannot reserve {num_tokens} tokens for sequence {seq_id}: "
                               f"{self.pool.num_free} blocks free")
        self._tables[seq_id] = blocks
        self._registered[seq_id] = len(blocks)
        return blocks

    # ------------------------------------------------------------------ running sequences
    def grow(self, seq: CachedSeq, start: int, end: int) -> bool:
        """Makes the table of ``seq`` hold positions up to ``end`` for a step that writes
        ``[start, end)``: copies a block it shares before writing into it, adds blocks, and
        caches the full blocks that this step completes. False (and no change) when too few
        blocks are free."""
        sid, pool, bs = seq.seq_id, self.pool, self.block_size
        table = self._tables[sid]
        i = start // bs
        cow = i < len(table) and pool.ref[table[i]] > 1
        extra = -(-end // bs) - len(table)
        if extra < 0:
            extra = 0
        if extra or cow:
            if extra + cow > pool.num_free:
                return False
            if cow:
                old = table[i]
                table[i] = pool.allocate(1)[0]
                self._ops.add(COPY, ((old, table[i]),))
                pool.release((old,))
            if extra:
                table.extend(pool.allocate(extra))
        if self.caching and end // bs > self._registered[sid]:
            self._register(seq, end)
        return True

    def fork(self, parent: CachedSeq, child: CachedSeq, num_tokens: int) -> None:
        """Shares the blocks of ``parent`` that hold its first ``num_tokens`` tokens with
        ``child`` (holding none); the first write into a shared block copies it."""
        if child.seq_id in self._tables or child.seq_id in self._swapped:
            raise RuntimeError(f"internal error: sequence {child.seq_id} already holds blocks")
        blocks = self._tables[parent.seq_id][:self.blocks_for(num_tokens)]
        self.pool.touch(blocks)
        self._tables[child.seq_id] = list(blocks)
        self._seq_epoch[child.seq_id] = self._seq_epoch.get(parent.seq_id, self._epoch)
        self._registered[child.seq_id] = min(self._registered[parent.seq_id], num_tokens // self.block_size)

    def free(self, seq_id: int, seq: CachedSeq | None = None, computed: int = 0) -> None:
        """Drops every block of ``seq_id`` (its last blocks first, so they are evicted first)
        and any host copy of a swapped-out one; no-op for an unknown id. Given the sequence and
        its ``computed`` tokens (keys and values written), a partly filled last block that it
        alone holds stays cached under its tokens: the next turn of a conversation resends them
        and takes the block over instead of computing them again."""
        table = self._tables.pop(seq_id, None)
        self._registered.pop(seq_id, None)
        epoch = self._seq_epoch.pop(seq_id, None)
        if table and seq is not None and self.caching and computed % self.block_size and epoch == self._epoch:
            self._keep_partial(seq, table, computed)
        if table:
            self.pool.release(reversed(table))
        swapped = self._swapped.pop(seq_id, None)
        if swapped:
            self.host.release(swapped)

    def _keep_partial(self, seq: CachedSeq, table: list[int], computed: int) -> None:
        bs, i = self.block_size, computed // self.block_size
        if i >= len(table) or self.pool.ref[table[i]] != 1 or self.pool.hash_of[table[i]] is not None:
            return  # shared (a sibling sample may write it) or already cached
        tokens = seq.token_ids[i * bs:computed]
        if len(self._hashes(seq, i)) < i or min(tokens) < 0:
            return
        parent = seq.block_hashes[i - 1] if i else None
        h = partial_block_hash(parent, tokens, seq.cache_salt)
        if self.pool.register(table[i], h):
            key = (parent, seq.cache_salt)
            self._partial[h] = key
            self._partial_parents[key] = self._partial_parents.get(key, 0) + 1

    def _drop_partial(self, h: int) -> bool:
        """Forgets a kept partial block (being evicted); False for a full block's hash."""
        key = self._partial.pop(h, None)
        if key is None:
            return False
        left = self._partial_parents[key] - 1
        if left:
            self._partial_parents[key] = left
        else:
            del self._partial_parents[key]
        return True

    # ------------------------------------------------------------------ the host tier
    def swap_out(self, seq_id: int, keep_cached: bool = False) -> bool:
        """Moves the blocks of ``seq_id`` to the host tier (copied before the next forward pass)
        and frees them on the device; False (and no change) when the tier has no room.
        ``keep_cached``: only into host blocks that hold no cached prefix (else the tier's
        least recently used prefixes are evicted to make room)."""
        if self.host is None:
            return False
        table = self._tables[seq_id]
        room = self.host.num_free - (self.host.num_cached if keep_cached else 0)
        if len(table) > room:
            return False
        dest = self.host.allocate(len(table))
        self._ops.add(SWAP_OUT, zip(table, dest))
        self.host_stores += len(table)
        self._swapped[seq_id] = dest
        del self._tables[seq_id]
        self.pool.release(reversed(table))
        return True

    def can_swap_in(self, seq_id: int, end: int) -> bool:
        return max(len(self._swapped[seq_id]), self.blocks_for(end)) <= self.pool.num_free

    def swap_in(self, seq: CachedSeq, start: int, end: int) -> bool:
        """Loads a swapped-out sequence (its first ``start`` tokens computed) back into fresh
        device blocks, with room up to ``end``; False (and no change) when too few are free."""
        sid = seq.seq_id
        if not self.can_swap_in(sid, end):
            return False
        src = self._swapped.pop(sid)
        table = self.pool.allocate(max(len(src), self.blocks_for(end)))
        self._ops.add(SWAP_IN, zip(src, table))
        self.host_loads += len(src)
        self._host_held.extend(src)  # freed once this step's copies are issued
        self._tables[sid] = table
        self._registered[sid] = start // self.block_size
        if self.caching:
            self._register(seq, end)
        return True

    def _offload(self, block: int, h: int) -> None:
        """A cached device block is being evicted: tell the routers, and keep a copy on the
        host tier when there is one (the copy runs before the block is overwritten). A kept
        partial block is only forgotten (routers never heard of it)."""
        if self._drop_partial(h):
            return
        self.events.removed([h], DEVICE)
        host = self.host
        if host is None:
            return
        hb = host.cached.get(h)
        if hb is not None:
            if host.ref[hb] == 0:
                host.free.move_to_end(hb)  # most recently used again
            return
        dest = host.allocate(1)  # may evict the host tier's least recently used block
        if dest is None:
            return  # every host block holds a swapped-out sequence
        self._ops.add(SWAP_OUT, ((block, dest[0]),))
        self.host_stores += 1
        host.register(dest[0], h)
        host.release(dest)  # free, cached: at the back of the host tier's LRU queue
        self.events.stored([h], None, [], self.block_size, HOST)

    def _host_evicted(self, block: int, h: int) -> None:
        self.events.removed([h], HOST)

    # ------------------------------------------------------------------ per step
    def take_ops(self) -> BlockOps:
        """The copies the scheduled step needs (then cleared). Host blocks that were read by its
        swap-ins become free again: they can only be reused by a later step, whose copies run
        after these."""
        ops, self._ops = self._ops, BlockOps()
        if self._host_held:
            self.host.release(self._host_held)
            self._host_held = []
        return ops

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix (on the device and the host), e.g. after the weights
        changed; blocks in use stay with their sequences."""
        self._epoch += 1
        self.events.removed([h for h in self.pool.evict_all() if not self._drop_partial(h)], DEVICE)
        self.events.cleared(DEVICE)
        if self.host is not None:
            self.host.evict_all()
            self.events.cleared(HOST)

    # ------------------------------------------------------------------ hashing
    def _hashes(self, seq: CachedSeq, n: int) -> list[int]:
        """The hashes of at least the first ``n`` full blocks of ``seq`` (fewer when a block is
        not full or holds a token not known yet; more when an earlier call asked for more),
        computed once and kept on the sequence."""
        hashes, bs, tokens = seq.block_hashes, self.block_size, seq.token_ids
        while len(hashes) < n:
            i = len(hashes)
            block = tokens[i * bs:(i + 1) * bs]
            if len(block) < bs or min(block) < 0:
                break
            hashes.append(block_hash(hashes[-1] if hashes else None, block, seq.cache_salt))
        return hashes

    def _register(self, seq: CachedSeq, end: int) -> None:
        """Caches the full blocks of ``seq`` below position ``end`` not offered yet."""
        sid = seq.seq_id
        if self._seq_epoch.get(sid, self._epoch) != self._epoch:
            return  # admitted before the cache was reset
        done = self._registered[sid]
        full = end // self.block_size
        hashes = self._hashes(seq, full)  # may hold more (hashed for an earlier lookup)
        full = min(full, len(hashes))
        if full <= done:
            return
        table, pool = self._tables[sid], self.pool
        stored = [i for i in range(done, full) if pool.register(table[i], hashes[i])]
        self._registered[sid] = full
        if stored and self.events.enabled:
            bs = self.block_size
            for run in _runs(stored):
                self.events.stored([hashes[i] for i in run], hashes[run[0] - 1] if run[0] else None,
                                   seq.token_ids[run[0] * bs:(run[-1] + 1) * bs], bs)

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """Asserts every invariant (tests; O(blocks)): reference counts equal the tables'
        holdings, the free queues hold exactly the unreferenced blocks, the caches agree."""
        self.pool.check()
        held = [0] * self.pool.num_total
        for table in self._tables.values():
            for b in table:
                held[b] += 1
        assert held == self.pool.ref, "device reference counts differ from the block tables"
        if self.host is not None:
            self.host.check()
            hheld = [0] * self.host.num_total
            for blocks in (*self._swapped.values(), self._host_held):
                for b in blocks:
                    hheld[b] += 1
            assert hheld == self.host.ref, "host reference counts differ from the swapped sequences"
        assert not set(self._tables) & set(self._swapped), "a sequence both on the device and swapped out"
        assert all(self.pool.cached.get(h) is not None for h in self._partial), "a kept partial block lost its hash"
        assert sum(self._partial_parents.values()) == len(self._partial), "partial block counts out of step"


def _runs(indices: list[int]) -> list[list[int]]:
    """Consecutive runs of sorted ``indices``."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs
