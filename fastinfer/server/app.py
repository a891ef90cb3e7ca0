"""The OpenAI-compatible app: ``build_app(state)`` returns a FastAPI app over a
``ModelRegistry`` of ``AsyncEngine``s.

A request's path: key check (401) and drain check (503) from the headers alone, the body read
(413 when too large, 408 when too slow), its validation (400), routing to a model
version (404; 403 when the key may not use it), quota (429 with ``Retry-After``), submission
(429 when the engine's queue is full), then the outputs: one JSON body, or server-sent events
of deltas. Whatever ends it (the last token, a stop, the client leaving, an error) releases the
quota and the version's in-flight slot and writes one audit line and the metrics.

Where each part lives: ``state`` (``ServerState``), ``limits`` (the body-size and body-time
middleware), ``errors`` (OpenAI-shaped errors and their handlers), ``problems`` (what an invalid
body did wrong, in words), ``auth`` (API, admin and metrics keys; the ``/v1`` gate),
``routes`` (the handlers), ``job`` (one request's life), ``responses`` (the JSON bodies) and
``streaming`` (the server-sent events), ``docs`` (the offline ``/docs`` page) and ``serving``
(uvicorn with a header timeout and a draining SIGTERM).
"""
from __future__ import annotations

import contextlib

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from fastinfer import __version__
from fastinfer.server.auth import ApiGate
from fastinfer.server.docs import docs_page
from fastinfer.server.errors import install_error_handlers
from fastinfer.server.limits import BodyLimit
from fastinfer.server.routes import add_routes
from fastinfer.server.state import DEFAULT_MAX_BODY_BYTES, ServerState

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ServerState", "build_app"]


def build_app(state: ServerState) -> FastAPI:
    """The FastAPI app; its lifespan shuts every engine down (draining first) at exit.
    ``/openapi.json`` is always served; ``/docs`` only with ``state.enable_docs``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await state.drain()

    app = FastAPI(title="fastinfer", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    app.add_middleware(BodyLimit, limit=state.max_body_bytes, timeout=state.body_timeout)
    app.add_middleware(ApiGate, state=state)  # the outermost: a refused caller's body is never read
    install_error_handlers(app)
    add_routes(app, state)
    if state.enable_docs:
        app.add_api_route("/docs", lambda: HTMLResponse(docs_page(app.openapi())), include_in_schema=False)
    return app
