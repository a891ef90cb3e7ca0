"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status
that OpenAI's clients map to their exception classes, and the app's exception handlers that
answer every refusal, invalid body and bug in that shape (auditing the refused ``/v1`` calls)."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fastinfer.server.audit import record_quietly
from fastinfer.server.problems import describe

# status -> OpenAI error type
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          409: "conflict_error", 500: "internal_server_error", 503: "service_unavailable",
          507: "insufficient_storage"}


class APIError(Exception):
    """Raised anywhere in a request's handling; the app turns it into an OpenAI-shaped body.
    ``retry_after`` (seconds) becomes a ``Retry-After`` header (429 and 503)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, int(-(-self.retry_after // 1))))
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def install_error_handlers(app: FastAPI) -> None:
    """Answers ``APIError``, invalid bodies (400), Starlette's HTTP errors and any other
    exception (500) with an OpenAI-shaped body."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        if not getattr(exc, "audited", False):
            audit_refusal(request, exc.status, exc.code or "refused")
        return exc.response()

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:  # a bug: still OpenAI-shaped
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        message, param = describe(exc.errors())
        audit_refusal(request, 400, "invalid_request")
        return JSONResponse(error_body(400, message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))


def audit_refusal(request: Request, status: int, reason: str) -> None:
    """One audit line for an API request refused before it was handled (bad key, draining,
    invalid body), with the caller's key id once the key was checked: failed authentication is
    what an audit log is most for."""
    # A ServerState, left unannotated: state.py imports the registry, which imports this module.
    state = request.app.state.server
    policy = request.scope.get("state", {}).get("policy")
    if request.url.path.startswith("/v1/"):
        record_quietly(state.audit, request_id=None, endpoint=request.url.path,
                       key_id=policy.id if policy is not None else None, model=None, version=None,
                       prompt_tokens=0, output_tokens=0, ttft=None, latency=None, finish_reason=reason, status=status)
