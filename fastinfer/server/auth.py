"""Who may call: the bearer token of a request checked against the API keys (the ``/v1``
routes), the admin key (the ``/admin`` routes) or the metrics key (``/metrics``, when it has
one); a refusal is a 401 (403 while the admin API is off).

``ApiGate`` checks the ``/v1`` routes' key from the headers, before the body is read, and
refuses new requests while the server drains (503 with ``Retry-After``); the routes read the
caller's policy with ``caller``."""
from __future__ import annotations

from fastapi import Request

from fastinfer.server.errors import APIError, audit_refusal
from fastinfer.server.keys import KeyPolicy
from fastinfer.server.state import ServerState

DRAINING_RETRY_S = 5


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None without one."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def authenticate(state: ServerState, request: Request) -> KeyPolicy | None:
    """The caller's key policy (None when the server has no keys); 401 without a valid key."""
    if not state.keys.enabled:
        return None
    policy = state.keys.authenticate(bearer_token(request))
    if policy is None:
        raise APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    return policy


def caller(request: Request) -> KeyPolicy | None:
    """The policy ``ApiGate`` admitted the request with (None: the server has no keys)."""
    return request.scope.get("state", {}).get("policy")


def check_admin(state: ServerState, request: Request) -> None:
    """Returns when the caller holds the admin key: 403 while the admin API is off, else 401."""
    if not state.admin_enabled:
        raise APIError(403, "the admin API is off: start the server with --admin-key", code="admin_disabled")
    if not state.is_admin(bearer_token(request)):
        raise APIError(401, "the admin API needs 'Authorization: Bearer <admin key>'", code="invalid_admin_key")


def check_metrics(state: ServerState, request: Request) -> None:
    """Returns when ``/metrics`` is open, or the caller holds the metrics or the admin key (401)."""
    if state.metrics_protected and not state.may_read_metrics(bearer_token(request)):
        raise APIError(401, "/metrics needs 'Authorization: Bearer <metrics key or admin key>'",
                       code="invalid_metrics_key")


class ApiGate:
    """ASGI middleware in front of the ``/v1`` routes: the API key (401) and the draining check
    (503), from the headers alone, so a refused caller's body is never read. The admitted
    caller's policy goes into the request's state (``caller`` reads it)."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        request = Request(scope)
        try:
            scope.setdefault("state", {})["policy"] = authenticate(self.state, request)
            if self.state.draining:
                raise APIError(503, "the server is shutting down", code="draining", retry_after=DRAINING_RETRY_S)
        except APIError as exc:
            audit_refusal(request, exc.status, exc.code or "refused")
            response = exc.response()
            # The body was never read: the connection cannot carry another request, so it closes.
            response.headers["connection"] = "close"
            return await response(scope, receive, send)
        await self.app(scope, receive, send)
