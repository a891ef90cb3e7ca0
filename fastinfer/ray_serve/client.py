"""``ReplicaSetClient``: a deployment of engine replicas seen through ``AsyncEngine``'s interface,
so that the server's request handling (``fastinfer.server``) serves them unchanged.

``add_request`` sends the prompt through the deployment handle, whose ``PrefixAwareRouter``
picks the replica, and returns once that replica's engine accepted it (its refusals are raised
as the engine's errors: 400, 429, 503 in the server). The stream's outputs come from that
replica. A replica that dies ends its requests with ``ReplicaDiedError`` (an
``EngineDeadError``: 503); they are not retried elsewhere, since generation is not idempotent.
``abort_nowait`` cancels the stream (the replica aborts the request) and the stream then ends
with a final output whose samples say ``"abort"``, as an engine's would.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import ray
from ray import serve

from fastinfer.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from fastinfer.errors import (EngineDeadError, EngineOverloadedError, EngineShutdownError, FastInferError)
from fastinfer.ray_serve.routing import router_stats
from fastinfer.sampling.params import SamplingParams


class ReplicaDiedError(EngineDeadError):
    """The replica serving a request died; the request is lost (it is not retried)."""


class ReplicaStream:
    """One request's outputs from its replica: ``async for out in stream``."""

    __slots__ = ("request_id", "replica", "finished", "_gen", "_client", "_prompt", "_n", "_aborted", "_ended",
                 "_cached")

    def __init__(self, request_id: str, replica: str, gen, client: ReplicaSetClient, prompt, n: int) -> None:
        self.request_id, self.replica, self._gen, self._client = request_id, replica, gen, client
        self._prompt, self._n = prompt, n
        self.finished = self._aborted = self._ended = False  # ``finished``: also set by the server
        self._cached: int | None = None

    def __aiter__(self) -> ReplicaStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            out = await self._gen.__anext__()
        except StopAsyncIteration:
            if not self._aborted:
                self._end()
                raise ReplicaDiedError(f"replica {self.replica} ended request {self.request_id} without "
                                       "its final output") from None
            out = None
        except Exception as exc:
            if not self._aborted:
                self._end()
                raise as_engine_error(exc, self.replica) from exc
            out = None
        if out is None:  # aborted: the final output an engine gives an aborted request
            self._end()
            return self._abort_output()
        self._cached = out.num_cached_tokens
        if out.finished:
            self._end()
        return out

    def abort(self) -> None:
        """Cancels the request on its replica (which aborts it there). A reader still gets the
        final output an aborted request gets."""
        if not self._ended and not self._aborted:
            self._aborted = True
            self._gen.cancel()
            self._client._streams.pop(self.request_id, None)

    def _end(self) -> None:
        self.finished = self._ended = True
        self._client._streams.pop(self.request_id, None)

    def _abort_output(self) -> RequestOutput:
        prompt = self._prompt if isinstance(self._prompt, list) else []
        return RequestOutput(self.request_id, None, prompt,
                             [CompletionOutput(i, "", [], "abort") for i in range(self._n)], True,
                             RequestMetrics(time.monotonic()), self._cached)


