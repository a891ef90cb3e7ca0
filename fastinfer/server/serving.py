"""The app under uvicorn: ``build_server(app)`` gives a ``DrainingServer``, which on SIGTERM (or
Ctrl-C) keeps accepting connections while it drains (new requests get 503, ``/health`` says
``draining``, the requests in flight finish within the shutdown timeout) and only then exits,
and whose connections must send each request's head within the state's ``header_timeout``."""
from __future__ import annotations

import asyncio
import functools
from types import FrameType

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

_GRACE_S = 5  # after draining, how long uvicorn waits for the connections still open


class HeadTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's head: a connection that has not
    sent a whole request line and headers within ``head_timeout`` seconds of connecting (or of
    its previous response) is closed. uvicorn's own keep-alive timer starts only after a first
    response and is reset by every byte, so a silent or trickling client would hold its
    connection forever."""

    def __init__(self, *args, head_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        waiting_for_head = self.cycle is None or self.cycle.response_complete
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()


class DrainingServer(uvicorn.Server):
    """uvicorn's Server that drains on the first SIGTERM or SIGINT (``ServerState.drain``)
    before it exits, instead of closing its listening socket at once: clients keep getting
    answers (503 with ``Retry-After``) rather than "connection refused". A second signal, or
    one before it has started, exits as uvicorn does."""

    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signalled = False
        self._draining: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled or not self.started or self._loop is None:
            return super().handle_exit(sig, frame)
        self._signalled = True
        self._loop.call_soon_threadsafe(self.start_draining)  # a signal handler may not touch the loop

    def start_draining(self) -> None:
        """Drains the state, then tells uvicorn to exit (once; later calls do nothing)."""
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.state.drain()
        finally:
            self.should_exit = True


def build_server(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, **options) -> DrainingServer:
    """A ``DrainingServer`` for an app of ``build_app(state)``, on the h11 protocol with the
    state's header timeout; ``options`` go to ``uvicorn.Config``."""
    state = app.state.server
    protocol = functools.partial(HeadTimeoutH11, head_timeout=state.header_timeout)
    options = {"log_level": "warning", "access_log": False, "timeout_graceful_shutdown": _GRACE_S} | options
    config = uvicorn.Config(app, host=host, port=port, http=protocol, **options)
    return DrainingServer(config, state)
