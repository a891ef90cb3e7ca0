"""The OpenAI-compatible app: ``build_app(state)`` returns a FastAPI app over a
``ModelRegistry`` of ``AsyncEngine``s.

A request's path: key check (401), drain check (503), body validation (400), routing to a model
version (404; 403 when the key may not use it), quota (429 with ``Retry-After``), submission
(429 when the engine's queue is full), then the outputs: one JSON body, or server-sent events
of deltas. Whatever ends it (the last token, a stop, the client leaving, an error) releases the
quota and the version's in-flight slot and writes one audit line and the metrics.

Where each part lives: ``state`` (``ServerState``), ``limits`` (the body-size middleware),
``errors`` (OpenAI-shaped errors and their handlers), ``auth`` (API and admin keys),
``routes`` (the handlers), ``job`` (one request's life), ``responses`` (the JSON bodies) and
``streaming`` (the server-sent events).
"""
from __future__ import annotations

import contextlib

from fastapi import FastAPI

from fastinfer.server.errors import install_error_handlers
from fastinfer.server.limits import BodyLimit
from fastinfer.server.routes import add_routes
from fastinfer.server.state import DEFAULT_MAX_BODY_BYTES, ServerState

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ServerState", "build_app"]


def build_app(state: ServerState) -> FastAPI:
    """The FastAPI app; its lifespan shuts every engine down (draining first) at exit."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.draining = True
        await state.registry.shutdown(state.shutdown_timeout)

    app = FastAPI(title="fastinfer", version="0.1.0", lifespan=lifespan)
    app.state.server = state
    app.add_middleware(BodyLimit, limit=state.max_body_bytes)
    install_error_handlers(app)
    add_routes(app, state)
    return app
