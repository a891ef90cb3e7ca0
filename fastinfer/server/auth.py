"""Who may call: the bearer token of a request checked against the API keys (the ``/v1``
routes) or the admin key (the ``/admin`` routes); a refusal is a 401 (403 while the admin API
is off)."""
from __future__ import annotations

from fastapi import Request

from fastinfer.server.errors import APIError
from fastinfer.server.keys import KeyPolicy
from fastinfer.server.state import ServerState


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


def check_admin(state: ServerState, request: Request) -> None:
    """Returns when the caller holds the admin key: 403 while the admin API is off, else 401."""
    if not state.admin_enabled:
        raise APIError(403, "the admin API is off: start the server with --admin-key", code="admin_disabled")
    if not state.is_admin(bearer_token(request)):
        raise APIError(401, "the admin API needs 'Authorization: Bearer <admin key>'", code="invalid_admin_key")
