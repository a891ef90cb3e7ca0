"""KV events: what a cache-aware router between replicas needs to know of one engine's cache.

The engine publishes the hashes of the full blocks it stores and removes, in batches, close to
vLLM's KV events (``vllm.distributed.kv_events``): ``BlockStored`` (hashes, the parent block's
hash, the blocks' token ids, the block size, an adapter id, the medium) and ``BlockRemoved``
(hashes, medium), plus ``AllBlocksCleared``. ``medium`` is ``"GPU"`` for the device pool (the
engine's working cache, even when that is RAM on a CPU) and ``"CPU"`` for the host tier, as in
vLLM. Block hashes are 128-bit integers, the same in every process for the same tokens and
extra key (:func:`block_hash`), so two replicas agree on them.
"""
from __future__ import annotations

import hashlib
import time
from array import array
from dataclasses import dataclass, field

DEVICE = "GPU"
HOST = "CPU"


def block_hash(parent: int | None, token_ids, extra: str | None = None) -> int:
    """The hash of a full block: chained over its parent's hash, its token ids and an extra
    key (a cache salt, an adapter, a model version). BLAKE2b, 128 bits: a collision would
    serve one prompt another's keys, so the hash is wide and not Python's (which is salted
    per process for strings)."""
    h = hashlib.blake2b(digest_size=16)
    h.update((parent or 0).to_bytes(16, "little"))
    h.update(array("q", token_ids).tobytes())
    if extra:
        h.update(b"\0" + extra.encode())
    return int.from_bytes(h.digest(), "little")


def partial_block_hash(parent: int | None, token_ids, extra: str | None = None) -> int:
    """The key of a partly filled block's first tokens (a finished sequence's last block, kept
    for the next turn of its conversation): BLAKE2b personalised apart from :func:`block_hash`,
    so no token ids and salt can make one equal a full block's hash."""
    h = hashlib.blake2b(digest_size=16, person=b"fi-partial")
    h.update((parent or 0).to_bytes(16, "little"))
    h.update(len(token_ids).to_bytes(4, "little"))  # else tokens and a salt could trade bytes
    h.update(array("q", token_ids).tobytes())
    if extra:
        h.update(b"\0" + extra.encode())
    return int.from_bytes(h.digest(), "little")


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks that became reusable, in prefix order (each one's parent is the one before;
    the first's is ``parent_block_hash``)."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str = DEVICE


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks no longer held in ``medium``."""

    block_hashes: list[int]
    medium: str = DEVICE


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The whole cache was reset (``Engine.reset_prefix_cache``)."""

    medium: str = DEVICE


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class KVEventBatch:
    """The events of one engine step, with its wall-clock time (``time.time()``)."""

    ts: float
    events: list[KVEvent] = field(default_factory=list)


class EventLog:
    """Collects events while a step is scheduled; ``take`` returns them as one batch. Off (no
    cost beyond a flag test) until someone asks for events."""

    __slots__ = ("enabled", "_events")

    def __init__(self) -> None:
        self.enabled = False
        self._events: list[KVEvent] = []

    def stored(self, hashes: list[int], parent: int | None, token_ids: list[int], block_size: int,
               medium: str = DEVICE) -> None:
        if self.enabled and hashes:
            self._events.append(BlockStored(hashes, parent, token_ids, block_size, None, medium))

    def removed(self, hashes: list[int], medium: str = DEVICE) -> None:
        if self.enabled and hashes:
            self._events.append(BlockRemoved(hashes, medium))

    def cleared(self, medium: str = DEVICE) -> None:
        if self.enabled:
            self._events.append(AllBlocksCleared(medium))

    def take(self) -> KVEventBatch | None:
        if not self._events:
            return None
        batch, self._events = KVEventBatch(time.time(), self._events), []
        return batch
