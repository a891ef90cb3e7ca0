"""The routing policy of ``PrefixAwareRouter`` (see ``fastinfer.ray_serve.router``) as plain
functions, and the routers' counts per deployment.

It lives apart from the router class because Ray Serve pickles the router's module by value
(``RequestRouterConfig``): what the router keeps here (``ROUTER_STATS``) is then this module's
one copy in the process, which the server's ``/metrics`` reads.
"""
from __future__ import annotations

import random
import threading
from collections import Counter
from dataclasses import dataclass, field

from fastinfer.kv_cache.events import block_hash

RECENT_TTL_S = 30.0
RECENT_MAX = 100_000
MAX_PROMPT_BLOCKS = 256
MAX_PENDING = 10_000
POLICIES = ("prefix", "random")


@dataclass
class RouterStats:
    """Counts of one deployment's routing: requests by decision (``prefix``: to the replica
    holding the longest prefix; ``balanced``: no replica held any, power of two choices;
    ``fallback``: the best one was too loaded; ``random``), how many landed on a replica that
    held part of their prompt (``hits``), and per replica the requests in flight and routed."""

    decisions: Counter = field(default_factory=Counter)
    hits: int = 0
    in_flight: Counter = field(default_factory=Counter)
    routed: Counter = field(default_factory=Counter)

    @property
    def requests(self) -> int:
        return sum(self.decisions.values())

    def snapshot(self) -> dict:
        requests = self.requests
        return {"requests": requests, "decisions": dict(self.decisions), "hits": self.hits,
                "hit_rate": self.hits / requests if requests else 0.0,
                "in_flight": {k: v for k, v in self.in_flight.items() if v}, "routed": dict(self.routed)}


ROUTER_STATS: dict[str, RouterStats] = {}
_STATS_LOCK = threading.Lock()


def router_stats(key: str) -> RouterStats:
    """The stats of the router(s) built with ``stats_key=key`` in this process."""
    with _STATS_LOCK:
        return ROUTER_STATS.setdefault(key, RouterStats())


def prompt_block_hashes(prompt, block_size: int, max_blocks: int = MAX_PROMPT_BLOCKS) -> list[int]:
    """The chained hashes of ``prompt``'s first full blocks, as the engines' prefix caches key
    them (``fastinfer.kv_cache.events.block_hash``, no cache salt)."""
    if not isinstance(prompt, (list, tuple)) or block_size <= 0:
        return []
    hashes: list[int] = []
    for start in range(0, min(len(prompt) // block_size, max_blocks) * block_size, block_size):
        hashes.append(block_hash(hashes[-1] if hashes else None, prompt[start:start + block_size]))
    return hashes


def decide(candidates: list[str], matched: dict[str, int], load: dict[str, int], *, abs_threshold: int,
           rel_threshold: float, rng: random.Random) -> tuple[str, list[str]]:
    """The routing decision for one request: ``("prefix", [best])``, or ``("balanced" |
    "fallback", two random candidates)`` for Ray Serve to take the less loaded of."""
    best = max(candidates, key=lambda c: (matched.get(c, 0), -load.get(c, 0)))
    if matched.get(best, 0) == 0:
        return "balanced", _two(candidates, rng)
    least = min(load.get(c, 0) for c in candidates)
    mine = load.get(best, 0)
    if mine > least + abs_threshold and mine > least * rel_threshold:
        return "fallback", _two(candidates, rng)
    return "prefix", [best]


def _two(candidates: list[str], rng: random.Random) -> list[str]:
    return rng.sample(candidates, min(2, len(candidates)))
