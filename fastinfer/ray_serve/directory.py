"""What the router knows of the replicas: which KV blocks each one's prefix cache holds (from
the engines' KV events) and each one's latest load.

Every replica sends its KV event batches and its ``stats()`` here a few times a second
(``EngineReplica``); the router asks ``match`` which replica holds the longest run of a
prompt's first blocks. It runs as one Ray actor per deployment (``directory_actor``), so the
router and the replicas need no other channel; the class itself is plain Python and is tested
without Ray.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from fastinfer.kv_cache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

STALE_AFTER_S = 5.0
"""A replica that has published nothing for this long is reported ``unresponsive``."""


class ReplicaDirectory:
    """Per replica: the block hashes held (per medium: the working cache and the host tier)
    and the last stats with the time they came."""

    def __init__(self) -> None:
        self._blocks: dict[str, dict[str, set[int]]] = {}
        self._stats: dict[str, tuple[float, dict[str, Any]]] = {}

    def publish(self, replica: str, batches: Iterable[KVEventBatch], stats: dict[str, Any] | None = None) -> None:
        """Applies ``replica``'s event batches (oldest first) and records its ``stats`` (None:
        the last ones still hold)."""
        media = self._blocks.setdefault(replica, {})
        for batch in batches:
            for event in batch.events:
                _apply(media, event)
        previous = self._stats.get(replica, (0.0, {}))[1]
        self._stats[replica] = (time.time(), dict(stats) if stats is not None else previous)

    def match(self, hashes: list[int], replicas: Iterable[str] | None = None) -> dict[str, int]:
        """For each replica (all known, or those named), how many of ``hashes`` (a prompt's
        chained full-block hashes, in order) it holds as an unbroken prefix."""
        names = self._blocks.keys() if replicas is None else replicas
        return {name: _prefix_length(self._blocks.get(name, {}), hashes) for name in names}

    def replicas(self) -> dict[str, dict[str, Any]]:
        """Each known replica's state (``running``, or ``unresponsive`` when it has not
        published for ``STALE_AFTER_S``), seconds since it last did, cached blocks and stats."""
        now = time.time()
        out = {}
        for name, (seen, stats) in self._stats.items():
            age = now - seen
            blocks = sum(len(s) for s in self._blocks.get(name, {}).values())
            out[name] = {"state": "running" if age < STALE_AFTER_S else "unresponsive",
                         "last_seen_s": round(age, 3), "cached_blocks": blocks, **stats}
        return out

    def forget(self, replica: str) -> None:
        """Drops a replica that is gone (its cache went with it)."""
        self._blocks.pop(replica, None)
        self._stats.pop(replica, None)

    def keep_only(self, replicas: Iterable[str]) -> None:
        """Forgets every replica not named (the deployment's live set)."""
        live = set(replicas)
        for name in [n for n in self._stats.keys() | self._blocks.keys() if n not in live]:
            self.forget(name)


def _apply(media: dict[str, set[int]], event) -> None:
    if isinstance(event, BlockStored):
        media.setdefault(event.medium, set()).update(event.block_hashes)
    elif isinstance(event, BlockRemoved):
        media.get(event.medium, set()).difference_update(event.block_hashes)
    elif isinstance(event, AllBlocksCleared):
        media.pop(event.medium, None)


def _prefix_length(media: dict[str, set[int]], hashes: list[int]) -> int:
    sets = list(media.values())
    n = 0
    for h in hashes:
        if not any(h in s for s in sets):
            break
        n += 1
    return n
