"""One engine replica of a Ray Serve deployment: an ``AsyncEngine`` in a Serve replica actor.

``generate`` streams a request's ``RequestOutput``s (its first item is the replica's name, sent
once the engine accepted the request, so a refusal reaches the caller before any output);
a caller that cancels the stream aborts the request. A thread sends the engine's KV events and
stats to the deployment's ``ReplicaDirectory`` (at most every ``publish_interval_s`` while
blocks change, and every ``HEARTBEAT_S`` regardless), which is what the router routes on.
"""
from __future__ import annotations

import collections
import os
import threading
from typing import Any

import ray
from ray import serve

from fastinfer.engine.async_engine import AsyncEngine
from fastinfer.ray_serve.directory import ReplicaDirectory

HEARTBEAT_S = 0.5
DIRECTORY_NAMESPACE = "fastinfer"


def directory_actor(name: str):
    """The deployment's ``ReplicaDirectory`` actor, made by whoever asks first (detached: it
    outlives a replica that dies; ``ReplicaSetClient.shutdown`` ends it)."""
    actor = ray.remote(ReplicaDirectory).options(name=name, namespace=DIRECTORY_NAMESPACE, get_if_exists=True,
                                                 lifetime="detached", num_cpus=0, max_concurrency=1)
    return actor.remote()


class EngineReplica:
    """The deployment's class. ``source`` and ``options``: as ``AsyncEngine(source, **options)``;
    ``directory``: the name of the ``ReplicaDirectory`` actor (None: publish nothing)."""

    def __init__(self, source: str, options: dict[str, Any] | None = None, directory: str | None = None,
                 publish_interval_s: float = 0.05) -> None:
        options = dict(options or {})
        self.engine = AsyncEngine(source, **options)
        self.name = _replica_name()
        self._directory = directory_actor(directory) if directory else None
        self._events: collections.deque = collections.deque()
        self._stop = threading.Event()
        if self._directory is not None:
            self.engine.on_kv_events(self._events.append)  # the engine's thread; deque appends are atomic
            self._publisher = threading.Thread(target=self._publish_loop, args=(publish_interval_s,),
                                               name="fastinfer-kv-publisher", daemon=True)
            self._publisher.start()

    async def generate(self, prompt, params=None, request_id: str | None = None, priority: int = 0):
        stream = await self.engine.add_request(prompt, params, request_id, priority=priority)
        try:
            yield self.name
            async for out in stream:
                yield out
        finally:
            if not stream.finished:  # the caller cancelled (its client left) or the replica stops
                self.engine.abort_nowait(stream.request_id)

    def info(self) -> dict[str, Any]:
        """What the front end needs of the model: its tokenizer, limits and memory."""
        return {"replica": self.name, "pid": os.getpid(), "tokenizer": self.engine.get_tokenizer(),
                "max_model_len": self.engine.max_model_len, "memory_bytes": self.engine.memory_bytes(),
                "block_size": self.engine.config.block_size}

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine loop died is replaced."""
        if not self.engine.accepting and not self._stop.is_set():
            raise RuntimeError(f"replica {self.name}: the engine stopped")

    async def __del__(self) -> None:
        # Serve calls this once the replica's requests drained (or its graceful timeout passed):
        # a replica scaled down or deleted leaves the directory (one that dies, the router drops).
        self._stop.set()
        if self._directory is not None:
            self._publisher.join(1)  # its last report must not come after the goodbye
            self._directory.forget.remote(self.name)
        await self.engine.shutdown(0)

    def _publish_loop(self, interval: float) -> None:
        since_heartbeat = HEARTBEAT_S
        while not self._stop.wait(interval):
            since_heartbeat += interval
            if not self._events and since_heartbeat < HEARTBEAT_S:
                continue
            batches = [self._events.popleft() for _ in range(len(self._events))]
            stats = {**self.engine.stats(), "pid": os.getpid()}
            self._directory.publish.remote(self.name, batches, stats)
            since_heartbeat = 0.0


def _replica_name() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # built outside a Serve replica (a test): the process is the replica
        return f"pid-{os.getpid()}"