def as_engine_error(exc: BaseException, replica: str | None = None) -> BaseException:
    """The fastinfer error a Ray failure stands for: an engine's own error raised in the
    replica comes back as itself; a replica that died as ``ReplicaDiedError``."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, FastInferError):
        return cause
    if isinstance(exc, FastInferError):
        return exc
    if isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        return ReplicaDiedError(f"replica {replica or '?'} died while serving the request; "
                                "it is not retried (generation is not idempotent)")
    if isinstance(exc, serve.exceptions.BackPressureError):
        return EngineOverloadedError(f"every replica's queue is full: {exc}")
    if isinstance(exc, serve.exceptions.DeploymentUnavailableError):
        return EngineShutdownError(f"the replicas are unavailable: {exc}")
    return ReplicaDiedError(f"replica {replica or '?'} failed: {type(exc).__name__}: {exc}")


class ReplicaSetClient:
    """``AsyncEngine``'s interface over a deployment handle of ``EngineReplica``s. ``info``:
    one replica's ``info()`` (the tokenizer, limits); ``app_name``: the Serve application to
    delete at shutdown when ``owns_app``; ``directory``: the ``ReplicaDirectory`` actor;
    ``stats_key``: the router's ``ROUTER_STATS`` key."""

    def __init__(self, handle, info: dict[str, Any], *, directory=None, stats_key: str = "",
                 app_name: str | None = None, owns_app: bool = False, replicas: int = 1) -> None:
        self._handle = handle.options(stream=True)
        self._info, self._directory, self._stats_key = info, directory, stats_key
        self._app_name, self._owns_app, self._replicas = app_name, owns_app, replicas
        self._streams: dict[str, ReplicaStream] = {}
        self._snapshot: dict[str, dict[str, Any]] = {}
        self._refresh: asyncio.Future | None = None
        self._accepting = True

    @classmethod
    def connect(cls, handle, **kwargs) -> ReplicaSetClient:
        """Asks one replica for the model's ``info`` (blocking: call it off the event loop)."""
        return cls(handle, handle.info.remote().result(), **kwargs)

    # -- AsyncEngine's interface -------------------------------------------------
    def get_tokenizer(self):
        return self._info["tokenizer"]

    @property
    def max_model_len(self) -> int:
        return self._info["max_model_len"]

    @property
    def block_size(self) -> int:
        return self._info["block_size"]

    @property
    def accepting(self) -> bool:
        return self._accepting

    def memory_bytes(self) -> int:
        """Every replica's weights and KV cache (one replica's times their number)."""
        return int(self._info["memory_bytes"]) * max(1, len(self._snapshot) or self._replicas)

    async def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                          *, priority: int = 0) -> ReplicaStream:
        if not self._accepting:
            raise EngineShutdownError("the replicas are shutting down")
        rid = uuid.uuid4().hex if request_id is None else request_id
        gen = self._handle.generate.remote(prompt, params, rid, priority)
        try:
            replica = await gen.__anext__()
        except asyncio.CancelledError:
            gen.cancel()
            raise
        except Exception as exc:
            raise as_engine_error(exc) from exc
        n = params.n if isinstance(params, SamplingParams) else 1
        stream = self._streams[rid] = ReplicaStream(rid, replica, gen, self, prompt, n)
        return stream

    async def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                       *, priority: int = 0):
        stream = await self.add_request(prompt, params, request_id, priority=priority)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort_nowait(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.abort()

    async def abort(self, request_id: str) -> None:
        self.abort_nowait(request_id)

    def stats(self) -> dict[str, int]:
        """The replicas' ``stats()`` summed, as of their last report (refreshed in the
        background; ``/metrics`` polls it)."""
        self._schedule_refresh()
        total: dict[str, int] = {}
        for stats in self._snapshot.values():
            for key, value in stats.items():
                if isinstance(value, int) and not isinstance(value, bool) and key not in ("pid", "cached_blocks"):
                    total[key] = total.get(key, 0) + value
        return total

    def routing_stats(self) -> dict[str, Any]:
        """The router's counts (``RouterStats.snapshot``) and each replica's last report."""
        self._schedule_refresh()
        return {**router_stats(self._stats_key).snapshot(), "replicas": dict(self._snapshot)}

    async def health(self) -> dict[str, Any]:
        """The replicas and their state, fresh from the directory and Ray Serve."""
        await self._refreshed()
        return {"replicas": {name: {k: v for k, v in s.items() if k in _HEALTH_FIELDS}
                             for name, s in self._snapshot.items()},
                "deployment": await asyncio.to_thread(self._deployment_status)}

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stops taking requests, lets those in flight finish for up to ``timeout`` seconds,
        aborts the rest; deletes the Serve application and the directory if this client made them."""
        self._accepting = False
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._streams and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.05)
        for stream in list(self._streams.values()):
            stream.abort()
        if self._owns_app:
            await asyncio.to_thread(self._delete)

    # -- the rest ----------------------------------------------------------------
    def _schedule_refresh(self) -> None:
        """In the event loop: refresh the snapshot in the background; elsewhere (a caller's own
        thread): now, blocking."""
        if self._directory is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            try:
                self._snapshot = ray.get(self._directory.replicas.remote(), timeout=30)
            except ray.exceptions.RayError:
                self._snapshot = {}
            return
        if self._refresh is None or self._refresh.done():
            self._refresh = loop.create_task(self._refreshed())

    async def _refreshed(self) -> None:
        if self._directory is not None:
            try:
                self._snapshot = await self._directory.replicas.remote()
            except ray.exceptions.RayError:
                self._snapshot = {}

    def _deployment_status(self) -> dict[str, Any]:
        try:
            app = serve.status().applications[self._app_name]
        except Exception:
            return {}
        return {name: {"status": str(d.status.value if hasattr(d.status, "value") else d.status),
                       "replica_states": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}}
                for name, d in app.deployments.items()}

    def _delete(self) -> None:
        try:
            serve.delete(self._app_name)
        finally:
            if self._directory is not None:
                ray.kill(self._directory)


_HEALTH_FIELDS = ("state", "last_seen_s", "num_running", "num_waiting", "num_queued", "cached_blocks", "pid")
