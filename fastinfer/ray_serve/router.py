"""Prefix-aware routing of requests between engine replicas, as a Ray Serve request router.

A request goes to the replica whose prefix cache holds the longest run of its prompt's first
full blocks: the ``ReplicaDirectory`` knows that from the engines' KV events (block hashes, the
same in every process), and blocks this router sent somewhere in the last ``RECENT_TTL_S``
seconds count too, so a burst of requests with one prefix goes to one replica before the first
of them is cached. When no replica holds any of the prompt, or the best one is too loaded (more
than ``balance_abs_threshold`` requests in flight above the least loaded, and more than
``balance_rel_threshold`` times it; SGLang's cache-aware router has the same two thresholds),
it picks the less loaded of two random replicas (power of two choices; Ray Serve probes their
queues). ``policy="random"`` routes at random (the baseline the benchmark compares with).

Ray Serve runs the router in the process that holds the deployment handle; its counts are kept
in ``ROUTER_STATS`` under the ``stats_key`` it was given, for the server's ``/metrics``.
"""
from __future__ import annotations

import random
import time
from collections import OrderedDict

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from fastinfer.ray_serve.routing import (MAX_PENDING, POLICIES, RECENT_MAX, RECENT_TTL_S, decide,
                                         prompt_block_hashes, router_stats)


class PrefixAwareRouter(RequestRouter):
    """Ray Serve request router of the engine deployment (see the module's docstring). Its
    kwargs (``RequestRouterConfig.request_router_kwargs``): ``directory`` and ``namespace``
    (the ``ReplicaDirectory`` actor's name), ``block_size`` (the engines'), ``policy``,
    ``balance_abs_threshold``, ``balance_rel_threshold``, ``stats_key`` and ``recent_ttl_s``
    (how long a prefix the router sent somewhere counts as cached there; 0: only KV events)."""

    def initialize_state(self, directory: str | None = None, namespace: str | None = None, block_size: int = 16,
                         policy: str = "prefix", balance_abs_threshold: int = 8,
                         balance_rel_threshold: float = 1.5, stats_key: str = "", seed: int | None = None,
                         recent_ttl_s: float = RECENT_TTL_S) -> None:
        if policy not in POLICIES:
            raise ValueError(f"routing policy must be one of {POLICIES}, got {policy!r}")
        self._policy, self._block_size = policy, block_size
        self._abs, self._rel, self._recent_ttl = balance_abs_threshold, balance_rel_threshold, recent_ttl_s
        self._rng = random.Random(seed)
        self._stats = router_stats(stats_key)
        self._directory_name, self._namespace = directory, namespace
        self._directory, self._lookup_after = None, 0.0
        self._recent: OrderedDict[int, tuple[str, float]] = OrderedDict()
        self._pending: dict[str, tuple[str, list[int], dict[str, int]]] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ids = list(by_id)
        hashes = prompt_block_hashes(pending_request.args[0] if pending_request and pending_request.args else None,
                                     self._block_size)
        matched = await self._match(hashes, ids)  # under random routing too: its hit rate is reported
        if self._policy == "random":
            decision, chosen = "random", [self._rng.choice(ids)]
        else:
            decision, chosen = decide(ids, matched, self._stats.in_flight, abs_threshold=self._abs,
                                      rel_threshold=self._rel, rng=self._rng)
        if pending_request is not None:
            self._pending[pending_request.metadata.internal_request_id] = (decision, hashes, matched)
            while len(self._pending) > MAX_PENDING:  # requests cancelled before they were routed
                del self._pending[next(iter(self._pending))]
        return [[by_id[c] for c in chosen]]

    async def _match(self, hashes: list[int], ids: list[str]) -> dict[str, int]:
        if not hashes:
            return {}
        matched = dict.fromkeys(ids, 0)
        now = time.monotonic()
        if self._directory is None and self._directory_name and now >= self._lookup_after:
            self._directory, self._lookup_after = _find_actor(self._directory_name, self._namespace), now + 1.0
        if self._directory is not None:
            try:
                matched.update(await self._directory.match.remote(hashes, ids))
            except Exception:  # a directory that is gone: route on the recent sends alone
                self._directory = None
        for rid in ids:
            matched[rid] = max(matched[rid], self._recent_prefix(hashes, rid, now))
        return matched

    def _recent_prefix(self, hashes: list[int], rid: str, now: float) -> int:
        n = 0
        for h in hashes:
            sent = self._recent.get(h)
            if sent is None or sent[0] != rid or now - sent[1] > self._recent_ttl:
                break
            n += 1
        return n

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        decision, hashes, matched = self._pending.pop(pending_request.metadata.internal_request_id,
                                                      ("random", [], {}))
        rid = replica_id.unique_id
        self._stats.decisions[decision] += 1
        self._stats.in_flight[rid] += 1
        self._stats.routed[rid] += 1
        if matched.get(rid, 0) > 0:
            self._stats.hits += 1
        now = time.monotonic()
        for h in hashes:
            self._recent[h] = (rid, now)
            self._recent.move_to_end(h)
        while len(self._recent) > RECENT_MAX:
            self._recent.popitem(last=False)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        rid = replica_id.unique_id
        if self._stats.in_flight[rid] > 0:
            self._stats.in_flight[rid] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._stats.in_flight.pop(replica_id.unique_id, None)
        if self._directory is not None:
            self._directory.forget.remote(replica_id.unique_id)


def _find_actor(name: str, namespace: str | None):
    import ray

    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:  # not there yet (or a deployment without one): recent sends only
        return None
