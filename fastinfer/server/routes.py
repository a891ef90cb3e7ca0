"""The HTTP routes over a ``ServerState``: ``/health`` and ``/metrics`` (behind the metrics key
when it has one), the OpenAI endpoints under ``/v1`` (behind ``ApiGate``: the API key and the
draining check) and the admin API under ``/admin`` (behind the admin key) that loads, promotes,
weighs, rolls back and unloads model versions."""
from __future__ import annotations

import asyncio

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from fastinfer.errors import InvalidArgumentError, ModelLoadError
from fastinfer.server.auth import caller, check_admin, check_metrics
from fastinfer.server.errors import APIError
from fastinfer.server.job import Job
from fastinfer.server.keys import KeyPolicy, scope_of
from fastinfer.server.protocol import (ChatCompletionRequest, CompletionRequest, LoadBody, RollbackBody,
                                       TrafficBody, VersionBody)
from fastinfer.server.responses import collect
from fastinfer.server.state import ServerState
from fastinfer.server.streaming import stream_response


def add_routes(app: FastAPI, state: ServerState) -> None:
    """Adds every route of the server to ``app`` (the public ones first, then the admin API)."""
    _add_api_routes(app, state)
    _add_admin_routes(app, state)


def _add_api_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok", **await _replica_health(state)})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        check_metrics(state, request)
        for mv in state.registry.versions():
            state.metrics.engine_stats(mv.name, mv.version, mv.engine.stats())
            if hasattr(mv.engine, "routing_stats"):  # an engine made of replicas (fastinfer.ray_serve)
                state.metrics.routing(mv.name, mv.version, mv.engine.routing_stats())
        data, content_type = state.metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/v1/models")
    async def models(policy: KeyPolicy | None = Depends(caller)) -> dict:
        return {"object": "list", "data": [_model_card(n) for n in state.registry.served_names(scope_of(policy))]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, policy: KeyPolicy | None = Depends(caller)) -> dict:
        if model_id not in state.registry.served_names(scope_of(policy)):
            raise state.registry.not_found(model_id, scope_of(policy))
        return _model_card(model_id)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request,
                          policy: KeyPolicy | None = Depends(caller)) -> Response:
        return await _respond(Job(state, request, policy, body, chat=False))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               policy: KeyPolicy | None = Depends(caller)) -> Response:
        return await _respond(Job(state, request, policy, body, chat=True))


async def _replica_health(state: ServerState) -> dict:
    """``{"models": {"name@version": ...}}`` for the versions whose engine is made of replicas
    (their ``health()``: each replica's state and the deployment's), else nothing."""
    versions = [mv for mv in state.registry.versions() if hasattr(mv.engine, "health")]
    if not versions:
        return {}
    reports = await asyncio.gather(*(mv.engine.health() for mv in versions), return_exceptions=True)
    return {"models": {mv.key: (r if not isinstance(r, BaseException) else {"error": str(r)})
                       for mv, r in zip(versions, reports)}}


def _model_card(name: str) -> dict:
    """OpenAI's model object for a served ``name`` or ``name@version``."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "fastinfer"}


async def _respond(job: Job) -> Response:
    """Submits the request, then answers with server-sent events or one JSON body."""
    await job.submit()
    if job.body.stream:
        return stream_response(job)
    return await collect(job)


def _add_admin_routes(app: FastAPI, state: ServerState) -> None:
    async def admin(request: Request) -> None:
        check_admin(state, request)

    reg = state.registry

    @app.get("/admin/models", dependencies=[Depends(admin)])
    async def list_models() -> dict:
        return {"models": reg.list_models(), "events": reg.events[-100:]}

    @app.post("/admin/models/{name}/load", dependencies=[Depends(admin)])
    async def load(name: str, body: LoadBody) -> dict:
        try:
            await reg.load(name, body.version, body.source)
        except (ModelLoadError, InvalidArgumentError) as exc:  # a source that is not a model: the caller's
            raise APIError(400, f"cannot load {name}@{body.version}: {exc}", param="source",
                           code="model_load_failed") from exc
        return {"models": reg.list_models()}

    @app.post("/admin/models/{name}/promote", dependencies=[Depends(admin)])
    async def promote(name: str, body: VersionBody) -> dict:
        reg.promote(name, body.version)
        return {"models": reg.list_models()}

    @app.post("/admin/models/{name}/traffic", dependencies=[Depends(admin)])
    async def traffic(name: str, body: TrafficBody) -> dict:
        reg.set_traffic(name, body.weights)
        return {"models": reg.list_models()}

    @app.post("/admin/models/{name}/rollback", dependencies=[Depends(admin)])
    async def rollback(name: str, body: RollbackBody | None = None) -> dict:
        reg.rollback(name, reason=body.reason if body is not None else "manual")
        return {"models": reg.list_models()}

    @app.post("/admin/models/{name}/unload", dependencies=[Depends(admin)])
    async def unload(name: str, body: VersionBody) -> dict:
        await reg.unload(name, body.version, timeout=state.shutdown_timeout)
        state.metrics.remove(name, body.version)
        return {"models": reg.list_models()}
