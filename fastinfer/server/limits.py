"""The request-body limits: ``BodyLimit``, an ASGI middleware that answers 413 (in OpenAI's
error shape) for a body over the server's ``max_body_bytes``, whether its size is declared in
``Content-Length`` or only seen while it streams in, and 408 for a body that has not arrived
within ``timeout`` seconds of the request's start (a client that sends its body slowly, or
never, holds no connection for longer)."""
from __future__ import annotations

import asyncio
import json
import time

from fastinfer.server.errors import error_body


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes (declared or streamed), 408
    for one not received within ``timeout`` seconds."""

    def __init__(self, app, limit: int, timeout: float) -> None:
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._drain(receive, int(declared))
            return await _refuse(send, self._too_large())
        body = _GuardedBody(receive, self)
        started = False

        async def tracking_send(message):
            nonlocal started
            if body.refusal is not None:  # FastAPI answers a body it failed to read with a 400: ours replaces it
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, body.receive, tracking_send)
        except Exception:
            if body.refusal is None:
                raise
        if body.refusal is not None and not started:
            if body.refusal.status == 413 and not body.complete:
                await self._drain(receive, 0)
            await _refuse(send, body.refusal)

    async def _drain(self, receive, declared: int) -> None:
        """Reads and drops what is left of a refused body (up to ``DRAIN_BYTES`` and
        ``DRAIN_S``): a server that closes with unread bytes in its socket resets the
        connection, and the client may then see the reset instead of the 413."""
        if declared > DRAIN_BYTES:
            return
        seen, deadline = 0, time.monotonic() + min(DRAIN_S, self.timeout)
        while seen <= DRAIN_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                message = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    def _too_large(self) -> _Refusal:
        return _Refusal(413, f"the request body is larger than {self.limit} bytes", "request_too_large")

    def _too_slow(self) -> _Refusal:
        return _Refusal(408, f"the request body was not received within {self.timeout:g} seconds", "request_timeout")


DRAIN_BYTES = 16 << 20
DRAIN_S = 5.0


class _GuardedBody:
    """The request's ``receive``, counting the body's bytes against the limit and timing it
    against the deadline until its last piece came (later messages, the disconnect a response
    waits for, are passed on untimed)."""

    def __init__(self, receive, limit: BodyLimit) -> None:
        self._receive, self._limit = receive, limit
        self._deadline = time.monotonic() + limit.timeout
        self._seen, self._complete = 0, False
        self.refusal: _Refusal | None = None

    @property
    def complete(self) -> bool:
        """Whether the body's last piece was received."""
        return self._complete

    async def receive(self):
        if self._complete:
            return await self._receive()
        try:
            message = await asyncio.wait_for(self._receive(), max(0.0, self._deadline - time.monotonic()))
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise self._refuse(self._limit._too_slow()) from None
        if message["type"] == "http.request":
            self._seen += len(message.get("body", b""))
            self._complete = not message.get("more_body", False)
            if self._seen > self._limit.limit:
                raise self._refuse(self._limit._too_large())
        return message

    def _refuse(self, refusal: _Refusal) -> _Refusal:
        self.refusal = refusal
        return refusal


class _Refusal(Exception):
    """A body refused while it was read: the status, message and code of the answer."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


async def _refuse(send, refusal: _Refusal) -> None:
    body = json.dumps(error_body(refusal.status, refusal.message, code=refusal.code)).encode()
    await send({"type": "http.response.start", "status": refusal.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
